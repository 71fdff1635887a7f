"""The one check of a parallel layout against a model's shape: where megatron-core cannot shard it.

Model building and the launcher's pre-flight check raise the first problem as a one-line ``UsageError``; the
planner (``planning/layout.py``) lists them all beside its own checks of the run and the cluster."""
from __future__ import annotations

from typing import Optional

from megatron_opsd.errors import UsageError
from megatron_opsd.models.shape import ModelShape


def divisors(n: int) -> str:
    """The sizes that divide ``n`` (up to 64), for the fix in a message."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def layout_problems(shape: ModelShape, tp: int, pp: int, vpp: Optional[int] = None) -> list[str]:
    """Every reason megatron cannot split this model over TP x PP (x VPP), each naming the field and the fix."""
    problems = []
    if shape.num_heads % tp:
        problems.append(f"parallel.tensor_model_parallel_size={tp}: {shape.num_heads} attention heads cannot be "
                        f"split evenly; use a TP that divides {shape.num_heads} ({divisors(shape.num_heads)})")
    if shape.num_kv_heads % tp:
        problems.append(f"parallel.tensor_model_parallel_size={tp}: {shape.num_kv_heads} KV heads (query groups) "
                        f"cannot be split evenly; use a TP that divides {shape.num_kv_heads} "
                        f"({divisors(shape.num_kv_heads)})")
    if vpp is not None and pp < 2:
        problems.append("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2; "
                        "set it to null")
    stages = pp * (vpp or 1)
    if shape.num_layers % stages:
        problems.append(f"parallel.pipeline_model_parallel_size={pp}: {shape.num_layers} layers cannot be split into "
                        f"PP x VPP = {stages} equal stages; use a pipeline size dividing {shape.num_layers} "
                        f"({divisors(shape.num_layers)})")
    return problems


def validate_layout(shape: ModelShape, tp: int, pp: int, vpp: Optional[int] = None) -> None:
    """Refuse a layout megatron cannot shard this model into: ``UsageError`` with the first problem and its fix."""
    problems = layout_problems(shape, tp, pp, vpp)
    if problems:
        raise UsageError(problems[0])
