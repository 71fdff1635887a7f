#!/usr/bin/env bash
# A one-node slurm cluster on this machine, for trying opsd.sbatch without a real cluster (root, Debian/Ubuntu):
#   apt-get install -y slurm-wlm        # slurmctld, slurmd, munge
#   examples/launch/local_slurm.sh start   # prints the SLURM_CONF to export
#   export SLURM_CONF=/tmp/opsd-slurm/slurm.conf; sbatch ... examples/launch/opsd.sbatch
#   examples/launch/local_slurm.sh stop
# The node advertises CPUS (default 8) CPUs and 8 placeholder GPUs whatever the hardware has, so CPU test jobs can
# oversubscribe and opsd.sbatch's --gpus-per-node=8 is satisfiable.
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/opsd-slurm}
CPUS=${CPUS:-8}
HOST=$(hostname -s)

start() {
    mkdir -p "$DIR"/{ctld,d,log} /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null;
                                     chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    pgrep -x munged > /dev/null || su -s /bin/sh munge -c /usr/sbin/munged
    cat > "$DIR/slurm.conf" <<CONF
ClusterName=opsdlocal
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName=$HOST CPUs=$CPUS Gres=gpu:8 RealMemory=$(( $(free -m | awk '/^Mem:/ {print $2}') * 8 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    # 8 placeholder "GPUs" so opsd.sbatch's `#SBATCH --gpus-per-node=8` is satisfiable on CPU: slurmd wants one
    # file per GPU (it logs that they are not devices, and registers them anyway; a Count without File reports 0)
    for i in $(seq 0 7); do : > "$DIR/fake-gpu$i"; done  # slurm needs a file per GPU; nothing opens them
    echo "NodeName=$HOST Name=gpu File=$DIR/fake-gpu[0-7]" > "$DIR/gres.conf"
    export SLURM_CONF="$DIR/slurm.conf"  # gres.conf is read from the directory of SLURM_CONF
    /usr/sbin/slurmctld -f "$DIR/slurm.conf"
    /usr/sbin/slurmd -f "$DIR/slurm.conf"
    for _ in $(seq 30); do
        SLURM_CONF="$DIR/slurm.conf" sinfo -h -o %T 2>/dev/null | grep -q idle && break
        sleep 1
    done
    SLURM_CONF="$DIR/slurm.conf" sinfo
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

stop() {
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    echo "slurm daemons stopped (munged left running: stop it with kill \$(pgrep -x munged) if you started it)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
