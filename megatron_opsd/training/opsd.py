"""One OPSD optimizer step on already-built micro-batches, through megatron's pipeline schedules.

A micro-batch is a dict of tensors for one side (student or teacher):
  tokens [b, L], position_ids [b, L]       the model inputs (padded to the step's common length L)
  row_mask [b, L] (bool)                    the logits that predict response tokens (row-major order = token order)
  weights [n]                               per-token loss weights, already normalised over the whole step
and ``index`` (int), its position in the step's list, which the loss function reads to find its teacher signal.
Student row i and teacher row i predict the same response token (the realignment is done when building the
micro-batches), so the divergence compares like with like even when the teacher context is longer.

Loss normalisation: the step's loss is ``sum_t weights_t * D_t`` over every response token of the step
(``weights`` sum to 1 for token_mean and sequence_mean: ``losses.token_weights``), so the schedule runs with
``loss_reduction="sum"``.

The loss is ``cfg.loss`` (a ``LossConfig``) through ``losses.Objective``, its one dispatch: the target
(``loss.target``: teacher | pmi | demopsd) becomes a ``TeacherSignal`` per micro-batch, which the coverage
(``loss.coverage``: full | topk | sampled) and divergence (``loss.divergence``) consume. Purified OPSD's three
teacher forwards (context, reference_only, base) are reduced to that signal before the student forward
(``teacher_signals``), so one tensor is kept, not three; DemoPSD's target is built in the loss function from the
student's logits of this very forward.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Union

import torch
from megatron.core import parallel_state as ps

from megatron_opsd.config import LossConfig
from megatron_opsd.losses import (Objective, TeacherSignal, token_weights, truncated_importance_ratio,
                                  vocab_parallel_token_logprobs)
from megatron_opsd.parallel.device import sum_over_ranks, to_device
from megatron_opsd.training.schedule import (collect_logits, forward_backward, model_forward, recast_fp8_weights,
                                             select_positions)

__all__ = ["add_per_token", "build_microbatches", "collect_teacher_rows", "make_objective", "opsd_metrics",
           "response_rows", "response_token_ids", "rows_by_index", "student_forward_backward", "teacher_signal_source",
           "teacher_signals", "token_weights", "tp_group"]


def build_microbatches(prompts: list[list[int]], responses: list[list[int]], weights: list[torch.Tensor], *,
                       micro_batch_size: int, pad_id: int, pad_multiple: int = 8, microbatch_multiple: int = 1,
                       dp_size: int = 1, dp_rank: int = 0) -> list[dict]:
    """This DP rank's micro-batches for one side (student or teacher) of the step.

    Sequence i is ``prompts[i] + responses[i]``; the logit at position p predicts token p+1, so response token
    t is predicted by row ``len(prompts[i]) - 1 + t``. All micro-batches are padded to one length (megatron's
    schedules need fixed shapes), and the sequence count is padded with zero-weight dummies to a multiple of
    ``micro_batch_size * dp_size * microbatch_multiple`` so every DP rank runs the same number of micro-batches,
    a multiple of ``microbatch_multiple`` (``ParallelConfig.microbatch_multiple``: PP for an interleaved
    pipeline, whose schedule refuses other counts; how many rollouts a filter keeps varies). Built on the host,
    returned on the current device (``parallel.device.to_device``: the one place OPSD and GRPO batches move).
    """
    if not (len(prompts) == len(responses) == len(weights)):
        raise ValueError("prompts, responses and weights must have one entry per sequence")
    prompts, responses, weights = list(prompts), list(responses), list(weights)
    group = micro_batch_size * dp_size
    while len(prompts) % (group * microbatch_multiple):
        prompts.append([pad_id])
        responses.append([pad_id])
        weights.append(torch.zeros(1))
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    length = -(-longest // pad_multiple) * pad_multiple
    microbatches = []
    for start in range(dp_rank * micro_batch_size, len(prompts), group):
        tokens = torch.full((micro_batch_size, length), pad_id, dtype=torch.long)
        row_mask = torch.zeros((micro_batch_size, length), dtype=torch.bool)
        mb_weights = []
        for j in range(micro_batch_size):
            prompt, response = prompts[start + j], responses[start + j]
            if len(weights[start + j]) != len(response):
                raise ValueError(f"sequence {start + j}: {len(weights[start + j])} weights for "
                                 f"{len(response)} response tokens")
            seq = prompt + response
            tokens[j, : len(seq)] = torch.tensor(seq)
            row_mask[j, len(prompt) - 1: len(prompt) - 1 + len(response)] = True
            mb_weights.append(weights[start + j])
        microbatches.append(to_device({
            "index": len(microbatches),
            "tokens": tokens,
            "position_ids": torch.arange(length).unsqueeze(0).expand(micro_batch_size, -1).contiguous(),
            "row_mask": row_mask,
            "weights": torch.cat(mb_weights).float(),
        }))
    return microbatches


def add_per_token(microbatches: list[dict], key: str, prompts: list, responses: list, values: list,
                  **layout) -> None:
    """Store ``values`` (one tensor per response, one value per token) as ``mb[key]`` in the micro-batches'
    response-row layout (the same padding and DP split as ``build_microbatches``' weights)."""
    for mb, other in zip(microbatches, build_microbatches(prompts, responses, values, **layout)):
        mb[key] = other["weights"]


def collect_teacher_rows(teacher_chunks: list, microbatches: list[dict]) -> Optional[list]:
    """Teacher logits at the response rows of each micro-batch (local vocab shard), on the last PP stage
    (None elsewhere). Only the response rows are kept, so memory is [response tokens, V/TP] per step."""
    for chunk in teacher_chunks:
        chunk.eval()
    tokens = microbatches[0]["tokens"]
    return collect_logits(teacher_chunks, microbatches, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                          gather_positions_key="row_mask")


def teacher_signal_source(teacher_model: Callable[[str], list], teacher_mbs: dict, student_mbs: list, *,
                          loss: LossConfig, real_vocab_size: int,
                          teacher_scope: Callable[[str], ContextManager] = lambda context: nullcontext()):
    """What ``student_forward_backward`` reads the teacher from: per micro-batch at PP=1, per step at PP > 1.

    ``teacher_mbs`` maps each teacher context to its micro-batches (``teacher_signals``' order) and
    ``teacher_model(context)`` gives the model chunks that run that context (Purified OPSD's reference-only and
    base forwards run the frozen initial model, not the teacher replica); each forward of ``context`` runs inside
    ``teacher_scope(context)`` (LoRA: the adapters that context uses). At PP=1 the
    teacher forward of micro-batch i runs inside the student's loss for micro-batch i (a callable ``i -> signal``),
    so one micro-batch's teacher rows are alive at a time, as ``megatron-opsd plan`` assumes. At PP > 1 the
    teacher's forward is itself a pipeline and cannot run inside the student's 1F1B schedule: every micro-batch's
    teacher rows are collected first (a list), which the planner counts for PP > 1.

    Called once per step, after the previous step's teacher update (EMA, refresh, LoRA adapters, a resume): every
    teacher model first has TE re-cast its FP8 weights (``schedule.recast_fp8_weights``), since the PP=1 forwards
    below run outside megatron's schedules, which alone do that (at PP > 1 the schedule does it too).
    """
    for ctx in teacher_mbs:
        recast_fp8_weights(teacher_model(ctx))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        rows = {}
        for ctx, mbs in teacher_mbs.items():
            with teacher_scope(ctx):
                rows[ctx] = collect_teacher_rows(teacher_model(ctx), mbs)
        return teacher_signals(rows, student_mbs, loss=loss, real_vocab_size=real_vocab_size)

    def signal_for(index: int) -> TeacherSignal:
        rows = {}
        for ctx, mbs in teacher_mbs.items():
            with teacher_scope(ctx):
                rows[ctx] = [response_rows(teacher_model(ctx)[0], mbs[index])]
        return teacher_signals(rows, [student_mbs[index]], loss=loss, real_vocab_size=real_vocab_size)[0]

    return signal_for


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
    for the OPSD teacher (``teacher_signal_source``). Otherwise (PP > 1: the forward is itself a pipeline) every
    micro-batch's rows are collected here first, a collective on every stage; None off the last stage."""
    if per_microbatch is None:
        per_microbatch = ps.get_pipeline_model_parallel_world_size() == 1
    if not per_microbatch:
        rows = collect_teacher_rows(chunks, mbs) or [None] * len(mbs)
        return dict(zip((mb["index"] for mb in mbs), rows)).__getitem__
    recast_fp8_weights(chunks)  # the forwards below run outside megatron's schedules (see recast_fp8_weights)
    by_index = {mb["index"]: mb for mb in mbs}
    return lambda index: response_rows(chunks[0], by_index[index])


def tp_group():
    """The tensor-parallel group the vocabulary is sharded over, or None at TP=1 (the losses' one-process path)."""
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def make_objective(loss: LossConfig, real_vocab_size: int) -> Objective:
    """``loss`` on this rank's vocabulary shard (padded columns excluded)."""
    return Objective(loss, group=tp_group(), vocab_range=(0, real_vocab_size))


def response_token_ids(mb: dict) -> torch.Tensor:
    """The token each response row of micro-batch ``mb`` predicts (row p predicts token p + 1)."""
    return torch.roll(mb["tokens"], -1, dims=1)[mb["row_mask"]]


def teacher_signals(teacher_rows: dict, microbatches: list[dict], *, loss: LossConfig,
                    real_vocab_size: int) -> Optional[list[TeacherSignal]]:
    """Per student micro-batch, what its loss needs from the teacher forwards (last PP stage; None elsewhere).

    ``teacher_rows`` maps each teacher context to ``collect_teacher_rows``' output; the first entry is the
    privileged teacher (``teacher.context``), then ``reference_only`` and ``base`` for Purified OPSD. Where the
    target does not depend on the student only the coverage's compact part is kept (``Objective.teacher_signal``).
    """
    rows = list(teacher_rows.values())
    if rows[0] is None:
        return None
    objective = make_objective(loss, real_vocab_size)
    return [objective.teacher_signal([r[i] for r in rows], response_token_ids(mb), mb["weights"])
            for i, mb in enumerate(microbatches)]


SignalSource = Union[Callable[[int], TeacherSignal], list, None]


def student_forward_backward(ddp_chunks: list, microbatches: list[dict], signals: SignalSource, *,
                             loss: LossConfig, real_vocab_size: int, importance_clip: Optional[float] = None):
    """Forward + backward of the loss to the teacher signals (``schedule.ForwardBackwardOutput``).

    ``importance_clip`` (``rollout.importance_ratio: truncated``, sampled coverage): each token's weight times
    ``min(pi_S(y) / pi_behaviour(y), clip)``, the student's untempered log-prob against the sidecar's
    (``mb["behaviour_logprobs"]``); docs/losses.md, "Stale samples".

    ``signals``: ``teacher_signals``' output, (plain OPSD) the list of teacher rows from ``collect_teacher_rows``
    itself, or a callable ``index -> signal`` run in micro-batch ``index``'s loss (``teacher_signal_source``).
    """
    objective = make_objective(loss, real_vocab_size)

    def signal_at(index: int) -> TeacherSignal:
        if callable(signals):
            return signals(index)
        signal, mb = signals[index], microbatches[index]
        if isinstance(signal, TeacherSignal):
            return signal
        return objective.teacher_signal([signal], response_token_ids(mb), mb["weights"])  # plain teacher rows

    def loss_fn(logits: torch.Tensor, mb: dict):
        student, signal, weights = logits[mb["row_mask"]], signal_at(mb["index"]), mb["weights"]
        mask, metrics = weights > 0, {}
        if importance_clip is not None:
            current = vocab_parallel_token_logprobs(student.detach(), response_token_ids(mb), group=objective.group,
                                                    vocab_range=objective.vocab_range)
            ratio = truncated_importance_ratio(current, mb["behaviour_logprobs"], importance_clip)
            weights, metrics["importance_ratio_sum"] = weights * ratio, (ratio * mask).sum()
        weighted, per_token = objective.loss(student, signal, response_token_ids(mb), weights)
        metrics.update(divergence_sum=(per_token * mask).sum(), tokens=mask.sum().float())
        if objective.logs_entropy:
            metrics["student_entropy_sum"] = objective.entropy_sum(student, weights)
            metrics["teacher_entropy_sum"] = signal.teacher_entropy_sum
        return weighted, metrics

    for chunk in ddp_chunks:
        chunk.train()
    tokens = microbatches[0]["tokens"]
    return forward_backward(ddp_chunks, microbatches, loss_fn, seq_length=tokens.shape[1],
                            micro_batch_size=tokens.shape[0], loss_reduction="sum")


def opsd_metrics(per_microbatch: list, loss: LossConfig, weighted: bool = False) -> dict:
    """The step's divergence and (when logged) entropies per token, summed over micro-batches and DP ranks from
    the last stage's TP rank 0 (the other ranks hold copies or nothing), valid on every rank. ``weighted``: the
    step's tokens carried importance ratios (``student_forward_backward``'s ``importance_clip``); their mean is logged."""
    logs_entropy = Objective(loss).logs_entropy
    keys = ["divergence_sum", "tokens"] + (["student_entropy_sum", "teacher_entropy_sum"] if logs_entropy else [])
    keys += ["importance_ratio_sum"] if weighted else []
    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    sums = sum_over_ranks(per_microbatch, keys, owner=owner)
    n = max(sums["tokens"], 1.0)
    metrics = {"divergence": sums["divergence_sum"] / n, "tokens": sums["tokens"]}
    if weighted:
        metrics["rollout/importance_ratio"] = sums["importance_ratio_sum"] / n
    if logs_entropy:
        metrics.update({"entropy/student": sums["student_entropy_sum"] / n,
                        "entropy/teacher": sums["teacher_entropy_sum"] / n})
    return metrics
