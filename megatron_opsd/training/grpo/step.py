"""The GRPO step: ``grpo_step`` is the method, one optimizer step top to bottom (rollouts -> rewards, group
advantages -> behaviour and reference log-probs -> clipped policy loss [+ KL to the reference] -> optimizer), then
the pieces only it uses. The maths is in ``grpo/algorithm.py``; the trainer's state (sampler, reward, reference
model) is ``grpo/trainer.py``.

Log-probs are the raw model's (temperature 1), as the sidecar returns them, on both sides of the ratio.
"""
from __future__ import annotations

from statistics import fmean
from typing import TYPE_CHECKING, Callable, Optional

import torch
from megatron.core import parallel_state as ps

from megatron_opsd.config import RLConfig
from megatron_opsd.losses import (truncated_importance_ratio, vocab_parallel_divergence, vocab_parallel_entropy,
                                  vocab_parallel_token_logprobs)
from megatron_opsd.parallel.device import sum_over_ranks
from megatron_opsd.rewards.filters import group_filter
from megatron_opsd.training.batches import add_per_token, response_microbatches, response_token_ids
from megatron_opsd.training.engine import optimizer_step, zero_grads
from megatron_opsd.training.grpo.algorithm import clipped_policy_loss, k3_kl, rollout_weights, step_rewards
from megatron_opsd.training.loop import PhaseTimer
from megatron_opsd.training.response_rows import rows_by_index, tp_group
from megatron_opsd.training.rollouts import ROLLOUT_PHASES, StepRollouts, importance_clip
from megatron_opsd.training.schedule import forward_backward

if TYPE_CHECKING:
    from megatron_opsd.training.grpo.trainer import GRPOTrainer

__all__ = ["GRPO_PHASES", "advantage_microbatches", "grpo_step", "policy_loss_fn", "policy_metrics",
           "reference_signal", "replace_old_logprobs", "token_logprobs"]

GRPO_PHASES = (*ROLLOUT_PHASES, "time/filter", "time/batch", "time/old_and_ref", "time/policy", "time/optimizer",
               "time/sync", "time/eval")
POLICY_SUMS = ("tokens", "clipped", "ratio_sum", "kl_sum", "entropy_sum", "importance_sum")


def grpo_step(t: "GRPOTrainer", timer: PhaseTimer) -> dict:
    """One GRPO step: rollouts -> rewards, (overlong shaping), group advantages, (dynamic sampling) -> behaviour
    and reference log-probs -> clipped policy loss [+ KL to the reference] -> optimizer. Returns the step's
    metrics (the loop pushes the new weights)."""
    cfg, rl, run = t.cfg, t.cfg.rl, t.run
    rollouts = t.rollouts(timer)  # rank 0: sample on the sidecar, verify (reward); broadcast to every rank
    lengths = [[len(y) for y in ys] for ys in rollouts.responses]
    grouped = step_rewards(rollouts.rewards, rollouts.correct, lengths, rl, cfg.rollout.max_tokens)
    keep = [(i, j) for i, ok in enumerate(grouped.used) if ok for j in range(len(rollouts.responses[i]))]
    stats = {f"rollout/{k}": v for k, v in group_filter(rollouts.responses, rollouts.correct, "all").stats.items()}
    stats.update({"reward/mean": fmean(r for g in rollouts.rewards for r in g),
                  "reward/shaped_mean": fmean(r for g in grouped.shaped for r in g),
                  "rl/groups_kept": sum(grouped.used) / len(grouped.used), "rl/num_trained": float(len(keep)),
                  **rollouts.stats})
    timer.lap("time/filter")
    metrics = {"loss": 0.0, "divergence": 0.0, "tokens": 0.0}
    if keep:
        mbs = advantage_microbatches(rollouts, keep, grouped.advantages, rl,
                                     run.batch_layout(cfg.data.pad_to_multiple_of))
        timer.lap("time/batch")
        behaviour, clip = {"logprob_diff_sum": 0.0}, importance_clip(cfg.rollout)
        if rl.recompute_old_logprobs or clip is not None:  # megatron's log-probs under the current (pre-update)
            recomputed = token_logprobs(run.ddp, mbs, run.real_vocab)  # weights: the sampling ones when on-policy
            if clip is not None:  # decoupled PPO: the ratio to them, weighted by min(their / the sidecar's, clip)
                for mb, lp in zip(mbs, recomputed or []):
                    mb["importance_weights"] = truncated_importance_ratio(lp, mb["old_logprobs"], clip)
            behaviour["logprob_diff_sum"] = replace_old_logprobs(mbs, recomputed)
        ref_rows = reference_signal(t.reference, mbs, rl, run.real_vocab)
        timer.lap("time/old_and_ref")
        for chunk in run.ddp:
            chunk.train()
        zero_grads(run.ddp, run.optimizer)
        tokens = mbs[0]["tokens"]
        out = forward_backward(run.ddp, mbs, policy_loss_fn(rl, run.real_vocab, ref_rows), seq_length=tokens.shape[1],
                               micro_batch_size=tokens.shape[0], loss_reduction="sum")
        metrics.update(policy_metrics(out, behaviour, rl, clip is not None))
        timer.lap("time/policy")
        metrics["grad_norm"] = float(optimizer_step(run.optimizer, run.scheduler)["grad_norm"] or 0.0)
        timer.lap("time/optimizer")
    return {**metrics, **stats}  # the loop pushes the weights, counts the step and evaluates


