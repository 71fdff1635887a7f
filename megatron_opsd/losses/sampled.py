"""Sampled-token losses for rollouts y ~ p_S, using only log p(y) of the sampled tokens.

With r = log p_T(y) - log p_S(y) (Schulman's estimators; p_S's log-prob carries the gradient). All three
*values* estimate KL(p_S || p_T) without bias; their *expected gradients* differ (on-policy, y ~ p_S):
  k1  = -r                      E[grad] = E[grad log p_S(y)] = 0: trains on noise. For logging; as a training
                                loss it is refused unless ``loss.allow_k1_loss`` (config validation)
  k3  = exp(r) - 1 - r          E[grad] = E[-(p_T/p_S)(y) grad log p_S(y)] + 0 = -sum_y p_T grad log p_S
                                = grad KL(p_T || p_S): the *forward* KL's gradient (mode-covering)
  pg  = -sg(r) * log p_S(y)     E[grad] = grad KL(p_S || p_T): the reverse KL's gradient (OPSD's
                                policy-gradient variant, advantage sg(log p_T - log p_S))
tests/test_losses_sampled.py enumerates a small vocabulary and checks the three expectations exactly.
``vocab_parallel_token_logprobs`` gives log p(y) from vocab-sharded logits without gathering the vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_opsd.losses.vocab_parallel import (VocabRange, all_reduce, group_rank_and_size, ids_layout,
                                                 log_softmax_stats, to_fp32_masked, working_dtype)
from megatron_opsd.losses.weights import REDUCTIONS, loss_weights

ESTIMATORS = ("k1", "k3", "pg")


class _LogprobsAt(torch.autograd.Function):
    """log softmax(x / T) at k global ids per token over the sharded vocabulary, chunked.

    Backward: (scatter(grad_k at the ids held by this shard) - p * sum_k grad_k) / T, shard-local.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk, cols, group):
        rank, _ = group_rank_and_size(group)
        width, dtype = logits.shape[-1], working_dtype(logits.dtype)
        local = ids - rank * width
        in_shard = (local >= 0) & (local < width)
        local = torch.where(in_shard, local, torch.zeros_like(local))
        out = torch.empty(ids.shape, dtype=dtype, device=logits.device)
        lse = torch.empty(ids.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            x = to_fp32_masked(logits[rows], cols, temperature, dtype)
            (lse[rows],) = log_softmax_stats(x, group=group)
            picked = x.gather(-1, local[rows])
            picked = all_reduce(torch.where(in_shard[rows], picked, torch.zeros_like(picked)), dist.ReduceOp.SUM,
                                group)
            out[rows] = picked - lse[rows, None]
        ctx.save_for_backward(logits, local, in_shard, lse)
        ctx.cfg = (temperature, chunk, cols)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, local, in_shard, lse = ctx.saved_tensors
        temperature, chunk, cols = ctx.cfg
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            x = to_fp32_masked(logits[rows], cols, temperature, lse.dtype)
            go = grad_out[rows].to(lse.dtype)
            g = -torch.exp(x - lse[rows, None]) * go.sum(-1, keepdim=True)
            g.scatter_add_(-1, local[rows], torch.where(in_shard[rows], go, torch.zeros_like(go)))
            grad[rows] = (g / temperature).to(grad.dtype)
        return grad, None, None, None, None, None


def vocab_parallel_logprobs_at(logits: torch.Tensor, ids: torch.Tensor, *, group=None, temperature: float = 1.0,
                               vocab_range: VocabRange = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """log p at global vocabulary ``ids`` [..., k] from [..., vocab_shard] logits; grad to ``logits`` only."""
    _, width, cols = ids_layout(logits, ids, temperature, group, vocab_range)
    out = _LogprobsAt.apply(logits.reshape(-1, width), ids.reshape(-1, ids.shape[-1]).long(), float(temperature),
                            int(chunk_tokens), cols, group)
    return out.reshape(ids.shape)


def vocab_parallel_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """log p(token_ids) [leading shape] (one id per token); keyword arguments as ``vocab_parallel_logprobs_at``."""
    return vocab_parallel_logprobs_at(logits, token_ids.unsqueeze(-1), **kwargs).squeeze(-1)


def sampled_token_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, *, estimator: str = "pg",
                       loss_mask: Optional[torch.Tensor] = None, reduction: str = "token_mean",
                       sequence_ids: Optional[torch.Tensor] = None,
                       token_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced sampled-token loss and the per-token KL estimate (k1 for pg, else the estimator's value).

    ``student_logprobs`` = log p_S(y) with grad, ``teacher_logprobs`` = log p_T(y) (detached here); both have
    the same leading shape as ``loss_mask``. Reductions and ``token_weights`` (replace the reduction's
    weights; masked tokens still count 0) as in ``vocab_parallel_divergence``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: choose one of {ESTIMATORS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {REDUCTIONS}")
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must have the same shape")
    mask = (torch.ones_like(student_logprobs, dtype=torch.bool) if loss_mask is None else loss_mask.bool())
    if mask.shape != student_logprobs.shape:
        raise ValueError(f"loss_mask shape {tuple(mask.shape)} must equal the log-probs' shape "
                         f"{tuple(student_logprobs.shape)}")
    ls = student_logprobs.to(working_dtype(student_logprobs.dtype))
    r = teacher_logprobs.detach().to(ls.dtype) - ls
    if estimator == "k1":
        term = -r
    elif estimator == "k3":
        term = torch.expm1(r) - r
    else:
        term = -r.detach() * ls
    zero = torch.zeros_like(term)
    term = torch.where(mask, term, zero)
    weights = loss_weights(mask, reduction, sequence_ids, token_weights).to(term.dtype)
    per_token = torch.where(mask, (-r if estimator != "k3" else term).detach(), zero)
    return (term * weights).sum(), per_token


@torch.no_grad()
def truncated_importance_ratio(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    """Per sampled token, ``min(pi(y) / pi_behaviour(y), clip)`` from the two log-probs (no gradient: a weight on
    the per-token loss, docs/losses.md "Stale samples"). The difference is clamped before ``exp`` so a token the
    behaviour policy found very unlikely cannot overflow."""
    log_clip = torch.log(torch.tensor(float(clip), dtype=torch.float32))
    return torch.exp(torch.clamp(logprobs.float() - behaviour_logprobs.float(), max=log_clip))
