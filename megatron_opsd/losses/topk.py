"""Teacher top-k mode: the divergence over the teacher's global top-k tokens plus one tail bucket.

OPSD (docs/losses.md, "The methods"): "Top-k variant: restrict to the teacher's top-k tokens and renormalise"
(``tail=False`` here); DemoPSD uses top-k 100. With ``tail=True`` (the default) the distributions are compared on k + 1
buckets: the k teacher tokens and the tail (all other valid tokens), so no mass is thrown away and the
divergence is a lower bound of the full-vocabulary one (data processing inequality).

Vocab-parallel, nothing of size V is gathered:
- ``vocab_parallel_topk``: local top-k on each shard, all-gather of the k candidates (value, global id) per
  rank, top-k of those; every rank gets the same ids. Then the bucket log-probs below.
- ``vocab_parallel_bucket_logprobs``: log p at k global ids per token and, optionally, the log of the tail
  mass computed *directly* as a log-sum-exp over the columns outside the k ids (one more all-reduce), not
  as log(1 - sum p) (which cancels catastrophically when the top-k holds almost all the mass). Custom
  autograd; the backward is shard-local:  dL/dx_j = [j in K] g_j + [j outside K] g_tail p_j / P_tail
  - p_j sum(g)  (divided by the temperature).
- ``topk_divergence``: reverse/forward KL or JSD_beta over the [tokens, k (+1)] buckets; gradient to the
  student logits only (the teacher's bucket log-probs are detached).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_opsd.losses.divergence import KINDS, divergence_terms
from megatron_opsd.losses.vocab_parallel import (VocabRange, all_reduce, group_rank_and_size, ids_layout,
                                                 log_softmax_stats, to_fp32_masked, valid_columns, working_dtype)
from megatron_opsd.losses.weights import loss_weights


class TeacherTopK(NamedTuple):
    """The teacher's global top-k per token; every TP rank holds the same tensors."""

    ids: torch.Tensor  # [..., k] int64 global vocabulary ids, by decreasing probability
    logprobs: torch.Tensor  # [..., k] log p_T(id), normalised over the whole valid vocabulary
    tail: torch.Tensor  # [...] log of the teacher's mass outside the k ids (-inf if none)


