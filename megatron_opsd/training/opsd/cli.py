"""`megatron-opsd train --config X.yaml [--set key=value ...] [key=value ...]`: OPSD on the rollout sidecar.

Under torchrun/srun every process runs this command and joins the process group from the environment.
``--nproc N`` instead spawns N local processes (gloo on CPU), handy for a laptop or a quick TP=2 check. The flags
and the checks before launch are the ones every trainer command shares (``training/cli.py``).
"""
from __future__ import annotations

import argparse

from megatron_opsd.training.cli import add_arguments, launch

__all__ = ["add_arguments", "main", "run_trainer"]


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.config import load_config

    return launch(args, load_config, run_trainer)


def run_trainer(cfg) -> dict:
    """Entry point per process: train (the CLI wires evaluation into training's ``train.eval_every`` hook: training
    never imports evaluation) and return the last step's metrics."""
    from megatron_opsd.evaluation.runner import evaluate_for_training
    from megatron_opsd.training.opsd.trainer import train

    history = train(cfg, evaluate=evaluate_for_training)
    return history[-1] if history else {}