def _last_stage_owner() -> bool:
    """The rank that holds a micro-batch's reduced numbers: last pipeline stage, TP rank 0."""
    return ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0


def advantage_microbatches(rollouts: StepRollouts, keep: list, advantages: list, rl: RLConfig,
                           layout: dict) -> list:
    """The kept rollouts' micro-batches (``batches.response_microbatches``) with each response token's loss
    ``weights`` and, in the same layout (``batches.add_per_token``), its rollout's ``advantages``, the sidecar's
    ``old_logprobs``, and the ``targets`` (the response token ids)."""
    responses = [rollouts.responses[i][j] for i, j in keep]
    prompts = [rollouts.student_prompts[i] for i, _ in keep]
    old = [torch.tensor(rollouts.logprobs[i][j], dtype=torch.float32) for i, j in keep]
    for (i, j), lp, r in zip(keep, old, responses):
        if len(lp) != len(r):
            raise RuntimeError(f"rollout {i}/{j}: the sidecar returned {len(lp)} log-probs for {len(r)} tokens")
    weights = rollout_weights([len(r) for r in responses], rl.token_level_loss)
    mbs = response_microbatches(prompts, responses, weights, **layout)
    add_per_token(mbs, "advantages", prompts, responses,
                  [torch.full((len(r),), float(advantages[i][j])) for (i, j), r in zip(keep, responses)], **layout)
    add_per_token(mbs, "old_logprobs", prompts, responses, old, **layout)
    for mb in mbs:
        mb["targets"] = response_token_ids(mb)
    return mbs


def token_logprobs(chunks: list, mbs: list, real_vocab: int) -> Optional[list]:
    """Forward-only log-probs of each micro-batch's response tokens (last PP stage; None elsewhere). At PP=1 one
    micro-batch's full-vocabulary rows exist at a time (``rows_by_index``)."""
    rows = rows_by_index(chunks, mbs)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [vocab_parallel_token_logprobs(rows(mb["index"]), mb["targets"], group=tp_group(),
                                          vocab_range=(0, real_vocab)) for mb in mbs]


def replace_old_logprobs(mbs: list, recomputed: Optional[list]) -> float:
    """Use megatron's recomputed behaviour log-probs; returns this rank's summed |recomputed - sidecar| (0 off the
    owning rank)."""
    diff = 0.0
    for mb, lp in zip(mbs, recomputed or []):
        if _last_stage_owner():
            diff += float(((lp - mb["old_logprobs"]).abs() * (mb["weights"] > 0)).sum())
        mb["old_logprobs"] = lp
    return diff


