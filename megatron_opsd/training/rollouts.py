"""One step's rollouts, shared by OPSD and GRPO: rank 0 samples the prompts on the sidecar, verifies the
responses (the reward), encodes the teacher prompts the method needs, and broadcasts the lot, so every rank
builds the same step. Each phase is charged to the step's ``PhaseTimer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_opsd.data.datasets import PromptSampler, load_prompt_dataset
from megatron_opsd.data.sequences import student_prompt_ids
from megatron_opsd.rollout.client import check_on_policy
from megatron_opsd.training.run import PhaseTimer, Run, broadcast_object

ROLLOUT_PHASES = ("time/rollout", "time/verify", "time/teacher_prompts", "time/broadcast")

# (examples, texts per prompt per rollout, correct per prompt per rollout) -> StepRollouts.teachers
TeacherPrompts = Callable[[list, list, list], dict]


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


def prompt_sampler(cfg) -> PromptSampler:
    """``rollout.prompts_per_step`` prompts per step from ``data.train_path`` (its position is checkpointed)."""
    return PromptSampler(load_prompt_dataset(cfg.data.train_path, cfg.data), cfg.rollout.prompts_per_step,
                         cfg.data.shuffle, cfg.data.seed)


def sample_rollouts(run: Run, examples: list, reward, *, max_tokens: int, timer: PhaseTimer,
                    teacher_prompts: Optional[TeacherPrompts] = None) -> StepRollouts:
    """COLLECTIVE: ``rollout.n`` samples per example from the sidecar (rank 0), graded by ``reward`` (one
    batched call: math-verify grades in a pool), with ``teacher_prompts``' encodings; broadcast to every rank."""
    cfg, tokenizer, result = run.cfg, run.tokenizer, None
    if run.rank == 0:
        r = cfg.rollout
        student = [student_prompt_ids(tokenizer, ex, cfg.data, cfg.model.enable_thinking) for ex in examples]
        samples = run.client.generate(
            student, n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k if r.top_k > 0 else None,
            max_tokens=max_tokens, stop_token_ids=[tokenizer.eos_token_id], seed=r.seed + 100_003 * run.step)
        check_on_policy(samples, run.step, r.max_staleness)
        timer.lap("time/rollout")
        texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for g in samples for s in g]
        owners = [ex for ex, g in zip(examples, samples) for _ in g]
        scores = iter(reward(texts, owners))
        rewards = [[float(next(scores)) for _ in g] for g in samples]
        correct = [[x > 0.5 for x in g] for g in rewards]
        timer.lap("time/verify")
        per_group = iter(texts)
        grouped_texts = [[next(per_group) for _ in g] for g in samples]
        teachers = teacher_prompts(examples, grouped_texts, correct) if teacher_prompts is not None else {}
        timer.lap("time/teacher_prompts")
        result = StepRollouts(student, [[s.token_ids for s in g] for g in samples], correct, rewards,
                              [[s.logprobs for s in g] for g in samples], teachers)
    result = broadcast_object(result)
    timer.lap("time/broadcast")
    return result


def rollout_progress(m: dict) -> dict:
    """The progress bar's fields for an OPSD or GRPO step's metrics."""
    return dict(loss=f"{m['loss']:.4f}", kl=f"{m['divergence']:.4f}", acc=f"{m['rollout/accuracy']:.2f}",
                len=f"{m['rollout/mean_length']:.0f}", tok_s=f"{m['tokens_per_s']:.0f}")
