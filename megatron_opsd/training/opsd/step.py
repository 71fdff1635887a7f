"""The OPSD step: ``opsd_step`` is the method, one optimizer step top to bottom (rollouts -> verify and filter ->
micro-batches -> teacher forward(s) -> target -> student forward/backward -> optimizer -> teacher update), then the
pieces only it uses: the teacher signal and the student's forward/backward through megatron's pipeline schedules.
The micro-batches are ``training/batches.py``'s (their layout is described there); the teacher's rows come from
``training/response_rows.py``; the trainer's state (teacher replica, EMA, LoRA adapters) is ``opsd/trainer.py``.

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

import random
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Union

import torch
from megatron.core import parallel_state as ps

from megatron_opsd.config import LossConfig
from megatron_opsd.data.sequences import horizon_at_step
from megatron_opsd.losses import (Objective, TeacherSignal, token_weights, truncated_importance_ratio,
                                  vocab_parallel_token_logprobs)
from megatron_opsd.parallel.device import sum_over_ranks
from megatron_opsd.rewards.filters import group_filter
from megatron_opsd.training.batches import add_per_token, response_microbatches, response_token_ids
from megatron_opsd.training.engine import optimizer_step, zero_grads
from megatron_opsd.training.loop import PhaseTimer
from megatron_opsd.training.response_rows import collect_response_rows, response_rows, tp_group
from megatron_opsd.training.rollouts import ROLLOUT_PHASES, StepRollouts, importance_clip
from megatron_opsd.training.schedule import forward_backward, recast_fp8_weights

if TYPE_CHECKING:
    from megatron_opsd.training.opsd.trainer import OPSDTrainer

__all__ = ["OPSD_PHASES", "distillation_rows", "make_objective", "opsd_metrics", "opsd_step",
           "student_forward_backward", "teacher_signal_source", "teacher_signals"]

OPSD_PHASES = (*ROLLOUT_PHASES, "time/filter", "time/batch", "time/teacher", "time/student", "time/optimizer",
               "time/teacher_update", "time/sync", "time/eval")


def opsd_step(t: "OPSDTrainer", timer: PhaseTimer) -> dict:
    """One OPSD optimizer step: rollouts -> verify and filter -> teacher forward(s) -> target -> student
    forward/backward -> optimizer -> teacher update. Returns the step's metrics (the loop pushes the new weights)."""
    cfg, run = t.cfg, t.run
    # rank 0: sample on the sidecar, verify (reward), encode the teacher prompts; broadcast to every rank
    rollouts = t.rollouts(timer)
    horizon = horizon_at_step(run.step, cfg.rollout)  # truncated (fixed) or progressive (growing) OPD
    keep, stats = distillation_rows(rollouts, cfg.rollout.filter, horizon, cfg.rollout.max_kept,
                                    seed=cfg.rollout.seed * 1_000_003 + run.step)
    stats.update(rollouts.stats)  # overlapped rollouts: staleness and timings
    timer.lap("time/filter")
    metrics = {"loss": 0.0, "divergence": 0.0}  # + entropy/* when logged (loss.log_entropy)
    if keep:
        # truncated OPD: student and teacher sequences end at prompt + h (causal attention: the logits before
        # the cut do not depend on the tokens after it, so this is exact and saves the forwards)
        responses = [rollouts.responses[i][j][:horizon] for i, j in keep]
        weights = token_weights([len(r) for r in responses], cfg.loss.reduction)
        layout = run.batch_layout(cfg.data.pad_to_multiple_of)
        prompts = [rollouts.student_prompts[i] for i, _ in keep]
        student_mbs = response_microbatches(prompts, responses, weights, **layout)
        # a full or top-k divergence is exact at each visited prefix: the ratio is for sampled-token losses
        clip = importance_clip(cfg.rollout, applies=cfg.loss.coverage == "sampled")
        if clip is not None:  # stale samples: the sidecar's log-probs of the (cut) responses
            behaviour = [torch.tensor(rollouts.logprobs[i][j][:horizon]) for i, j in keep]
            add_per_token(student_mbs, "behaviour_logprobs", prompts, responses, behaviour, **layout)
        teacher_mbs = {context: response_microbatches([prompts[i][j] for i, j in keep], responses, weights, **layout)
                       for context, prompts in rollouts.teachers.items()}  # three contexts for Purified OPSD
        timer.lap("time/batch")
        loss = cfg.loss
        # the target (teacher / PMI / DemoPSD) from the teacher forward(s); PP=1: the forwards run per
        # micro-batch inside the student's step (time/student includes them)
        signals = teacher_signal_source(t.teacher_model, teacher_mbs, student_mbs, loss=loss,
                                        real_vocab_size=run.real_vocab, teacher_scope=t.teacher_scope)
        timer.lap("time/teacher")
        zero_grads(run.ddp, run.optimizer)
        out = student_forward_backward(run.ddp, student_mbs, signals, loss=loss, real_vocab_size=run.real_vocab,
                                       importance_clip=clip)
        metrics.update(opsd_metrics(out.metrics, cfg.loss, weighted=clip is not None), loss=out.loss)
        timer.lap("time/student")
        metrics["grad_norm"] = float(optimizer_step(run.optimizer, run.scheduler)["grad_norm"] or 0.0)
        timer.lap("time/optimizer")
    t.update_teacher()
    timer.lap("time/teacher_update")
    return {**metrics, **stats}  # the loop pushes the weights, counts the step and evaluates


