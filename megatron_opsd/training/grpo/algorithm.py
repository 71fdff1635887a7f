"""GRPO with verifiable rewards, with the DAPO options, as pure functions.

Per prompt, a group of n rollouts y_i with rewards r_i (from the verifier; optionally shaped by DAPO's soft
overlong penalty). Advantages are group-normalised and shared by every token of a rollout:
    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        (std: Bessel-corrected, as TRL and verl; or no division)
The policy loss per response token t is PPO's clipped surrogate against the behaviour policy (the sidecar's
log-probs, or megatron's recomputation of them), with DAPO's clip-higher (eps_low != eps_high):
    ratio_t = exp(log pi_theta(y_t) - log pi_old(y_t))
    l_t     = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i)  [+ kl_coef * KL_t]
summed with per-token weights: token-level (DAPO: 1 / all response tokens of the step) or sequence-level
(GRPO: 1 / (|y_i| * number of rollouts)). ``grpo/step.py`` drives them (``grpo_step``) on the shared run
machinery (``training/run.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_opsd.config import RLConfig
from megatron_opsd.losses import token_weights
from megatron_opsd.losses.vocab_parallel import working_dtype


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
                 rl: RLConfig, max_tokens: int) -> GroupRewards:
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

