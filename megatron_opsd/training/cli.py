"""`megatron-opsd train --config X.yaml [--set key=value ...] [key=value ...]`.

Under torchrun/srun every process runs this command and joins the process group from the environment.
``--nproc N`` instead spawns N local processes (gloo on CPU), handy for a laptop or a quick TP=2 check.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see examples/)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set loss.divergence=jsd (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--nproc", type=int, default=0, help="spawn this many local processes (no torchrun)")
    parser.add_argument("--export-hf", dest="export_hf", default=None, metavar="DIR",
                        help="at the end, write the final model as an HF directory (= export.hf_dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra-style overrides")


def launch(args: argparse.Namespace, load_config_fn: Callable, entry: Callable) -> int:
    """Shared by train / rl / sft: config from --config + overrides, then ``entry(cfg)`` on this process (under
    torchrun/srun) or on ``--nproc`` spawned local processes."""
    overrides = list(args.sets) + list(args.overrides)
    if args.export_hf:
        overrides.append(f"export.hf_dir={args.export_hf}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    cfg = load_config_fn(args.config, overrides)
    check_inputs(cfg)
    if args.nproc:
        from megatron_opsd.parallel.launch import run_distributed

        run_distributed(entry, args.nproc, cfg.parallel, cfg)
    else:
        entry(cfg)
    return 0


def check_inputs(cfg) -> None:
    """The model directory and the parallel layout, checked once before any rank starts (otherwise every rank
    fails on them, each with its own traceback). Raises ConfigError naming the field."""
    from megatron_opsd.config import ConfigError

    model = Path(cfg.model.path) if cfg.model.path else None
    if model is None:
        raise ConfigError("model.path: not set; give the HF checkpoint directory to start from (model.path=DIR)")
    if not (model / "config.json").is_file():
        what = "does not exist" if not model.exists() else "has no config.json"
        raise ConfigError(f"model.path: {str(model)!r} {what}; give an HF checkpoint directory (config.json, "
                          "safetensors, tokenizer)")
    from megatron_opsd.models.families import validate_layout
    from megatron_opsd.models.gpt import load_hf_config

    par = cfg.parallel
    par.refuse_unsupported()
    validate_layout(load_hf_config(model), par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                    par.virtual_pipeline_model_parallel_size)


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.config import load_config

    return launch(args, load_config, run_trainer)


def run_trainer(cfg) -> dict:
    """Entry point per process: train (the CLI wires evaluation into training's ``train.eval_every`` hook: training
    never imports evaluation) and return the last step's metrics."""
    from megatron_opsd.evaluation.runner import evaluate_for_training
    from megatron_opsd.training.trainer import train

    history = train(cfg, evaluate=evaluate_for_training)
    return history[-1] if history else {}
