"""The plan as a fixed-width table (``megatron-opsd plan``, docs/benchmarks.md's tables)."""
from __future__ import annotations

from typing import Optional

from megatron_opsd.planning.memory import MemoryPlan
from megatron_opsd.planning.settings import GIB, Cluster


def format_plan(plan: MemoryPlan, cluster: Optional[Cluster] = None) -> str:
    """A fixed-width table: one column per distinct pipeline stage (first, middle, last), GiB."""
    s = plan.settings
    shown = sorted({0, len(plan.stages) // 2, len(plan.stages) - 1})
    stages = [plan.stages[i] for i in shown]
    names = list(dict.fromkeys(name for st in plan.stages for name in st.components))
    head = f"{'per GPU (GiB)':<22}" + "".join(f"{'stage ' + str(st.stage):>12}" for st in stages)
    lines = [
        f"model {plan.shape.name or '?'}: {plan.shape.total_params() / 1e9:.2f} B params; "
        f"TP={s.tensor_parallel} PP={s.pipeline_parallel}"
        + (f" VPP={s.virtual_pipeline}" if s.virtual_pipeline else "")
        + f" DP={s.data_parallel} SP={'on' if s.sequence_parallel else 'off'}; "
        f"micro-batch {s.micro_batch_size} x {s.seq_length} tokens, {s.num_microbatches} microbatches/step; "
        f"recompute={s.recompute or 'none'}; teacher={s.teacher_weights}; implementation={s.implementation}"
        + (f"; fp8={s.fp8}" if s.fp8 else "") + (f"; lora r={s.lora_rank}" if s.lora_rank else ""),
        head,
        "-" * len(head),
    ]
    lines.append(f"{'params (millions)':<22}" + "".join(f"{st.params / 1e6:>12.1f}" for st in stages))
    for name in names:
        lines.append(f"{name:<22}" + "".join(f"{st.components.get(name, 0) / GIB:>12.2f}" for st in stages))
    lines.append("-" * len(head))
    lines.append(f"{'total':<22}" + "".join(f"{st.total / GIB:>12.2f}" for st in stages))
    if cluster is not None:
        lines.append(f"budget: {cluster.budget / GIB:.1f} GiB per GPU ({cluster.usable_fraction:.0%} of "
                     f"{cluster.gpu_memory / GIB:.0f} GiB); peak stage {plan.peak.stage}: "
                     f"{plan.peak_bytes / GIB:.2f} GiB -> {'FITS' if plan.peak_bytes <= cluster.budget else 'DOES NOT FIT'}")
    return "\n".join(lines)
