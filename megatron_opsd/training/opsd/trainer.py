"""The OPSD trainer: ``OPSDTrainer`` holds what the method (``opsd/step.py`` ``opsd_step``) needs on top of the
shared run machinery (``training/run.py``): the prompt sampler and reward, the rollout queue, the teacher replica
(frozen / EMA / refreshed) or LoRA teacher adapters (``opsd/lora_teacher.py``), and Purified OPSD's initial model.
"""
from __future__ import annotations

import warnings
from typing import Optional

from megatron_opsd.config import OPSDConfig, distillation_warnings
from megatron_opsd.data.contexts import (PURIFIED_BASE_CONTEXTS, needs_demonstration, teacher_context_names,
                                         teacher_messages)
from megatron_opsd.data.sequences import encode_prompt, horizon_at_step
from megatron_opsd.rewards import build_reward
from megatron_opsd.rewards.filters import correct_demonstrations
from megatron_opsd.training.loop import PhaseTimer
from megatron_opsd.training.opsd.lora_teacher import add_teacher_adapters, step_teacher_adapters, teacher_adapters
from megatron_opsd.training.opsd.step import OPSD_PHASES, opsd_step
from megatron_opsd.training.rollouts import (StepRollouts, broadcast_rollouts, prompt_sampler, rollout_progress,
                                             rollout_queue, sample_rollouts)
from megatron_opsd.training.run import EvaluateHook, Run
from megatron_opsd.training.schedule import FP32EMA, copy_weights_

__all__ = ["OPSDTrainer", "train"]


