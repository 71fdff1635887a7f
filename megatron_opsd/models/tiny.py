"""Tiny random-initialised Hugging Face checkpoints of the families we support, built locally.

No model hub is reachable from CI, so tests and the CPU demo create real HF checkpoints (config.json,
model.safetensors, tokenizer files) with ``transformers`` itself and random weights. ``head_dim`` defaults
to 32 because vLLM's CPU attention supports head_dim >= 32 only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_opsd.models.tokenizer_train import train_bpe_tokenizer

FAMILIES = ("qwen3", "qwen2", "llama")


def tiny_hf_config(family: str = "qwen3", *, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 128,
                   tie_word_embeddings: bool = False, max_position_embeddings: int = 512,
                   rope_theta: float = 10000.0, eos_token_id: Optional[int] = None,
                   pad_token_id: Optional[int] = None):
    """A ``transformers`` config for a tiny model of ``family`` (qwen3 | qwen2 | llama)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6, eos_token_id=eos_token_id, pad_token_id=pad_token_id, dtype="float32",
    )
    if family == "qwen3":
        return Qwen3Config(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                           architectures=["Qwen3ForCausalLM"], **common)
    if family == "qwen2":
        if hidden_size != num_heads * head_dim:
            raise ValueError("qwen2 derives head_dim = hidden_size / num_heads; pass hidden_size = num_heads * head_dim")
        return Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                           architectures=["Qwen2ForCausalLM"], **common)
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": max_position_embeddings // 4}
        return LlamaConfig(head_dim=head_dim, rope_parameters=rope, attention_bias=False, mlp_bias=False,
                           architectures=["LlamaForCausalLM"], **common)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def make_tiny_hf_checkpoint(out_dir: str | Path, family: str = "qwen3", *, seed: int = 0,
                            tokenizer_texts: Iterable[str] = (), tokenizer_vocab_size: int = 512,
                            init_std: float = 0.02, **config_kwargs) -> Path:
    """Write a random tiny HF checkpoint (weights + trained BPE tokenizer with chat template) to ``out_dir``.

    The tokenizer is trained first so the model's vocabulary matches it exactly (plus any padding the caller
    asks for through ``vocab_size``).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = train_bpe_tokenizer(tokenizer_texts, out_dir, vocab_size=tokenizer_vocab_size)
    config_kwargs.setdefault("vocab_size", len(tok))
    if config_kwargs["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {config_kwargs['vocab_size']} is smaller than the tokenizer ({len(tok)})")
    config_kwargs.setdefault("eos_token_id", tok.eos_token_id)
    config_kwargs.setdefault("pad_token_id", tok.pad_token_id)
    config = tiny_hf_config(family, **config_kwargs)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms/biases so parity tests exercise them, not just ones and zeros
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
