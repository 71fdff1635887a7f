"""`megatron-opsd rl --config X.yaml [--set key=value ...] [key=value ...]`: GRPO on the rollout sidecar.

Same launch model as `megatron-opsd train`: under torchrun/srun every process runs this command; ``--nproc N``
spawns N local processes (gloo on CPU). The config (``config.RLTrainConfig``) has the sections every trainer shares
plus ``rl:`` (checked by ``grpo/config.py``); no ``teacher:``/``loss:``.
"""
from __future__ import annotations

import argparse

from megatron_opsd.training.cli import add_arguments, launch  # the same flags as `train`

__all__ = ["add_arguments", "main", "run_rl_trainer"]


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.training.grpo.config import load_rl_config

    return launch(args, load_rl_config, run_rl_trainer)


def run_rl_trainer(cfg) -> dict:
    """Entry point per process: GRPO-train (evaluation wired into ``train.eval_every``) and return the last step's
    metrics."""
    from megatron_opsd.evaluation.runner import evaluate_for_training
    from megatron_opsd.training.grpo.trainer import train_grpo

    history = train_grpo(cfg, evaluate=evaluate_for_training)
    return history[-1] if history else {}
