"""What the trainer commands share (`megatron-opsd train | rl | sft`, each in its method's ``cli.py``): the flags,
the checks made once before any rank starts, and the launch.

Under torchrun/srun every process runs the command and joins the process group from the environment.
``--nproc N`` instead spawns N local processes (gloo on CPU), handy for a laptop or a quick TP=2 check. CLI
boundary code (docs/architecture.md): it imports what only a run needs inside its functions, so `--help` stays
light.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see examples/)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set loss.divergence=jsd (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint (the default when the run directory holds one; "
                             "checkpoint.resume=false refuses such a directory instead of overwriting it)")
    parser.add_argument("--nproc", type=int, default=0, help="spawn this many local processes (no torchrun)")
    parser.add_argument("--export-hf", dest="export_hf", default=None, metavar="DIR",
                        help="at the end, write the final model as an HF directory (= export.hf_dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra-style overrides")


def launch(args: argparse.Namespace, load_config_fn: Callable, entry: Callable,
           check_data_fn: Optional[Callable] = None) -> int:
    """Shared by train / rl / sft: config from --config + overrides, the checks (``check_data_fn``: the method's
    data check, default ``check_data``), then ``entry(cfg)`` on this process (under torchrun/srun) or on
    ``--nproc`` spawned local processes."""
    overrides = list(args.sets) + list(args.overrides)
    if args.export_hf:
        overrides.append(f"export.hf_dir={args.export_hf}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    cfg = load_config_fn(args.config, overrides)
    check_inputs(cfg)
    from megatron_opsd.training.rundir import refuse_overwrite  # megatron-core: not at `train --help`

    refuse_overwrite(cfg)  # before any rank starts
    (check_data_fn or check_data)(cfg)
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
    from megatron_opsd.models.layout import validate_layout
    from megatron_opsd.models.shape import ModelShape

    par = cfg.parallel
    par.refuse_unsupported()
    validate_layout(ModelShape.from_hf_config(model), par.tensor_model_parallel_size,
                    par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size)


def data_error(key: str, err: Exception):
    """A data file's error as a ConfigError naming ``key`` (once)."""
    from megatron_opsd.config import ConfigError

    return ConfigError(f"{key}: {err}" if not str(err).startswith(key) else str(err))


def require_train_path(d) -> None:
    """``data.train_path`` is set (every trainer's data section has one)."""
    if not d.train_path:
        from megatron_opsd.config import ConfigError

        raise ConfigError("data.train_path: not set; give a JSONL or Parquet file (data.train_path=FILE)")


def check_data(cfg) -> None:
    """The prompt data files (OPSD and GRPO), read once before any rank or sidecar starts, through the loaders the
    ranks use: the file exists, is not empty, every row parses and carries the configured fields (the prompt; for
    OPSD what each teacher context needs; an answer in ``data.eval_path`` when ``train.eval_every`` grades it).
    ConfigError naming the key; otherwise each rank would fail on it after the model loaded, each with its own
    traceback. SFT's conversations have their own check (``sft/cli.py``)."""
    from megatron_opsd.config import ConfigError
    from megatron_opsd.data.contexts import teacher_context_names, teacher_messages
    from megatron_opsd.data.datasets import load_prompt_dataset

    d = cfg.data
    require_train_path(d)
    try:
        examples = load_prompt_dataset(d.train_path, d)
    except (ValueError, OSError) as err:
        raise data_error("data.train_path", err) from err
    teacher = getattr(cfg, "teacher", None)  # GRPO has none
    for name in teacher_context_names(teacher) if teacher is not None else ():
        for ex in examples:  # a placeholder rollout: demonstration contexts get theirs at the step
            try:
                teacher_messages(ex, d, teacher, context=name, rollout="(a correct rollout)")
            except (ValueError, KeyError) as err:
                raise data_error("data.train_path", err) from err
    if cfg.train.eval_every:
        if not d.eval_path:
            raise ConfigError("data.eval_path: not set, but train.eval_every > 0 evaluates it; give a held-out "
                              "JSONL with problem/answer fields, or set train.eval_every=0")
        try:
            held_out = load_prompt_dataset(d.eval_path, d)
        except (ValueError, OSError) as err:
            raise data_error("data.eval_path", err) from err
        missing = next((ex.id for ex in held_out if ex.answer is None), None)
        if missing is not None:
            raise ConfigError(f"data.eval_path: example {missing!r} of {d.eval_path!r} has no {d.answer_field!r} "
                              "(data.answer_field) to grade against")
