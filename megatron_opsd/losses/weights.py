"""Per-token reduction weights: the one place a loss's token mean / sequence mean / sum is turned into weights.

Every loss here is ``sum_t weights_t * per_token_t``, so how tokens are averaged is a weight per token, built
once. ``reduction_weights`` works on a token mask (the losses' ``reduction=``); ``token_weights`` gives the same
weights per sequence for a whole step of response lengths (OPSD and GRPO normalise over every response token
of the step, across micro-batches and data-parallel ranks, then pass them as ``token_weights=``). The weights
are computed in fp64 and rounded once to fp32, so ``1 / N`` is the correctly rounded fp32 number.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

REDUCTIONS = ("token_mean", "sequence_mean", "sum")


def reduction_weights(mask: torch.Tensor, reduction: str, sequence_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token fp32 weights [leading shape] so that loss = sum(weights * per_token); all-masked -> all 0.

    ``sequence_mean`` (OPSDC's 1/|y|): mean over masked tokens of each sequence, then over sequences that
    have at least one masked token. Sequences are ``sequence_ids`` if given, else the rows of a 2-D
    [batch, seq] leading shape (for megatron's [seq, batch] layout pass ``sequence_ids``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {REDUCTIONS}")
    m = mask.to(torch.float64)
    if reduction == "sum":
        return m.float()
    if reduction == "token_mean":
        return (m / m.sum().clamp(min=1.0)).float()
    if sequence_ids is None:
        if mask.dim() != 2:
            raise ValueError(f"reduction='sequence_mean' with leading shape {tuple(mask.shape)}: pass sequence_ids "
                             "(per-token ints) or use a 2-D [batch, seq] leading shape")
        sequence_ids = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    if sequence_ids.shape != mask.shape:
        raise ValueError(f"sequence_ids shape {tuple(sequence_ids.shape)} must equal the leading shape "
                         f"{tuple(mask.shape)}")
    _, inverse = torch.unique(sequence_ids.reshape(-1), return_inverse=True)
    counts = torch.bincount(inverse, weights=m.reshape(-1))
    n_sequences = (counts > 0).sum().clamp(min=1).to(torch.float64)
    per_token = counts[inverse].clamp(min=1.0) * n_sequences  # exact in fp64: one division, one rounding
    return (m.reshape(-1) / per_token).reshape(mask.shape).float()


def loss_weights(mask: torch.Tensor, reduction: str, sequence_ids: Optional[torch.Tensor] = None,
                 token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The losses' per-token weights: the caller's ``token_weights`` (normalised over a whole step), 0 on masked
    tokens, in at least fp32; else ``reduction_weights``."""
    if token_weights is None:
        return reduction_weights(mask, reduction, sequence_ids)
    if token_weights.shape != mask.shape:
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal the loss tokens' shape "
                         f"{tuple(mask.shape)} (the logits' leading shape)")
    return token_weights.to(torch.promote_types(token_weights.dtype, torch.float32)) * mask


def token_weights(response_lengths: Sequence[int], reduction: str) -> list[torch.Tensor]:
    """``reduction_weights`` over a step's sequences: one fp32 [length] tensor per sequence, on the host."""
    lengths = [int(n) for n in response_lengths]
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    weights = reduction_weights(torch.ones(sum(lengths), dtype=torch.bool), reduction, ids)
    return list(weights.split(lengths))
