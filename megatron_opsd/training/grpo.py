"""GRPO with verifiable rewards, with the DAPO options, as pure functions and its config section.

Per prompt, a group of n rollouts y_i with rewards r_i (from the verifier; optionally shaped by DAPO's soft
overlong penalty). Advantages are group-normalised and shared by every token of a rollout:
    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        (std: Bessel-corrected, as TRL and verl; or no division)
The policy loss per response token t is PPO's clipped surrogate against the behaviour policy (the sidecar's
log-probs, or megatron's recomputation of them), with DAPO's clip-higher (eps_low != eps_high):
    ratio_t = exp(log pi_theta(y_t) - log pi_old(y_t))
    l_t     = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i)  [+ kl_coef * KL_t]
summed with per-token weights: token-level (DAPO: 1 / all response tokens of the step) or sequence-level
(GRPO: 1 / (|y_i| * number of rollouts)). ``training/rl_trainer.py`` drives them (``grpo_step``) on the shared run
machinery (``training/run.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_opsd.config import (K1_REFUSAL, ConfigError, RLConfig, RLTrainConfig, load_config, resolve_config,
                                  validate_run_config)
from megatron_opsd.losses import token_weights
from megatron_opsd.losses.vocab_parallel import working_dtype


def reference_model(rl: RLConfig) -> str:
    """``rl.reference`` resolved: ``frozen`` (a replica of the initial weights) or ``none``."""
    if rl.reference == "auto":
        return "frozen" if rl.kl_coef > 0 else "none"
    return rl.reference


def validate_rl_config(cfg: RLTrainConfig) -> RLTrainConfig:
    """The shared sections' checks (``config.validate_run_config``), ``logging.dir`` resolved, and GRPO's own."""
    validate_run_config(resolve_config(cfg))
    rl = cfg.rl
    checks = [
        (rl.clip_eps_low >= 0 and rl.clip_eps_high >= 0, f"rl.clip_eps_low/high must be >= 0, got "
                                                          f"{rl.clip_eps_low}/{rl.clip_eps_high}"),
        (rl.clip_eps_low < 1, f"rl.clip_eps_low must be < 1 (ratio floor 1 - eps > 0), got {rl.clip_eps_low}"),
        (rl.kl_coef >= 0, f"rl.kl_coef must be >= 0, got {rl.kl_coef}"),
        (rl.kl_coef == 0 or rl.kl_estimator != "k1" or rl.allow_k1_kl,
         K1_REFUSAL.format(key="rl.kl_estimator=k1", fix="rl.kl_estimator=full (exact reverse KL) or k3",
                           opt_in="rl.allow_k1_kl=true")),
        (rl.adv_eps > 0, f"rl.adv_eps must be > 0, got {rl.adv_eps}"),
        (0 <= rl.overlong_buffer < cfg.rollout.max_tokens,
         f"rl.overlong_buffer must be in [0, rollout.max_tokens={cfg.rollout.max_tokens}), got {rl.overlong_buffer}"),
        (rl.overlong_penalty >= 0, f"rl.overlong_penalty must be >= 0, got {rl.overlong_penalty}"),
        (cfg.rollout.n >= 2, f"rollout.n={cfg.rollout.n}: GRPO needs groups of at least 2 rollouts per prompt "
                             "(set rollout.n=4 or more)"),
        (cfg.rollout.filter == "all", f"rollout.filter={cfg.rollout.filter!r}: GRPO trains on every rollout "
                                      "(use rl.dynamic_sampling to drop uninformative groups); set rollout.filter=all"),
        (cfg.rollout.horizon is None and cfg.rollout.horizon_growth is None and cfg.rollout.max_kept is None,
         "rollout.horizon/horizon_growth/max_kept are OPSD options; GRPO trains on whole responses of every "
         "rollout: leave them null"),
        (rl.kl_coef <= 0 or reference_model(rl) == "frozen",
         f"rl.kl_coef={rl.kl_coef} needs a reference model: set rl.reference=frozen (or auto), or rl.kl_coef=0"),
        (cfg.model.lora.rank == 0 or reference_model(rl) == "none",  # LoRA hook: the reference = adapters off
         "model.lora with a reference model (rl.kl_coef > 0 or rl.reference=frozen) is not supported yet; set "
         "rl.kl_coef=0 rl.reference=auto or model.lora.rank=0"),
        (rl.chunk_tokens >= 1, f"rl.chunk_tokens must be >= 1, got {rl.chunk_tokens}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def load_rl_config(path: Optional[str] = None, overrides: Optional[Sequence[str]] = None) -> RLTrainConfig:
    """``load_config`` with the ``rl:`` section, validated."""
    return validate_rl_config(load_config(path, overrides, cls=RLTrainConfig))


# ---------------------------------------------------------------------------------------------- rewards
def overlong_penalty(length: int, max_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment (<= 0): 0 up to max_tokens - buffer, then linear down to -penalty at
    max_tokens (and -penalty beyond)."""
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer
    if length <= start:
        return 0.0
    return -penalty * min(length - start, buffer) / buffer


