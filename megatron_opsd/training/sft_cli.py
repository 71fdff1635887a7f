"""`megatron-opsd sft --config X.yaml [--export-hf DIR] [--set key=value ...] [key=value ...]`.

Under torchrun/srun every process runs this command and joins the process group from the environment.
``--nproc N`` instead spawns N local processes (gloo on CPU). ``--export-hf DIR`` (= ``export.hf_dir``) writes
the final model as an HF directory that ``megatron-opsd train`` (model.path) and the sidecar load.
"""
from __future__ import annotations

import argparse

from megatron_opsd.training.cli import add_arguments, launch  # the same flags as `train` (--export-hf included)

__all__ = ["add_arguments", "main", "run_sft"]


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.training.sft import load_sft_config

    return launch(args, load_sft_config, run_sft)


def run_sft(cfg) -> dict:
    """Entry point per process: fine-tune and return the last step's metrics."""
    from megatron_opsd.training.sft import train_sft

    history = train_sft(cfg)
    return history[-1] if history else {}
