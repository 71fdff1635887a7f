"""The one reader of a Hugging Face ``config.json``'s shape: which supported family it is and the numbers that size
and shard a decoder-only transformer.

Model building (``families.transformer_config_from_hf``, the weight recipes), the launcher's pre-flight layout
check and the memory planner all read the config through ``ModelShape.from_hf_config``, so a default (``head_dim``
= hidden / heads, ``num_key_value_heads`` = heads, a family's qk-norm / qkv-bias) is written once. Plain JSON or a
``transformers`` config object: the planner reads ``config.json`` without importing transformers or megatron.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from megatron_opsd.errors import UsageError


@dataclass(frozen=True)
class Family:
    name: str
    qk_layernorm: bool
    qkv_bias: bool


FAMILIES = {
    "qwen3": Family("qwen3", qk_layernorm=True, qkv_bias=False),
    "qwen2": Family("qwen2", qk_layernorm=False, qkv_bias=True),
    "llama": Family("llama", qk_layernorm=False, qkv_bias=False),
}
ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def config_dict(hf_config: Any) -> Mapping:
    """A ``transformers`` config (``to_dict``), a plain dict, or any object with attributes, as a mapping."""
    if isinstance(hf_config, Mapping):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return vars(hf_config)


def detect_family(hf_config: Any) -> str:
    """Family name from ``architectures`` (or ``model_type``); a clear error for anything else."""
    config = config_dict(hf_config)
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    raise UsageError(
        f"model.path: unsupported model: architectures={config.get('architectures')!r}, "
        f"model_type={model_type!r}; supported architectures are {sorted(ARCHITECTURES)}"
    )


def padded_vocab_size(vocab_size: int, tp: int, make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron's padding: the vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * TP``."""
    multiple = make_vocab_size_divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def read_config_json(path: Union[str, Path]) -> tuple[dict, str]:
    """``(config, model name)`` from a ``config.json`` path or an HF model directory (plain JSON)."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"model.path: {path} not found; point it at an HF model directory "
                                "(or one of examples/model_configs/*)")
    return json.loads(path.read_text()), path.parent.name


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an HF ``config.json`` that size a decoder-only transformer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False  # Qwen3
    qkv_bias: bool = False  # Qwen2
    gated_mlp: bool = True  # SwiGLU (all supported families); False = GPT-3 style 2-matrix MLP
    rope: bool = True  # RoPE makes new Q, K tensors that attention saves besides the QKV output
    name: str = ""

    @classmethod
    def from_hf_config(cls, config: Any, name: Optional[str] = None) -> "ModelShape":
        """From a ``config.json`` path or model directory, a config dict, or a ``transformers`` config object.

        The family (``detect_family``) gives qk-norm and qkv-bias; an unsupported architecture is refused here, as
        model building would."""
        if isinstance(config, (str, Path)):
            config, default_name = read_config_json(config)
            name = name or default_name
        config = config_dict(config)
        missing = [k for k in REQUIRED_KEYS if k not in config]
        if missing:
            raise ValueError(f"model config {name or ''} lacks {missing}; is it a decoder-only HF config.json?")
        family = FAMILIES[detect_family(config)]
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_layernorm=family.qk_layernorm,
            qkv_bias=family.qkv_bias,
            name=name or config.get("model_type", ""),
        )

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def padded_vocab(self, tp: int, divisible_by: int = 128) -> int:
        """The vocabulary as megatron pads it at this TP (``padded_vocab_size``)."""
        return padded_vocab_size(self.vocab_size, tp, divisible_by)

    def layer_gemm_params(self, tp: int = 1) -> int:
        """Weights of one layer's GEMMs (QKV, projection, MLP) held by one TP rank: what FP8 casts."""
        h, f = self.hidden_size, self.intermediate_size
        return (h * (self.q_width + 2 * self.kv_width) + self.q_width * h + h * f * (2 if self.gated_mlp else 1)
                + f * h) // tp

    def layer_params(self, tp: int = 1) -> int:
        """Parameters of one transformer layer held by one TP rank (norm weights are replicated)."""
        bias = (self.q_width + 2 * self.kv_width) // tp if self.qkv_bias else 0
        replicated = 2 * self.hidden_size + (2 * self.head_dim if self.qk_layernorm else 0)
        return self.layer_gemm_params(tp) + bias + replicated

    def total_params(self) -> int:
        """Unpadded parameter count (what the model card quotes)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params(1) + embeddings + self.hidden_size
