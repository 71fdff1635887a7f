"""`megatron-opsd sft --config X.yaml [--export-hf DIR] [--set key=value ...] [key=value ...]`.

Under torchrun/srun every process runs this command and joins the process group from the environment.
``--nproc N`` instead spawns N local processes (gloo on CPU). ``--export-hf DIR`` (= ``export.hf_dir``) writes
the final model as an HF directory that ``megatron-opsd train`` (model.path) and the sidecar load.
"""
from __future__ import annotations

import argparse

from megatron_opsd.training.cli import add_arguments, data_error, launch, require_train_path  # `train`'s flags

__all__ = ["add_arguments", "check_sft_data", "main", "run_sft"]


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.training.sft.config import load_sft_config

    return launch(args, load_sft_config, run_sft, check_sft_data)


def check_sft_data(cfg) -> None:
    """``data.train_path``'s conversations, parsed once before any rank starts (tokenized, and length-checked, by
    the ranks); a bad file or row fails as a ConfigError naming the key."""
    from megatron_opsd.training.sft.data import read_sft_conversations

    require_train_path(cfg.data)
    try:
        read_sft_conversations(cfg.data)
    except (ValueError, OSError) as err:
        raise data_error("data.train_path", err) from err


def run_sft(cfg) -> dict:
    """Entry point per process: fine-tune and return the last step's metrics."""
    from megatron_opsd.training.sft.trainer import train_sft

    history = train_sft(cfg)
    return history[-1] if history else {}