def group_advantages(rewards: Sequence[Sequence[float]], *, std_normalize: bool = True,
                     eps: float = 1e-6) -> list[list[float]]:
    """Per group: (r - mean) / (std + eps), std Bessel-corrected (0 for a single rollout); or r - mean."""
    out = []
    for g, group in enumerate(rewards):
        if len(group) == 0:
            raise ValueError(f"group {g} has no rollouts")
        mean = sum(group) / len(group)
        centred = [r - mean for r in group]
        if std_normalize:
            std = math.sqrt(sum(c * c for c in centred) / (len(group) - 1)) if len(group) > 1 else 0.0
            centred = [c / (std + eps) for c in centred]
        out.append(centred)
    return out


def informative_groups(accuracy: Sequence[Sequence[float]]) -> list[bool]:
    """DAPO dynamic sampling: a group is kept only if its verified accuracies differ (0 < acc < 1)."""
    return [len(set(group)) > 1 for group in accuracy]


@dataclass
class GroupRewards:
    shaped: list  # per group, per rollout: the verifier's reward plus the overlong penalty
    advantages: list  # per group, per rollout
    used: list  # per group: trained on (False: dropped by dynamic sampling)


def step_rewards(rewards: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]], lengths: Sequence[Sequence[int]],
                 rl: "RLConfig", max_tokens: int) -> GroupRewards:
    """Shaping, advantages and dynamic sampling for one step. Dynamic sampling filters on verified accuracy, as
    DAPO does: a group whose rollouts are all correct or all wrong is dropped even when the overlong penalty (or a
    graded reward) makes its shaped rewards differ."""
    shaped = [[r + overlong_penalty(n, max_tokens, rl.overlong_buffer, rl.overlong_penalty) for r, n in zip(rs, ns)]
              for rs, ns in zip(rewards, lengths)]
    advantages = group_advantages(shaped, std_normalize=rl.std_normalize, eps=rl.adv_eps)
    used = informative_groups(correct) if rl.dynamic_sampling else [True] * len(shaped)
    return GroupRewards(shaped, advantages, used)


# ---------------------------------------------------------------------------------------------- loss
def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        weights: torch.Tensor, *, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t weights_t * -min(ratio_t A_t, clip(ratio_t, 1-eps_low, 1+eps_high) A_t) and the per-token
    'clipped' indicator (the token's gradient is zero because the clip is active). Gradient to ``logprobs``."""
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == weights.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, advantages "
                         f"{tuple(advantages.shape)} and weights {tuple(weights.shape)} must have one shape")
    dtype = working_dtype(logprobs.dtype)  # fp32, or fp64 when given fp64
    logp = logprobs.to(dtype)
    adv = advantages.detach().to(dtype)
    ratio = torch.exp(logp - old_logprobs.detach().to(dtype))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    is_clipped = (clipped < unclipped).detach()
    return (per_token * weights.detach().to(dtype)).sum(), is_clipped


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) at the sampled tokens (``losses.sampled``'s k3)."""
    logp = logprobs.to(working_dtype(logprobs.dtype))
    r = ref_logprobs.detach().to(logp.dtype) - logp
    return torch.expm1(r) - r


def rollout_weights(lengths: Sequence[int], token_level: bool) -> list[torch.Tensor]:
    """Per-token weights of the step (``losses.token_weights``): token mean (DAPO) or per-sequence mean (GRPO)."""
    return token_weights(lengths, "token_mean" if token_level else "sequence_mean")

