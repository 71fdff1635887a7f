"""Pre-launch planning (``megatron-opsd plan``): per-GPU memory estimates (``memory``), the layout check
(``layout``), advice when the plan does not fit (``advice``) and its table (``table``); the model's shape is
``models.shape.ModelShape``, the settings and cluster ``settings``."""
from megatron_opsd.models.shape import ModelShape
from megatron_opsd.planning.advice import combined_fix, suggest_changes
from megatron_opsd.planning.layout import LayoutError, validate_layout
from megatron_opsd.planning.memory import MemoryPlan, activation_bytes_per_token_per_layer, estimate_memory
from megatron_opsd.planning.settings import Cluster, TrainSettings, parse_memory_size
from megatron_opsd.planning.table import format_plan

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
