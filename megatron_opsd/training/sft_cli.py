"""`megatron-opsd sft --config X.yaml [--export-hf DIR] [--set key=value ...] [key=value ...]`.

Under torchrun/srun every process runs this command and joins the process group from the environment.
``--nproc N`` instead spawns N local processes (gloo on CPU). ``--export-hf DIR`` (= ``export.hf_dir``) writes
the final model as an HF directory that ``megatron-opsd train`` (model.path) and the sidecar load.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see examples/sft_tiny.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=1e-5 (repeatable)")
    parser.add_argument("--export-hf", dest="export_hf", default=None, metavar="DIR",
                        help="write the final model as an HF directory (export.hf_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--nproc", type=int, default=0, help="spawn this many local processes (no torchrun)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra-style overrides")


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.training.cli import launch
    from megatron_opsd.training.sft import load_sft_config

    return launch(args, load_sft_config, run_sft, [f"export.hf_dir={args.export_hf}"] if args.export_hf else [])


def run_sft(cfg) -> dict:
    """Entry point per process: fine-tune and return the last step's metrics."""
    from megatron_opsd.training.sft import train_sft

    history = train_sft(cfg)
    return history[-1] if history else {}
