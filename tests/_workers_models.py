"""Per-rank worker functions for the model tests (top-level so run_distributed can pickle them)."""
import torch

from megatron_opsd.models.weights import logits_on_last_stage as our_logits  # noqa: F401


def export_round_trip(hf_dir: str, out_dir: str) -> None:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint, save_hf_checkpoint

    chunks = build_model(hf_dir)
    load_hf_checkpoint(chunks, hf_dir)
    save_hf_checkpoint(chunks, out_dir, source_dir=hf_dir)


def build_only(hf_dir: str) -> None:
    from megatron_opsd.models.gpt import build_model

    build_model(hf_dir)


def load_only(hf_dir: str) -> None:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint

    load_hf_checkpoint(build_model(hf_dir), hf_dir)
