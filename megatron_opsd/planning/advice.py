"""Advice when a plan does not fit: single changes of the config that lower the peak, and a greedy combination."""
from __future__ import annotations

from dataclasses import replace

from megatron_opsd.models.shape import ModelShape
from megatron_opsd.planning.layout import LayoutError, validate_layout
from megatron_opsd.planning.memory import estimate_memory
from megatron_opsd.planning.settings import Cluster, TrainSettings


def suggest_changes(shape: ModelShape, s: TrainSettings, cluster: Cluster) -> list:
    """Single changes that lower the peak, best first: ``[(description, peak_bytes, fits)]``."""
    current = estimate_memory(shape, s).peak_bytes
    return [(text, peak, fits) for text, peak, fits, _ in candidates(shape, s, cluster) if peak < current]


def combined_fix(shape: ModelShape, s: TrainSettings, cluster: Cluster, max_changes: int = 4) -> tuple:
    """Greedy: apply the single best change until the plan fits; ``(descriptions, peak_bytes)`` or ``([], peak)``."""
    steps, peak = [], estimate_memory(shape, s).peak_bytes
    while peak > cluster.budget and len(steps) < max_changes:
        options = [c for c in candidates(shape, s, cluster) if c[1] < peak]
        if not options:
            return [], peak
        text, peak, _, s = options[0]
        steps.append(text)
    return (steps, peak) if peak <= cluster.budget else ([], peak)


def candidates(shape: ModelShape, s: TrainSettings, cluster: Cluster) -> list:
    candidates = []
    if s.recompute is None:
        candidates.append(("model.recompute_granularity=selective", replace(s, recompute="selective")))
    if s.recompute != "full":
        candidates.append(("model.recompute_granularity=full", replace(s, recompute="full")))
    world = s.world_size
    for name, key, attr in (("TP", "parallel.tensor_model_parallel_size", "tensor_parallel"),
                            ("PP", "parallel.pipeline_model_parallel_size", "pipeline_parallel")):
        bigger = replace(s, **{attr: getattr(s, attr) * 2})
        if world % bigger.model_parallel == 0:
            bigger.data_parallel = world // bigger.model_parallel
            bigger.num_microbatches = s.num_microbatches * s.data_parallel // bigger.data_parallel
            candidates.append((f"{key}={getattr(bigger, attr)} (DP={bigger.data_parallel})", bigger))
    if s.micro_batch_size > 1:
        candidates.append((f"optim.micro_batch_size={s.micro_batch_size // 2}",
                           replace(s, micro_batch_size=s.micro_batch_size // 2,
                                   num_microbatches=s.num_microbatches * 2)))
    if s.tensor_parallel > 1 and not s.sequence_parallel:
        candidates.append(("parallel.sequence_parallel=true", replace(s, sequence_parallel=True)))
    if s.teacher_weights != "live":
        candidates.append(("teacher.weights=live (no teacher copy)", replace(s, teacher_weights="live")))
    if s.teacher_logits_held == "step" and s.num_microbatches > 1:
        candidates.append(("--teacher-logits microbatch (teacher forward per microbatch)",
                           replace(s, teacher_logits_held="microbatch")))
    if s.logits_bytes > 2:
        candidates.append(("--logits-bytes 2 (bf16 logits)", replace(s, logits_bytes=2)))
    out = []
    for text, candidate in candidates:
        try:
            validate_layout(shape, candidate)
        except LayoutError:
            continue
        peak = estimate_memory(shape, candidate).peak_bytes
        out.append((text, peak, peak <= cluster.budget, candidate))
    return sorted(out, key=lambda item: item[1])