def distillation_rows(rollouts: StepRollouts, rollout_filter: str, horizon: Optional[int],
                      max_kept: Optional[int] = None, seed: int = 0) -> tuple[list, dict]:
    """The (prompt, rollout) pairs distilled on, and the step's rollout statistics: a rollout is kept if the
    filter keeps it and every teacher context exists for it (DemoPSD needs another correct rollout); with
    ``max_kept`` at most that many, a uniform subset drawn with ``seed`` (the same on every rank: the rollouts
    are broadcast first), so arms with different filters can train on equal budgets (``rollout/num_trained``)."""
    filtered = group_filter(rollouts.responses, rollouts.correct, rollout_filter)
    has_teacher = [[all(t[i][j] is not None for t in rollouts.teachers.values()) for j in range(len(g))]
                   for i, g in enumerate(rollouts.responses)]
    keep = [(i, j) for i, idx in enumerate(filtered.kept_indices) for j in idx if has_teacher[i][j]]
    stats = {f"rollout/{k}": v for k, v in filtered.stats.items()}
    stats["rollout/no_teacher"] = float(sum(len(idx) for idx in filtered.kept_indices) - len(keep))
    if max_kept is not None and len(keep) > max_kept:
        keep = sorted(random.Random(seed).sample(keep, max_kept))
    stats["rollout/num_trained"] = float(len(keep))
    lengths = sorted(len(r) for g in rollouts.responses for r in g)
    stats["rollout/length_p50"] = float(lengths[len(lengths) // 2])
    stats["rollout/length_p90"] = float(lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))])
    if horizon is not None:
        stats["rollout/horizon"] = float(horizon)
    return keep, stats


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
                rows[ctx] = collect_response_rows(teacher_model(ctx), mbs)
        return teacher_signals(rows, student_mbs, loss=loss, real_vocab_size=real_vocab_size)

    def signal_for(index: int) -> TeacherSignal:
        rows = {}
        for ctx, mbs in teacher_mbs.items():
            with teacher_scope(ctx):
                rows[ctx] = [response_rows(teacher_model(ctx)[0], mbs[index])]
        return teacher_signals(rows, [student_mbs[index]], loss=loss, real_vocab_size=real_vocab_size)[0]

    return signal_for


def make_objective(loss: LossConfig, real_vocab_size: int) -> Objective:
    """``loss`` on this rank's vocabulary shard (padded columns excluded)."""
    return Objective(loss, group=tp_group(), vocab_range=(0, real_vocab_size))


def teacher_signals(teacher_rows: dict, microbatches: list[dict], *, loss: LossConfig,
                    real_vocab_size: int) -> Optional[list[TeacherSignal]]:
    """Per student micro-batch, what its loss needs from the teacher forwards (last PP stage; None elsewhere).

    ``teacher_rows`` maps each teacher context to ``collect_response_rows``' output; the first entry is the
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

    ``signals``: ``teacher_signals``' output, (plain OPSD) the list of teacher rows from ``collect_response_rows``
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
