"""`megatron-opsd rl --config X.yaml [--set key=value ...] [key=value ...]`: GRPO on the rollout sidecar.

Same launch model as `megatron-opsd train`: under torchrun/srun every process runs this command; ``--nproc N``
spawns N local processes (gloo on CPU). The config is an OPSD config plus an ``rl:`` section (training/grpo.py).
"""
from __future__ import annotations

import argparse

from megatron_opsd.training.cli import add_arguments  # the same flags as `train`

__all__ = ["add_arguments", "main", "run_rl_trainer"]


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.training.grpo import load_rl_config

    overrides = list(args.sets) + list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    cfg = load_rl_config(args.config, overrides)
    if args.nproc:
        from megatron_opsd.parallel.launch import run_distributed

        run_distributed(run_rl_trainer, args.nproc, cfg.parallel, cfg)
    else:
        run_rl_trainer(cfg)
    return 0


def run_rl_trainer(cfg) -> dict:
    """Entry point per process: GRPO-train and return the last step's metrics."""
    from megatron_opsd.training.rl_trainer import train_grpo

    history = train_grpo(cfg)
    return history[-1] if history else {}
