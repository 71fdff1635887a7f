"""Full-vocabulary per-token divergences between student and teacher, vocab-parallel and token-chunked.

All kinds share one custom autograd function. For a per-entry term f_v(p_v) (p = student softmax) the
gradient w.r.t. the student's scaled logits is  g_j = p_j a_j - p_j sum_v p_v a_v  with a_v = df_v/dp_v: shard-
local once the per-token sum is known. For the KLs that sum is closed-form (KL + 1 reverse, -1 forward), so the
divergence's own all-reduce is the only one; jsd and token_clip all-reduce sum_v p_v a_v as well:
  reverse_kl  f = p (log p - log q)                      p a = p (log p - log q + 1)  -> g = p (log p - log q - KL)
  forward_kl  f = q (log q - log p)                      p a = -q                     -> g = p - q
  jsd_beta    f = b q (log q - log m) + (1-b) p (log p - log m),  m = b q + (1-b) p,   p a = (1-b) p (log p - log m)
with q the teacher distribution. ``token_clip`` clamps each f_v from above before the vocabulary sum; a
clamped entry contributes zero gradient (a_v := 0), which is what autograd of ``clamp`` gives.
Working memory is three fp32 [chunk_tokens, vocab_shard] buffers reused for every chunk, plus the gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opsd.losses.vocab_parallel import (VocabRange, all_reduce, load_chunk, log_softmax_into, valid_columns,
                                                 working_dtype)
from megatron_opsd.losses.weights import loss_weights, reduction_weights  # noqa: F401 (reduction_weights: API)

KINDS = ("reverse_kl", "forward_kl", "jsd")


def _xlogy_term(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """w * a with 0 where w == 0 (so 0 * -inf = 0 for zero-probability entries)."""
    return torch.where(w > 0, w * a, torch.zeros_like(w))


def divergence_terms(kind: str, beta: float, logp: torch.Tensor, logq: torch.Tensor):
    """(pointwise divergence f [rows, shard], p * df/dp [rows, shard], p)."""
    p, q = torch.exp(logp), torch.exp(logq)
    if kind == "reverse_kl":
        return _xlogy_term(p, logp - logq), _xlogy_term(p, logp - logq + 1.0), p
    if kind == "forward_kl":
        return _xlogy_term(q, logq - logp), -q, p
    logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
    student_part = _xlogy_term(p, logp - logm)
    return beta * _xlogy_term(q, logq - logm) + (1.0 - beta) * student_part, (1.0 - beta) * student_part, p


def _chunk_terms(kind: str, beta: float, logp: torch.Tensor, logq: torch.Tensor, scratch: torch.Tensor):
    """(f, p * df/dp, p) of one chunk as ``divergence_terms``; the KLs overwrite logp, logq and scratch (no allocation).

    nan_to_num maps the 0 * -inf entries (zero probability) to 0 and keeps +inf (support mismatch)."""
    if kind == "reverse_kl":
        p = torch.exp(logp, out=scratch)
        diff = torch.sub(logp, logq, out=logq).nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)
        f = torch.mul(p, diff, out=logp)
        return f, torch.add(f, p, out=diff), p  # p a = p (log p - log q + 1)
    if kind == "forward_kl":
        q = torch.exp(logq, out=scratch)
        f = torch.sub(logq, logp, out=logq).nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0).mul_(q)
        return f, q.neg_(), logp.exp_()
    return divergence_terms(kind, beta, logp, logq)


def _chunks_with_tokens(mask: torch.Tensor, chunk: int) -> list[bool]:
    """Per chunk of ``chunk`` rows: does it hold any unmasked token. One device->host copy for the whole call (none
    for a host mask) instead of a ``bool(mask.any())`` sync per chunk inside the loop."""
    padded = mask.new_zeros(-(-mask.shape[0] // chunk) * chunk)
    padded[:mask.shape[0]] = mask
    return padded.view(-1, chunk).any(dim=1).tolist()


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-token divergence [tokens]; masked tokens give 0 and zero gradient. Teacher gets no gradient.

    The gradient is computed in the forward while each chunk's softmaxes are at hand (as megatron's
    vocab-parallel cross-entropy does) into one [tokens, shard] tensor in the student's dtype; the backward
    only scales its rows in place. So nothing is recomputed, and neither the student's nor the teacher's
    logits are kept for the backward. Three reused fp32 [chunk, shard] buffers are the working memory.
    """

    @staticmethod
    def forward(ctx, student, teacher, mask, kind, beta, temperature, token_clip, chunk, cols, group,
                teacher_is_logprobs, want_grad, reusable_backward):
        dtype = working_dtype(student.dtype)
        teacher_scale = 1.0 if teacher_is_logprobs else temperature
        n = student.shape[0]
        per_token = torch.zeros(n, dtype=dtype, device=student.device)
        grad = torch.empty_like(student) if want_grad else None
        scratch, logp_buf, logq_buf = (torch.empty(min(chunk, n), student.shape[1], dtype=dtype,
                                                   device=student.device) for _ in range(3))
        for start, has_tokens in zip(range(0, n, chunk), _chunks_with_tokens(mask, chunk)):
            rows = slice(start, start + chunk)
            row_mask = mask[rows]
            if not has_tokens:  # same mask on every tensor-parallel rank: all skip together
                if grad is not None:
                    grad[rows].zero_()
                continue
            k = row_mask.shape[0]
            logp = log_softmax_into(load_chunk(student[rows], scratch, cols, temperature), logp_buf[:k],
                                    scratch, group)
            logq = log_softmax_into(load_chunk(teacher[rows], scratch, cols, teacher_scale), logq_buf[:k],
                                    scratch, group)
            f, pa, p = _chunk_terms(kind, beta, logp, logq, scratch[:k])
            if token_clip is not None:  # a clamped entry contributes no gradient (autograd of clamp)
                pa.masked_fill_(f > token_clip, 0.0)
                f.clamp_(max=token_clip)
            d = all_reduce(f.sum(dim=-1), dist.ReduceOp.SUM, group)
            per_token[rows] = torch.where(row_mask, d, torch.zeros_like(d))
            if grad is not None:  # g = p a - p sum_v p_v a_v, unscaled by the incoming gradient
                if token_clip is None and kind != "jsd":  # sum_v p_v a_v = KL + 1 (reverse) or -1 (forward):
                    sum_pa = d + 1.0 if kind == "reverse_kl" else torch.full_like(d, -1.0)  # no 2nd all-reduce
                else:
                    sum_pa = all_reduce(pa.sum(dim=-1), dist.ReduceOp.SUM, group)
                g = torch.addcmul(pa, p, sum_pa.unsqueeze(-1), value=-1.0, out=grad[rows])
                g.masked_fill_(~row_mask.unsqueeze(-1), 0.0)  # no host sync (boolean indexing would need one)
        ctx.grad, ctx.temperature, ctx.reusable, ctx.chunk = grad, temperature, reusable_backward, chunk
        return per_token

    @staticmethod
    def backward(ctx, grad_per_token):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("vocab_parallel_divergence: a second backward through one forward (retain_graph, "
                               "gradcheck) needs reusable_backward=True; or the student logits did not require grad")
        scale = (grad_per_token.to(torch.promote_types(grad.dtype, torch.float32)) / ctx.temperature).unsqueeze(-1)
        if ctx.reusable:
            return (grad * scale).to(grad.dtype), *([None] * 12)
        ctx.grad = None  # scaled in place: no second [tokens, shard] tensor, and no second backward
        for start in range(0, grad.shape[0], ctx.chunk):  # by chunk: a bf16 * fp32 product has an fp32 temporary
            grad[start:start + ctx.chunk].mul_(scale[start:start + ctx.chunk])
        return grad, *([None] * 12)


