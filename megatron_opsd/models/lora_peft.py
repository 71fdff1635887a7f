"""LoRA adapters <-> PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT names a factor ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ([r, in]; lora_B
[out, r]) and scales by ``lora_alpha / r``. Megatron's fused layers map onto PEFT's separate projections with
weights.py's own recipes: a fused column layer's B is split like its base weight (``qkv`` per query group,
``fc1`` gate/up), and its one A is written under every projection it feeds (q, k and v share A: PEFT computes
exactly ``B_q A x``, ``B_k A x``, ``B_v A x``). Loading therefore needs equal A's for q/k/v and for gate/up.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import torch

from megatron_opsd.models.lora import LoRASettings, lora_recipes, peft_target_modules
from megatron_opsd.models.weights import full_tensors, gather_tp, hf_tensor_shapes, local_shard, replace_dir, unwrap
from megatron_opsd.parallel import control

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class _TensorReader:
    """weights.py's reader interface over a dict of full HF-named tensors."""

    def __init__(self, tensors: dict, source: str):
        self.tensors, self.source = tensors, source

    def slice(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"{self.source} has no tensor {name!r}: is model.lora.targets the adapter's target_modules?")
        return self.tensors[name]

    def shape(self, name: str) -> tuple:
        return tuple(self.slice(name).shape)


def load_lora_tensors(model_chunks: list, tensors: dict, source: str = "adapter") -> None:
    """Copy this rank's shards of full HF-named adapter tensors (PEFT names without ``base_model.model.``)."""
    from megatron.core import parallel_state as ps

    reader = _TensorReader(tensors, source)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for chunk in model_chunks:
        for recipe in lora_recipes(chunk):
            if recipe.sharding == "shared" and any(not torch.equal(reader.slice(n), reader.slice(recipe.hf_names[0]))
                                               for n in recipe.hf_names[1:]):
                raise ValueError(f"{source}: {', '.join(recipe.hf_names)} differ, but megatron's fused layer has one "
                                 "A for them; train the adapter here or with one shared A")
            shard = local_shard(recipe, reader, unwrap(chunk).hf_config, tp, rank)
            if tuple(shard.shape) != tuple(recipe.param.shape):
                raise ValueError(f"{source}: {recipe.hf_names[0]} gives a shard of shape {tuple(shard.shape)}, the "
                                 f"adapter has {tuple(recipe.param.shape)}: does model.lora.rank match its r?")
            with torch.no_grad():
                recipe.param.copy_(shard.to(recipe.param.dtype))


def init_lora_(model_chunks: list, seed: int = 0, b_std: float = 0.0) -> None:
    """PEFT's initialisation, identical at every TP/PP layout: A ~ kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(in)),
    B = 0, so training starts at the base model. ``b_std > 0`` draws B ~ N(0, b_std) instead (tests: a non-zero
    update makes A's gradient non-zero). Each full tensor comes from its own generator seeded by its name."""
    tensors = {}
    for chunk in model_chunks:
        for recipe in lora_recipes(chunk):
            full = _full_shapes(recipe, unwrap(chunk).hf_config)
            for name, shape in full.items():
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                if recipe.hf_names[0].endswith("lora_A.weight"):
                    bound = 1.0 / math.sqrt(shape[1])
                    tensors[name] = (torch.rand(shape, generator=g) * 2 - 1) * bound
                else:
                    tensors[name] = torch.randn(shape, generator=g) * b_std
            if recipe.sharding == "shared":
                for name in recipe.hf_names[1:]:
                    tensors[name] = tensors[recipe.hf_names[0]]
    load_lora_tensors(model_chunks, tensors, "init_lora_")


def _full_shapes(recipe, hf_config) -> dict:
    """Full HF shape of each tensor of a LoRA recipe (only the first name of a ``shared`` one)."""
    base = hf_tensor_shapes(hf_config)
    is_a = recipe.hf_names[0].endswith("lora_A.weight")
    rank = recipe.param.shape[0] if is_a else recipe.param.shape[1]
    shapes = {}
    for name in recipe.hf_names[:1] if recipe.sharding == "shared" else recipe.hf_names:
        out_dim, in_dim = base[name.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")]
        shapes[name] = (rank, in_dim) if is_a else (out_dim, rank)
    return shapes


def gather_lora_tensors(model_chunks: list, *, grads: bool = False, dst_rank: int = 0) -> Optional[dict]:
    """COLLECTIVE: every adapter factor (or its gradient, ``main_grad`` at DP=1: tests) as full HF-named CPU
    tensors on ``dst_rank``, None elsewhere. Adapters are small (r x hidden per layer), so each stage's TP-rank-0
    sends its whole set as one object."""
    from megatron.core import parallel_state as ps

    local = {}
    for chunk in model_chunks:
        for recipe in lora_recipes(chunk):
            t = recipe.param.detach()
            if grads:
                t = getattr(recipe.param, "main_grad", None)
                t = recipe.param.grad if t is None else t
            shards = [t] if recipe.sharding in ("copy", "shared") else gather_tp(t.contiguous())
            full = full_tensors(recipe, shards, unwrap(chunk).hf_config)
            local.update({k: v.float().cpu().clone() for k, v in full.items()})
    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        local = {}
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size() if dist.get_rank() == dst_rank else None
    dist.gather_object(local, parts, dst=dst_rank)
    if dist.get_rank() != dst_rank:
        return None
    return {k: v for part in parts for k, v in part.items()}


def peft_adapter_config(settings: LoRASettings, base_model: str) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
            "lora_dropout": settings.dropout, "target_modules": peft_target_modules(settings), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base_model}


def save_peft_adapter(model_chunks: list, out_dir, settings: LoRASettings, base_model: str = "",
                      dst_rank: int = 0) -> None:
    """COLLECTIVE: write ``out_dir`` (adapter_config.json + adapter_model.safetensors) atomically on ``dst_rank``."""
    from safetensors.torch import save_file

    tensors = gather_lora_tensors(model_chunks, dst_rank=dst_rank)
    if tensors is not None:
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            save_file({PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(settings, base_model), indent=2))
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    control.barrier()  # the others wait (gloo, long timeout) while rank 0 writes