class OPSDTrainer:
    """OPSD on the shared run machinery. The teacher is the student given privileged context: a second replica
    sharded like the student (``teacher.weights`` frozen / ema / refresh), the live student, or with LoRA the
    student with its adapters switched (``lora_teacher.py``)."""

    def __init__(self, cfg: OPSDConfig, evaluate: Optional[EvaluateHook] = None):
        self.cfg = cfg
        self.run = run = Run(cfg, desc="opsd", uses_sidecar=True, evaluate=evaluate)
        self.sampler, self.reward = prompt_sampler(cfg), build_reward(cfg.reward)
        self.queue = rollout_queue(run, self.sampler, self.generation_limit)
        self.teacher = None
        if cfg.model.lora.rank > 0:  # LoRA: the teacher is the student with its adapters switched
            add_teacher_adapters(run.student, cfg.teacher)
        elif cfg.teacher.weights != "live":  # a second replica sharded like the student
            self.teacher = run.replica(teacher=True)
            if run.rank == 0:
                n = sum(p.numel() * p.element_size() for c in self.teacher for p in c.parameters())
                print(f"teacher ({cfg.teacher.weights}) holds {n / 2**20:.1f} MiB of weights on rank 0")
        self.ema = FP32EMA(self.teacher) if self.teacher is not None and cfg.teacher.weights == "ema" else None
        # Purified OPSD's reference-only and base forwards are the *initial* model (the PMI target contrasts the
        # teacher with what the model knew before training): a frozen copy unless the teacher already is one
        # (with LoRA: the base model, adapters off).
        self.initial = None
        if cfg.teacher.purified and cfg.teacher.weights != "frozen" and cfg.model.lora.rank == 0:
            self.initial = run.replica()
        if run.rank == 0:
            for message in distillation_warnings(cfg):
                warnings.warn(message, stacklevel=2)
        run.build_optimizer()

    phases = OPSD_PHASES
    train_step = opsd_step
    progress = staticmethod(rollout_progress)

    # ------------------------------------------------------------------------------------------ rollouts
    def rollouts(self, timer: PhaseTimer) -> StepRollouts:
        """COLLECTIVE: this step's rollouts with their rewards (``rollouts.sample_rollouts``, rank 0) and teacher
        prompts (encoded here from what came back), broadcast once to every rank."""
        batch = self.queue.take(self.run.step)
        rollouts = sample_rollouts(self.run, batch, self.reward, timer=timer)
        if rollouts is not None:  # rank 0
            rollouts.teachers = self.teacher_prompts(batch.examples, rollouts.texts, rollouts.correct)
            timer.lap("time/teacher_prompts")
        return broadcast_rollouts(rollouts, timer)

    def teacher_prompts(self, examples: list, texts: list, correct: list) -> dict:
        """``StepRollouts.teachers``: each teacher context's prompt ids per rollout (``texts``/``correct`` per
        prompt, per rollout). A demonstration context (``rollout``, DemoPSD; or a ``template`` reading
        ``{{ rollout }}``) sees another correct rollout of the same group (``filters.correct_demonstrations``), and
        may be up to ``data.max_prompt_tokens + rollout.max_tokens`` long; rollouts without one get None (they are
        left out of the step)."""
        cfg = self.cfg

        def encode(ex, ctx: str, demo: Optional[str] = None) -> list:
            limit = cfg.data.max_prompt_tokens + (cfg.rollout.max_tokens if demo is not None else 0)
            return encode_prompt(self.run.tokenizer, teacher_messages(ex, cfg.data, cfg.teacher, ctx, demo), limit,
                                 ex.id, f"teacher ({ctx})", cfg.model.enable_thinking)

        teachers = {}
        for ctx in teacher_context_names(cfg.teacher):
            teachers[ctx] = []
            for ex, group, demos in zip(examples, texts, correct_demonstrations(correct)):
                if not needs_demonstration(ctx, cfg.teacher):  # one prompt shared by the group
                    teachers[ctx].append([encode(ex, ctx)] * len(group))
                    continue
                teachers[ctx].append([None if k is None else encode(ex, ctx, group[k]) for k in demos])
        return teachers

    def generation_limit(self, step: int) -> int:
        """Tokens to generate per rollout for ``step``: ``rollout.max_tokens``, or only the step's horizon (truncated /
        progressive OPD) when nothing needs whole responses. Whole responses are needed to grade them for
        ``rollout.filter: correct | incorrect`` and to show a correct one to a demonstration teacher (DemoPSD);
        then they are generated in full and cut at the horizon for the forwards. With ``rollout.filter: all``
        the grading only feeds the logs, and ``rollout/accuracy`` then grades the first h tokens (near 0):
        measure accuracy with ``train.eval_every``, whose generation is not truncated."""
        cfg = self.cfg
        horizon = horizon_at_step(step, cfg.rollout)
        whole = cfg.rollout.filter != "all" or any(needs_demonstration(c, cfg.teacher)
                                                   for c in teacher_context_names(cfg.teacher))
        return cfg.rollout.max_tokens if horizon is None or whole else min(cfg.rollout.max_tokens, horizon)

    # ------------------------------------------------------------------------------------------ teacher
    def teacher_model(self, context: str) -> list:
        """The chunks that run teacher context ``context``: the teacher replica (or the live student), except
        Purified OPSD's reference-only and base forwards, which are always the frozen initial model."""
        if self.cfg.teacher.purified and context in PURIFIED_BASE_CONTEXTS:
            return self.initial or self.teacher or self.run.ddp
        return self.teacher or self.run.ddp

    def teacher_scope(self, context: str):
        """Around each teacher forward: with LoRA, the adapters that context uses (``lora_teacher``); else a no-op."""
        return teacher_adapters(self.run.ddp, self.cfg.teacher, context)

    def update_teacher(self) -> None:
        """After the optimizer step: the EMA teacher's average, the refreshed teacher's copy, or LoRA's adapters."""
        t, step = self.cfg.teacher, self.run.step
        if self.ema is not None:
            self.ema.update_(self.run.student, t.ema_decay)
        elif self.teacher is not None and t.weights == "refresh" and (step + 1) % t.refresh_every == 0:
            copy_weights_(self.teacher, self.run.student)
        step_teacher_adapters(self.run.student, t, step)

    def extra_models(self) -> Optional[dict]:
        """Checkpointed with the student: the teacher replica (and a bf16 EMA teacher's fp32 average)."""
        if self.teacher is None:
            return None
        if self.ema is not None and self.ema.has_copies:
            return {"teacher": self.teacher, "teacher_ema_fp32": self.ema.checkpoint_chunks()}
        return {"teacher": self.teacher}


def train(cfg: OPSDConfig, evaluate: Optional[EvaluateHook] = None) -> list[dict]:
    """Run OPSD from ``cfg`` on this process (launched by torchrun, srun, or run_distributed). ``evaluate``: the
    ``train.eval_every`` hook (the CLI passes ``evaluation.runner.evaluate_for_training``)."""
    trainer = OPSDTrainer(cfg, evaluate)
    return trainer.run.fit(trainer)