def _local_ids(ids: torch.Tensor, width: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(column in this shard, or ``width`` for ids held elsewhere; bool owned)."""
    rank, _ = group_rank_and_size(group)
    local = ids - rank * width
    owned = (local >= 0) & (local < width)
    return torch.where(owned, local, torch.full_like(local, width)), owned


def _in_k(local: torch.Tensor, width: int) -> torch.Tensor:
    """Bool [rows, width]: the columns of this shard that are among the row's k ids (a dummy column absorbs
    the ids owned by other shards, so no scatter ever writes twice to a real column)."""
    mask = torch.zeros(local.shape[0], width + 1, dtype=torch.bool, device=local.device)
    return mask.scatter_(-1, local, True)[:, :width]


class _BucketLogprobs(torch.autograd.Function):
    """[rows, k (+1)] log-probs of softmax(x / T) at k global ids (+ the tail outside them), chunked."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk, cols, group, tail):
        width, dtype = logits.shape[-1], working_dtype(logits.dtype)
        local, owned = _local_ids(ids, width, group)
        rows_n, k = ids.shape
        out = torch.empty(rows_n, k + int(tail), dtype=dtype, device=logits.device)
        lse = torch.empty(rows_n, dtype=dtype, device=logits.device)
        lse_tail = torch.full((rows_n,), float("-inf"), dtype=dtype, device=logits.device)
        for start in range(0, rows_n, chunk):
            rows = slice(start, start + chunk)
            x = to_fp32_masked(logits[rows], cols, temperature, dtype)
            if tail:
                rest = x.masked_fill(_in_k(local[rows], width), float("-inf"))
                lse[rows], lse_tail[rows] = log_softmax_stats(x, rest, group=group)
                out[rows, k] = lse_tail[rows] - lse[rows]
            else:
                (lse[rows],) = log_softmax_stats(x, group=group)
            picked = x.gather(-1, local[rows].clamp(max=width - 1))
            picked = all_reduce(torch.where(owned[rows], picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
            out[rows, :k] = picked - lse[rows, None]
        ctx.save_for_backward(logits, local, lse, lse_tail)
        ctx.cfg = (temperature, chunk, cols, tail)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, local, lse, lse_tail = ctx.saved_tensors
        temperature, chunk, cols, tail = ctx.cfg
        width, k, dtype = logits.shape[-1], local.shape[-1], lse.dtype
        grad_out = grad_out.to(dtype)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            x = to_fp32_masked(logits[rows], cols, temperature, dtype)
            go = grad_out[rows]
            g = -torch.exp(x - lse[rows, None]) * go.sum(-1, keepdim=True)
            if tail:
                outside = ~_in_k(local[rows], width) & torch.isfinite(x)
                share = torch.where(outside, torch.exp(x - lse_tail[rows, None]), torch.zeros_like(x))
                g += share * go[:, k:k + 1]
            g = torch.cat([g, torch.zeros_like(g[:, :1])], dim=-1)  # the dummy column takes foreign ids
            g.scatter_add_(-1, local[rows], go[:, :k])
            grad[rows] = (g[:, :width] / temperature).to(grad.dtype)
        return grad, None, None, None, None, None, None


def vocab_parallel_bucket_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, tail: bool = True, group=None,
                                   temperature: float = 1.0, vocab_range: VocabRange = None,
                                   chunk_tokens: int = 1024) -> torch.Tensor:
    """log p at global ``ids`` [..., k] (+ log of the mass outside them, last entry) from [..., vocab_shard]
    logits; [..., k + tail] in the working dtype, grad to ``logits``. ``ids`` must be distinct per token."""
    lead, width, cols = ids_layout(logits, ids, temperature, group, vocab_range)
    out = _BucketLogprobs.apply(logits.reshape(-1, width), ids.reshape(-1, ids.shape[-1]).long(), float(temperature),
                                int(chunk_tokens), cols, group, bool(tail))
    return out.reshape(*lead, out.shape[-1])


@torch.no_grad()
def vocab_parallel_topk(teacher_logits: torch.Tensor, k: int, *, group=None, vocab_range: VocabRange = None,
                        temperature: float = 1.0, chunk_tokens: int = 1024) -> TeacherTopK:
    """The global top-k of sharded logits (after ``/ temperature``), without gathering the vocabulary.

    Each rank takes its shard's top min(k, shard width) and all-gathers them (k values + k ids per rank per
    token); the top-k of the candidates is the global top-k (a token in the global top-k is in its own
    shard's top-k). Padded columns (outside ``vocab_range``) are never chosen.
    """
    lead, width = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    rank, size = group_rank_and_size(group)
    cols = valid_columns(width, group, vocab_range, teacher_logits.device)
    n_valid = width * size if vocab_range is None else vocab_range[1] - vocab_range[0]
    if not 1 <= k <= n_valid:
        raise ValueError(f"k={k} must be in [1, {n_valid}] (the valid vocabulary size)")
    flat = teacher_logits.detach().reshape(-1, width)
    dtype = working_dtype(teacher_logits.dtype)
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    k_local = min(k, width)
    for start in range(0, flat.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        x = to_fp32_masked(flat[rows], cols, temperature, dtype)
        values, local_ids = x.topk(k_local, dim=-1)
        local_ids = local_ids + rank * width
        if size > 1:
            all_values = [torch.empty_like(values) for _ in range(size)]
            all_ids = [torch.empty_like(local_ids) for _ in range(size)]
            dist.all_gather(all_values, values.contiguous(), group=group)
            dist.all_gather(all_ids, local_ids.contiguous(), group=group)
            values, local_ids = torch.cat(all_values, dim=-1), torch.cat(all_ids, dim=-1)
        ids[rows] = local_ids.gather(-1, values.topk(k, dim=-1).indices)
    buckets = _BucketLogprobs.apply(flat, ids, float(temperature), int(chunk_tokens), cols, group, True)
    return TeacherTopK(ids.reshape(*lead, k), buckets[:, :k].reshape(*lead, k), buckets[:, k].reshape(lead))


class _BucketDivergence(torch.autograd.Function):
    """sum over the last dim of the pointwise divergence terms of normalised bucket log-probs [n, m].

    d/d logp_i sum_v f_v(exp(logp_v)) = p_i f_i'(p_i) = the ``pa`` of divergence.divergence_terms (zero-probability
    buckets give 0, not NaN); clamped terms (token_clip) give 0.
    """

    @staticmethod
    def forward(ctx, logp, logq, kind, beta, token_clip):
        f, pa, _ = divergence_terms(kind, beta, logp, logq)
        if token_clip is not None:
            pa = pa.masked_fill(f > token_clip, 0.0)
            f = f.clamp(max=token_clip)
        ctx.save_for_backward(pa)
        return f.sum(dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (pa,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * pa, None, None, None, None


def topk_divergence(student_logits: torch.Tensor, teacher_topk: TeacherTopK, *, kind: str = "reverse_kl",
                    tail: bool = True, group=None, loss_mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                    beta: float = 0.5, token_clip: Optional[float] = None, chunk_tokens: int = 1024,
                    vocab_range: VocabRange = None, reduction: str = "token_mean",
                    sequence_ids: Optional[torch.Tensor] = None,
                    token_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence between student and teacher over the teacher's top-k tokens (+ the tail bucket).

    ``teacher_topk`` from ``vocab_parallel_topk`` (its temperature is the teacher's); ``temperature`` divides
    the student logits. ``tail=True``: k + 1 buckets (the tail is each side's exact mass outside the k ids);
    ``tail=False``: both distributions renormalised over the k ids. ``kind``, ``beta`` (generalized JSD),
    ``token_clip`` (per bucket), masks, reductions and ``token_weights`` as in ``vocab_parallel_divergence``.
    Reverse KL is +inf where the teacher gives a bucket zero mass that the student does not (as over the full
    vocabulary). Returns (loss with grad to ``student_logits`` only, per-token divergence [...] detached).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    ids, t_logprobs, t_tail = teacher_topk
    lead = student_logits.shape[:-1]
    if ids.shape[:-1] != lead or t_logprobs.shape != ids.shape or t_tail.shape != lead:
        raise ValueError(f"teacher_topk (ids {tuple(ids.shape)}, logprobs {tuple(t_logprobs.shape)}, tail "
                         f"{tuple(t_tail.shape)}) must be [..., k], [..., k], [...] with the student logits' leading "
                         f"shape {tuple(lead)}")
    mask = torch.ones(lead, dtype=torch.bool, device=student_logits.device) if loss_mask is None else loss_mask.bool()
    if mask.shape != lead:
        raise ValueError(f"loss_mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(lead)}")
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    weights = loss_weights(mask, reduction, sequence_ids, token_weights)
    logp = vocab_parallel_bucket_logprobs(student_logits, ids, tail=tail, group=group, temperature=temperature,
                                          vocab_range=vocab_range, chunk_tokens=chunk_tokens)
    logq = t_logprobs.detach().to(logp.dtype)
    if tail:
        logq = torch.cat([logq, t_tail.detach().to(logp.dtype).unsqueeze(-1)], dim=-1)
    else:
        logp, logq = torch.log_softmax(logp, dim=-1), torch.log_softmax(logq, dim=-1)
    width = logp.shape[-1]
    per_token = _BucketDivergence.apply(logp.reshape(-1, width), logq.reshape(-1, width), kind, float(beta),
                                        token_clip).reshape(lead)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    loss = (per_token * weights.to(per_token.dtype)).sum()
    return loss, per_token.detach()
