#!/usr/bin/env bash
# Test set-up only (`make test`): Debian's slurm-wlm, so tests/test_launch_scripts.py can start a one-node
# slurm cluster on localhost (examples/launch/local_slurm.sh) and run the sbatch scripts for real.
# Installs only as root with apt-get and when sbatch is missing; never fails the test run (the slurm tests
# then skip and say why). Opt out with OPSD_SKIP_SLURM=1.
set -uo pipefail
[ "${OPSD_SKIP_SLURM:-0}" = 1 ] && exit 0
command -v sbatch > /dev/null && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
  echo "slurm is not installed (installing it needs root and apt-get): the sbatch tests will skip"
  exit 0
fi
echo "installing slurm-wlm from Debian for the sbatch tests (OPSD_SKIP_SLURM=1 skips this) ..."
LOG=/tmp/opsd-apt-slurm.log
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q slurm-wlm > "$LOG" 2>&1; then
  apt-get update -q >> "$LOG" 2>&1
  apt-get install -y -q slurm-wlm >> "$LOG" 2>&1 || echo "could not install slurm-wlm (see $LOG): the sbatch tests will skip"
fi
exit 0
