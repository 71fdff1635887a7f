"""No-grad forwards kept at the response rows (the logits that predict response tokens, this rank's vocabulary
shard): OPSD's teacher, GRPO's reference and recomputed behaviour log-probs. ``collect_response_rows`` runs a
whole step's micro-batches through megatron's forward-only schedule (any PP); ``response_rows`` is one
micro-batch's forward outside the schedules (PP = 1), asked for inside the student's loss so one micro-batch's
rows are alive at a time (``rows_by_index``); ``tp_group`` is the group the rows' vocabulary is sharded over.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps

from megatron_opsd.training.schedule import collect_logits, model_forward, recast_fp8_weights, select_positions

__all__ = ["collect_response_rows", "response_rows", "rows_by_index", "tp_group"]


def collect_response_rows(chunks: list, microbatches: list[dict]) -> Optional[list]:
    """Logits at the response rows of each micro-batch (local vocab shard), on the last PP stage
    (None elsewhere). Only the response rows are kept, so memory is [response tokens, V/TP] per step."""
    for chunk in chunks:
        chunk.eval()
    tokens = microbatches[0]["tokens"]
    return collect_logits(chunks, microbatches, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                          gather_positions_key="row_mask")


@torch.no_grad()
def response_rows(chunk, mb: dict) -> torch.Tensor:
    """A no-grad forward of one micro-batch (PP=1: the OPSD teacher, GRPO's reference) in eval mode, kept at its
    response rows only. The chunk may be the student itself (teacher.weights=live): its training mode is restored."""
    was_training = chunk.training
    chunk.eval()
    try:
        return select_positions(model_forward(chunk, mb), mb["row_mask"])
    finally:
        chunk.train(was_training)


def rows_by_index(chunks: list, mbs: list, per_microbatch: Optional[bool] = None
                  ) -> Callable[[int], Optional[torch.Tensor]]:
    """``index -> `` the response rows (local vocabulary shard) of micro-batch ``index`` under ``chunks`` (GRPO's
    reference and recomputed log-probs), on the last stage. ``per_microbatch`` (default: PP=1) computes each when
    asked, one no-grad forward: asked inside a micro-batch's loss, one micro-batch's rows are alive at a time, as
    for the OPSD teacher (``opsd/step.py`` ``teacher_signal_source``). Otherwise (PP > 1: the forward is itself a
    pipeline) every micro-batch's rows are collected here first, a collective on every stage; None off the last
    stage."""
    if per_microbatch is None:
        per_microbatch = ps.get_pipeline_model_parallel_world_size() == 1
    if not per_microbatch:
        rows = collect_response_rows(chunks, mbs) or [None] * len(mbs)
        return dict(zip((mb["index"] for mb in mbs), rows)).__getitem__
    recast_fp8_weights(chunks)  # the forwards below run outside megatron's schedules (see recast_fp8_weights)
    by_index = {mb["index"]: mb for mb in mbs}
    return lambda index: response_rows(chunks[0], by_index[index])


def tp_group():
    """The tensor-parallel group the vocabulary is sharded over, or None at TP=1 (the losses' one-process path)."""
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
