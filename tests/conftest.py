"""Shared fixtures: tiny HF checkpoints built once per session."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VARIANTS = {
    "qwen3": dict(family="qwen3"),
    "qwen3_tied": dict(family="qwen3", tie_word_embeddings=True),
    "qwen2": dict(family="qwen2", hidden_size=128, tie_word_embeddings=True),
    "llama": dict(family="llama"),
    "qwen3_4l": dict(family="qwen3", num_layers=4),  # PP=2 x VPP=2 needs 4 layers
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> directory of a tiny random HF checkpoint (see TINY_VARIANTS)."""
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {name: str(make_tiny_hf_checkpoint(root / name, **kw)) for name, kw in TINY_VARIANTS.items()}
