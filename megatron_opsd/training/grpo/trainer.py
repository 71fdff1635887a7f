"""The GRPO trainer: ``GRPOTrainer`` holds what the method (``grpo/step.py`` ``grpo_step``) needs on top of the
shared run machinery (``training/run.py``): the prompt sampler, the reward, the rollout queue and the reference
model (``rl.reference``)."""
from __future__ import annotations

from typing import Optional

from megatron_opsd.config import RLTrainConfig
from megatron_opsd.rewards import build_reward
from megatron_opsd.training.grpo.config import reference_model, validate_rl_config
from megatron_opsd.training.grpo.step import GRPO_PHASES, grpo_step
from megatron_opsd.training.loop import PhaseTimer
from megatron_opsd.training.rollouts import (StepRollouts, broadcast_rollouts, prompt_sampler, rollout_progress,
                                             rollout_queue, sample_rollouts)
from megatron_opsd.training.run import EvaluateHook, Run

__all__ = ["GRPOTrainer", "train_grpo"]


class GRPOTrainer:
    """GRPO on the shared run machinery. ``reference``: a frozen replica of the initial weights when
    ``rl.reference`` resolves to frozen (``rl.kl_coef > 0``), else None."""

    def __init__(self, cfg: RLTrainConfig, evaluate: Optional[EvaluateHook] = None):
        self.cfg = cfg = validate_rl_config(cfg)
        self.run = run = Run(cfg, desc="grpo", uses_sidecar=True, evaluate=evaluate)
        self.sampler, self.reward = prompt_sampler(cfg), build_reward(cfg.reward)
        self.queue = rollout_queue(run, self.sampler, lambda step: cfg.rollout.max_tokens)
        self.reference = run.replica() if reference_model(cfg.rl) == "frozen" else None
        run.build_optimizer()

    phases = GRPO_PHASES
    train_step = grpo_step
    progress = staticmethod(rollout_progress)

    def rollouts(self, timer: PhaseTimer) -> StepRollouts:
        """COLLECTIVE: this step's whole rollouts with their rewards and sidecar log-probs (no teacher prompts)."""
        return broadcast_rollouts(sample_rollouts(self.run, self.queue.take(self.run.step), self.reward, timer=timer),
                                  timer)

    def extra_models(self) -> Optional[dict]:
        """The reference replica, checkpointed under ``teacher`` (the checkpoint layout GRPO runs always had)."""
        return None if self.reference is None else {"teacher": self.reference}


def train_grpo(cfg: RLTrainConfig, evaluate: Optional[EvaluateHook] = None) -> list[dict]:
    """Run GRPO from ``cfg`` on this process (launched by torchrun, srun, or run_distributed)."""
    trainer = GRPOTrainer(cfg, evaluate)
    return trainer.run.fit(trainer)
