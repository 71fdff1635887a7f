"""One step's rollouts, shared by OPSD and GRPO: rank 0 takes the step's samples from the rollout queue (generated
now, or ahead of time with ``rollout.max_staleness`` >= 1: ``training/rollout_queue.py``) and verifies the
responses (the reward) (``sample_rollouts``); the method adds what it needs from them (OPSD: the teacher
prompts) and ``broadcast_rollouts`` sends the lot once, so every rank builds the same step. Nothing here calls
back into the method. Each phase is charged to the step's ``PhaseTimer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from megatron_opsd.data.datasets import PromptSampler, load_prompt_dataset
from megatron_opsd.parallel.control import broadcast_object
from megatron_opsd.rollout.client import check_on_policy
from megatron_opsd.training.rollout_queue import RolloutBatch, RolloutQueue
from megatron_opsd.training.loop import PhaseTimer
from megatron_opsd.training.run import Run

ROLLOUT_PHASES = ("time/rollout", "time/verify", "time/teacher_prompts", "time/broadcast")


@dataclass
class StepRollouts:
    """What rank 0 gathered for one step (broadcast to every rank as a picklable object)."""

    student_prompts: list  # per prompt: token ids
    responses: list  # per prompt: list of n token-id lists
    correct: list  # per prompt: list of n bools (the weight versions are checked by check_on_policy)
    rewards: list = field(default_factory=list)  # per prompt: list of n float rewards (GRPO)
    logprobs: list = field(default_factory=list)  # per prompt: list of n sidecar log-prob lists (GRPO)
    # teacher context name -> per prompt -> per rollout: the teacher's prompt ids, or None where that rollout has
    # no teacher (a demonstration context and no other correct rollout in its group). One context, or three for
    # Purified OPSD (teacher.context, reference_only, base), in that order. Empty for GRPO.
    teachers: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # overlapped rollouts: staleness and timings (``overlap_stats``)
    texts: list = field(default_factory=list)  # per prompt: the n decoded responses (rank 0; not broadcast)


def prompt_sampler(cfg) -> PromptSampler:
    """``rollout.prompts_per_step`` prompts per step from ``data.train_path`` (its position is checkpointed)."""
    return PromptSampler(load_prompt_dataset(cfg.data.train_path, cfg.data), cfg.rollout.prompts_per_step,
                         cfg.data.shuffle, cfg.data.seed)


def rollout_queue(run: Run, sampler: PromptSampler, max_tokens_at: Callable[[int], int]) -> RolloutQueue:
    """The run's rollout source (``training/rollout_queue.py``: synchronous at ``rollout.max_staleness: 0``,
    overlapped above), attached to ``run`` so its weight push waits for the generation in flight and its
    checkpoints hold the batches generated ahead."""
    run.rollout_queue = RolloutQueue(run, sampler, max_tokens_at)
    return run.rollout_queue


def sample_rollouts(run: Run, batch: RolloutBatch, reward, *, timer: PhaseTimer) -> Optional[StepRollouts]:
    """Rank 0: the step's ``batch`` (``RolloutQueue.take``: ``rollout.n`` samples per example from the sidecar)
    checked against the staleness bound, decoded and graded by ``reward`` (one batched call: math-verify grades
    in a pool), as they came back (no teacher prompts). Other ranks: None. The method then adds what it needs and
    calls ``broadcast_rollouts`` once."""
    if run.rank != 0:
        return None
    examples, samples = batch.examples, batch.samples
    check_on_policy(samples, run.step, run.cfg.rollout.max_staleness)  # never trains on a batch too old
    timer.lap("time/rollout")
    texts = [run.tokenizer.decode(s.token_ids, skip_special_tokens=True) for g in samples for s in g]
    owners = [ex for ex, g in zip(examples, samples) for _ in g]
    scores = iter(reward(texts, owners))
    rewards = [[float(next(scores)) for _ in g] for g in samples]
    per_group = iter(texts)
    grouped_texts = [[next(per_group) for _ in g] for g in samples]
    timer.lap("time/verify")
    return StepRollouts(batch.student, [[s.token_ids for s in g] for g in samples],
                        [[x > 0.5 for x in g] for g in rewards], rewards, [[s.logprobs for s in g] for g in samples],
                        stats=overlap_stats(run, batch), texts=grouped_texts)


def broadcast_rollouts(rollouts: Optional[StepRollouts], timer: PhaseTimer) -> StepRollouts:
    """COLLECTIVE: rank 0's ``rollouts`` (without the decoded texts, which only rank 0 uses) to every rank."""
    result = broadcast_object(None if rollouts is None else replace(rollouts, texts=[]))
    timer.lap("time/broadcast")
    return result


def overlap_stats(run: Run, batch: RolloutBatch) -> dict:
    """With overlapped rollouts (rank 0): the batch's staleness (optimizer steps its weights lag behind), its
    generation time and the sidecar's idle gap before generating it, waiting for weights (nothing at
    ``max_staleness: 0``: the metrics stay as they were)."""
    if run.cfg.rollout.max_staleness == 0:
        return {}
    versions = [s.weight_version for g in batch.samples for s in g]
    return {"rollout/staleness": float(run.step - min(versions)), "overlap/generate_s": batch.generate_s,
            "overlap/sidecar_idle_s": batch.sidecar_idle_s}


def importance_clip(rollout, applies: bool = True) -> Optional[float]:
    """The cap of the per-token truncated importance ratio min(pi(y) / pi_behaviour(y), cap) when
    ``rollout.importance_ratio: truncated`` and the loss has a sampled-token term (``applies``), else None
    (docs/losses.md, "Stale samples")."""
    return rollout.importance_ratio_clip if rollout.importance_ratio == "truncated" and applies else None


def rollout_progress(m: dict) -> dict:
    """The progress bar's fields for an OPSD or GRPO step's metrics."""
    return dict(loss=f"{m['loss']:.4f}", kl=f"{m['divergence']:.4f}", acc=f"{m['rollout/accuracy']:.2f}",
                len=f"{m['rollout/mean_length']:.0f}", tok_s=f"{m['tokens_per_s']:.0f}")
