"""`megatron-opsd export --checkpoint C --out HF_DIR`: a training checkpoint to a Hugging Face directory.

The checkpoint's own config.yaml names the base model (for the architecture and tokenizer) and the parallel
layout it was saved with; dist_checkpointing reshards on load, so ``--tp/--pp`` may differ from training.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from megatron_opsd.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a step-N checkpoint directory, or the checkpoints root (its latest is used)")
    parser.add_argument("--out", required=True, help="HF directory to write (atomically)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load with (local processes)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load with")
    parser.add_argument("--peft-out", default=None,
                        help="LoRA runs: also write the adapters alone in PEFT format (adapter_config.json + "
                             "adapter_model.safetensors) to this directory; --out gets base + scale * B A merged")


def resolve_checkpoint(path: str | Path) -> Path:
    from megatron_opsd.training.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "config.yaml").exists() and path.name.startswith("step-"):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise UsageError(f"--checkpoint {path}: no complete step-N checkpoint there")
    return found


def refuse_peft_without_lora(step_dir: Path) -> None:
    """``--peft-out`` needs a LoRA run: checked before any process starts (UsageError: one line, exit 2)."""
    import yaml

    saved = yaml.safe_load((step_dir / "config.yaml").read_text()) or {}
    if not ((saved.get("model") or {}).get("lora") or {}).get("rank"):
        raise UsageError(f"--peft-out: {step_dir} is not a LoRA run (its model.lora.rank is 0); export it with "
                         "--out alone")


def export_worker(checkpoint: str, out: str, peft_out: Optional[str] = None) -> None:
    """Per rank: build the base model, load the checkpoint's weights (no optimizer), write the HF directory.

    Only the ``model`` section of the checkpoint's config is read, so OPSD, GRPO and SFT checkpoints all export.
    A LoRA run (``model.lora.rank > 0``) exports merged weights, and with ``peft_out`` its adapters too."""
    import yaml

    from megatron_opsd.config import ModelConfig, from_dict
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.lora import LoRASettings
    from megatron_opsd.models.weights import save_hf_checkpoint
    from megatron_opsd.training.checkpoint import load_checkpoint

    saved = yaml.safe_load((Path(checkpoint) / "config.yaml").read_text()) or {}
    model = from_dict(ModelConfig, saved.get("model", {}), prefix="model")
    lora = LoRASettings.from_config(model.lora)
    chunks = build_model(model.path, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by, lora=lora)
    load_checkpoint(checkpoint, chunks, restore_rng=False)
    save_hf_checkpoint(chunks, out, source_dir=model.tokenizer or model.path)
    if peft_out:
        from megatron_opsd.models.lora_peft import save_peft_adapter

        save_peft_adapter(chunks, peft_out, lora, base_model=model.path)


def export_checkpoint(checkpoint: str | Path, out: str | Path, tp: int = 1, pp: int = 1,
                      peft_out: Optional[str | Path] = None) -> Path:
    """Export a step-N checkpoint (or a checkpoints root's latest) to the HF directory ``out`` (and a LoRA run's
    adapters to ``peft_out``); returns ``out``."""
    from megatron_opsd.parallel import ParallelConfig
    from megatron_opsd.parallel.launch import run_distributed

    step_dir = resolve_checkpoint(checkpoint)
    if peft_out:
        refuse_peft_without_lora(step_dir)
    cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    run_distributed(export_worker, tp * pp, cfg, str(step_dir), str(out), str(peft_out) if peft_out else None)
    print(f"exported {step_dir} to {out}")
    return Path(out)


def main(args: argparse.Namespace) -> int:
    export_checkpoint(args.checkpoint, args.out, args.tp, args.pp, getattr(args, "peft_out", None))
    return 0