def vocab_parallel_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "reverse_kl",
                              group=None, loss_mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                              beta: float = 0.5, token_clip: Optional[float] = None, chunk_tokens: int = 1024,
                              vocab_range: VocabRange = None, reduction: str = "token_mean",
                              sequence_ids: Optional[torch.Tensor] = None, teacher_is_logprobs: bool = False,
                              token_weights: Optional[torch.Tensor] = None,
                              reusable_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence between student and teacher next-token distributions over the (sharded) vocabulary.

    Args: logits are [..., vocab_shard] (this rank's slice); ``group`` is the TP group (None = one process);
    ``kind`` reverse_kl | forward_kl | jsd (generalized JSD_beta; beta=0 is forward KL and beta=1 reverse KL
    exactly, as in TRL); ``temperature`` divides both logits; ``vocab_range`` = half-open valid global ids,
    columns outside get probability 0 whatever their value; ``teacher_is_logprobs`` = the teacher tensor holds
    normalised target log-probs (e.g. from a target builder): used as-is, no temperature; ``token_weights``
    (leading shape, float) replace the reduction's weights, for callers that normalise over a whole step of
    micro-batches and data-parallel ranks (masked tokens still count 0); ``reusable_backward`` = the graph may
    be backpropagated more than once (retain_graph, gradcheck) at the cost of a second [tokens, shard] tensor
    in the backward (default: the gradient is scaled in place, as megatron's vocab-parallel cross-entropy).
    Returns (loss scalar in the working dtype (fp32; fp64 for fp64 inputs) with grad to ``student_logits``
    only, per-token divergence [...] detached, 0 on masked tokens).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same [..., vocab_shard] shape")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    lead, width = student_logits.shape[:-1], student_logits.shape[-1]
    if loss_mask is None:
        loss_mask = torch.ones(lead, dtype=torch.bool, device=student_logits.device)
    if loss_mask.shape != lead:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal the logits' leading shape "
                         f"{tuple(lead)}")
    mask = loss_mask.bool()
    weights = loss_weights(mask, reduction, sequence_ids, token_weights).reshape(-1)
    cols = valid_columns(width, group, vocab_range, student_logits.device)
    per_token = _VocabParallelDivergence.apply(
        student_logits.reshape(-1, width), teacher_logits.detach().reshape(-1, width), mask.reshape(-1), kind,
        float(beta), float(temperature), token_clip, int(chunk_tokens), cols, group, teacher_is_logprobs,
        torch.is_grad_enabled() and student_logits.requires_grad, reusable_backward)
    loss = (per_token * weights.to(per_token.dtype)).sum()
    return loss, per_token.detach().reshape(lead)
