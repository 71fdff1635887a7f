"""`megatron-opsd demo`: the newcomer's main job on CPU.

Until the OPSD trainer lands, the demo builds a tiny random Qwen3 checkpoint locally and runs the model
parity check (our TP=2 megatron model vs transformers), which exercises the install end to end.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where the tiny checkpoint and results go")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the parity check")


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.models import check
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    model_dir = Path(args.out) / "tiny-qwen3"
    make_tiny_hf_checkpoint(model_dir, "qwen3")
    print(f"tiny Qwen3 checkpoint written to {model_dir}")
    return check.main(argparse.Namespace(model=str(model_dir), tp=args.tp, pp=1, tokens=16, tolerance=1e-4))
