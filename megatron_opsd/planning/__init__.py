"""Pre-launch planning: per-GPU memory estimates and parallel-layout validation (``megatron-opsd plan``)."""
from megatron_opsd.planning.memory import (
    Cluster,
    LayoutError,
    MemoryPlan,
    ModelShape,
    TrainSettings,
    activation_bytes_per_token_per_layer,
    combined_fix,
    estimate_memory,
    format_plan,
    parse_memory_size,
    suggest_changes,
    validate_layout,
)

__all__ = [
    "Cluster",
    "LayoutError",
    "MemoryPlan",
    "ModelShape",
    "TrainSettings",
    "activation_bytes_per_token_per_layer",
    "combined_fix",
    "estimate_memory",
    "format_plan",
    "parse_memory_size",
    "suggest_changes",
    "validate_layout",
]
