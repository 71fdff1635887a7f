"""`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests._cli_rank_failure RANK [--debug]`:
the real `megatron-opsd` entry (``cli.main``) running a command in which rank RANK alone finds a UsageError after
the process group is up, while the other rank waits for it in a control-plane broadcast (as ranks wait for rank 0's
rollouts, evaluation or sidecar). For tests/test_cli_errors.py."""
import argparse
import sys

import torch

from megatron_opsd import cli
from megatron_opsd.errors import UsageError
from megatron_opsd.parallel.control import broadcast_object
from megatron_opsd.parallel.distributed import ParallelConfig, init_distributed

MESSAGE = "data.train_path: row 7 has no 'problem' field (data.prompt_field)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("failing_rank", type=int)


def main(args: argparse.Namespace) -> int:
    init_distributed(ParallelConfig())
    if torch.distributed.get_rank() == args.failing_rank:
        raise UsageError(MESSAGE)
    broadcast_object(None, src=args.failing_rank)  # the failing rank never sends: its exit breaks this wait
    return 0


if __name__ == "__main__":
    cli.SUBCOMMANDS["fail-in-one-rank"] = ("__main__", "a UsageError found inside one rank only")
    sys.exit(cli.main(["fail-in-one-rank", *sys.argv[1:]]))
