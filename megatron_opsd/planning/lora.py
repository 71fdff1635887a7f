"""What LoRA changes in the memory plan and the per-step weight sync (``model.lora``, docs/lora.md).

With adapters the base weights are frozen: no gradient buffer and no optimizer state for them, and the teacher is
the same model with its adapters switched (no replica; EMA / refresh adds one adapter set). Gradients, Adam state
(fp32 master copy + m + v) and the sync to the sidecar are the adapters'. The adapters' own activations ([tokens,
r] per adapted layer) are below the plan's resolution and left out.
"""
from __future__ import annotations

from megatron_opsd.models.lora import LORA_TARGETS


def lora_layer_params(shape, rank: int, tp: int = 1, targets=LORA_TARGETS) -> int:
    """Adapter parameters of one layer on one TP rank: a column layer's A is replicated and B split, a row
    layer's A split and B replicated (models/lora.py)."""
    h, f = shape.hidden_size, shape.intermediate_size
    qkv = shape.q_width + 2 * shape.kv_width
    fc1 = f * (2 if shape.gated_mlp else 1)
    per_target = {
        "linear_qkv": rank * h + qkv // tp * rank,
        "linear_proj": rank * (shape.q_width // tp) + h * rank,
        "linear_fc1": rank * h + fc1 // tp * rank,
        "linear_fc2": rank * (f // tp) + h * rank,
    }
    return sum(per_target[t] for t in targets)


def lora_total_params(shape, rank: int, targets=LORA_TARGETS) -> int:
    """Adapter parameters of the whole model (what one adapter push sends)."""
    return shape.num_layers * lora_layer_params(shape, rank, 1, targets)


def lora_stage_components(shape, s, base_params: int, components: dict) -> dict:
    """``components`` of one stage rank with LoRA: base weights frozen, training state only for the adapters."""
    adapters = shape.num_layers // s.pipeline_parallel * lora_layer_params(shape, s.lora_rank, s.tensor_parallel)
    grad_bytes = 4 if s.grad_reduce_in_fp32 else s.param_bytes
    optim_bytes = (4 if s.param_bytes < 4 else 0) + 8
    shards = s.data_parallel if s.use_distributed_optimizer else 1
    teacher_sets = 1 if s.teacher_weights in ("ema", "refresh") else 0
    return {**components,
            "student weights": (base_params + adapters) * s.param_bytes,
            "student grads": adapters * grad_bytes,
            "optimizer state": adapters * optim_bytes / shards,
            "teacher weights": teacher_sets * adapters * 4}  # the teacher set is fp32 (models.lora)


def sync_bytes(shape, s) -> dict:
    """Bytes one step pushes to a sidecar (16-bit weights): merged full weights vs the adapters alone."""
    merged = shape.total_params() * 2
    adapter = lora_total_params(shape, s.lora_rank) * 2 if s.lora_rank else None
    return {"merged": merged, "adapter": adapter}