def reference_signal(reference: Optional[list], mbs: list, rl: RLConfig, real_vocab: int) -> Optional[Callable]:
    """The KL's reference side: ``index -> `` the full rows of that micro-batch (``kl_estimator=full``; at PP=1
    computed inside its loss, so one micro-batch's reference rows are alive at a time, as OPSD's teacher), or token
    log-probs stored as ``mb["ref_logprobs"]`` (k3 / k1); nothing without ``rl.kl_coef``."""
    if rl.kl_coef <= 0:
        return None
    if rl.kl_estimator == "full":
        return rows_by_index(reference, mbs)
    for mb, lp in zip(mbs, token_logprobs(reference, mbs, real_vocab) or []):
        mb["ref_logprobs"] = lp
    return None


def policy_loss_fn(rl: RLConfig, real_vocab: int, ref_rows: Optional[Callable]):
    """``loss_fn(logits, mb)`` for the schedule: clipped policy loss [+ kl_coef * KL], and the sums it logs."""
    group, vocab_range = tp_group(), (0, real_vocab)

    def loss_fn(logits: torch.Tensor, mb: dict):
        rows, mask, weights = logits[mb["row_mask"]], mb["weights"] > 0, mb["weights"]
        importance = mb.get("importance_weights", torch.ones_like(weights))
        weights = weights * importance
        logp = vocab_parallel_token_logprobs(rows, mb["targets"], group=group, vocab_range=vocab_range)
        loss, clipped = clipped_policy_loss(logp, mb["old_logprobs"], mb["advantages"], weights,
                                            eps_low=rl.clip_eps_low, eps_high=rl.clip_eps_high)
        kl = torch.zeros_like(logp, dtype=torch.float32)
        if rl.kl_coef > 0 and rl.kl_estimator == "full":
            weighted, kl = vocab_parallel_divergence(
                rows, ref_rows(mb["index"]), kind="reverse_kl", group=group, loss_mask=mask,
                chunk_tokens=rl.chunk_tokens, vocab_range=vocab_range, reduction="sum", token_weights=weights)
            loss = loss + rl.kl_coef * weighted
        elif rl.kl_coef > 0:
            ref = mb["ref_logprobs"]
            kl = k3_kl(logp, ref) if rl.kl_estimator == "k3" else logp.float() - ref.float()
            loss = loss + rl.kl_coef * (kl * weights).sum()
        with torch.no_grad():
            entropy = vocab_parallel_entropy(rows.detach(), group=group, vocab_range=vocab_range,
                                             chunk_tokens=rl.chunk_tokens)
            ratio = torch.exp(logp.detach().float() - mb["old_logprobs"].float())
            m = mask.float()
            return loss, {"tokens": m.sum(), "clipped": (clipped.float() * m).sum(),
                          "ratio_sum": (ratio * m).sum(), "kl_sum": (kl.detach().float() * m).sum(),
                          "entropy_sum": (entropy.float() * m).sum(), "importance_sum": (importance * m).sum()}

    return loss_fn


def policy_metrics(out, behaviour: dict, rl: RLConfig, weighted: bool = False) -> dict:
    """The step's policy numbers, summed over every rank (zeros where a rank does not own them) and averaged per
    trained token."""
    local = {k: 0.0 for k in POLICY_SUMS}
    if _last_stage_owner():
        for m in out.metrics:
            for k in local:
                local[k] += float(m[k])
    values = {**local, **behaviour}
    sums = sum_over_ranks([values], sorted(values))
    n = max(sums["tokens"], 1.0)
    metrics = {"loss": out.loss, "tokens": sums["tokens"], "divergence": sums["kl_sum"] / n,
               "rl/clip_fraction": sums["clipped"] / n, "rl/ratio_mean": sums["ratio_sum"] / n,
               "entropy/student": sums["entropy_sum"] / n}
    if rl.recompute_old_logprobs or weighted:
        metrics["rl/sidecar_logprob_abs_diff"] = sums["logprob_diff_sum"] / n
    if weighted:
        metrics["rollout/importance_ratio"] = sums["importance_sum"] / n
    return metrics
