"""Vocab-parallel building blocks: shard layout, padded-column masking, distributed log-sum-exp, entropy.

Megatron's ``vocab_parallel_cross_entropy`` pattern: every tensor-parallel rank holds an equal contiguous
slice of the vocabulary (VocabUtility layout, global offset = group rank x shard width). Row statistics are
combined with all-reduce MAX / SUM so the vocabulary is never gathered.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

VocabRange = Optional[tuple[int, int]]


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, world size) inside ``group``; ``None`` means a single process holding the whole vocabulary."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    """In-place all-reduce that is a no-op for a single process."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def valid_columns(shard_width: int, group, vocab_range: VocabRange, device) -> Optional[torch.Tensor]:
    """Bool [shard_width] of this shard's columns whose global id lies in ``vocab_range`` (None = all valid)."""
    if vocab_range is None:
        return None
    lo, hi = vocab_range
    rank, size = group_rank_and_size(group)
    if not (0 <= lo < hi <= shard_width * size):
        raise ValueError(f"vocab_range={vocab_range} must satisfy 0 <= lo < hi <= tp_size * shard_width "
                         f"= {shard_width * size}; pass (0, real_vocab_size)")
    ids = torch.arange(shard_width, device=device) + rank * shard_width
    return (ids >= lo) & (ids < hi)


def mask_padded_vocab(logits: torch.Tensor, real_vocab_size: int, group) -> torch.Tensor:
    """This rank's padded vocabulary columns set to -inf (out of place), for a loss that takes no vocabulary range
    (megatron's ``vocab_parallel_cross_entropy``); unchanged when the shard has no padded column."""
    rank, _ = group_rank_and_size(group)
    width = logits.shape[-1]
    if (rank + 1) * width <= real_vocab_size:
        return logits
    cols = valid_columns(width, group, (0, real_vocab_size), logits.device)
    return logits.masked_fill(~cols, float("-inf"))


def ids_layout(logits: torch.Tensor, ids: torch.Tensor, temperature: float, group,
               vocab_range: VocabRange) -> tuple[torch.Size, int, Optional[torch.Tensor]]:
    """(leading shape, shard width, ``valid_columns``) of a log-probs-at-global-``ids`` call, after checking that
    ``ids`` is [..., k] over the logits' leading shape and the temperature is positive."""
    lead, width = logits.shape[:-1], logits.shape[-1]
    if ids.shape[:-1] != lead:
        raise ValueError(f"ids shape {tuple(ids.shape)} must be the logits' leading shape {tuple(lead)} + [k]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    return lead, width, valid_columns(width, group, vocab_range, logits.device)


def _scale_and_mask_(out: torch.Tensor, cols: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """In place: divide by ``scale`` (temperature) and set padded columns to -inf.

    Padded logits from megatron are arbitrary numbers, so the mask is by column id, not by value.
    """
    if scale != 1.0:
        out.div_(scale)
    if cols is not None:
        out[:, ~cols] = float("-inf")
    return out


def to_fp32_masked(x: torch.Tensor, cols: Optional[torch.Tensor], scale: float, dtype: torch.dtype) -> torch.Tensor:
    """A new chunk in working precision, divided by ``scale``, padded columns at -inf (the caller owns it)."""
    return _scale_and_mask_(x.to(dtype, copy=True), cols, scale)


def load_chunk(x: torch.Tensor, scratch: torch.Tensor, cols: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``to_fp32_masked`` written into ``scratch`` (reused across chunks, so no page-faulting allocation per
    chunk); ``x`` itself when nothing needs changing."""
    if x.dtype == scratch.dtype and scale == 1.0 and cols is None:
        return x
    return _scale_and_mask_(scratch[: x.shape[0]].copy_(x), cols, scale)


def _global_row_max(local_max: torch.Tensor, group) -> torch.Tensor:
    """All-reduce MAX of per-row maxima; rows that are -inf everywhere get 0 so that x - max stays -inf."""
    all_reduce(local_max, dist.ReduceOp.MAX, group)
    return torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))


def log_softmax_into(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor, group) -> torch.Tensor:
    """Global log-softmax of sharded [rows, shard] ``x`` written into ``out``.

    One process: torch's fused kernel. Tensor-parallel: all-reduce MAX and SUM of the row statistics, as
    megatron's vocab-parallel cross-entropy, working in place in ``scratch`` (``x`` may already live there).
    """
    if group is None or dist.get_world_size(group) == 1:
        return torch.log_softmax(x, dim=-1, out=out)
    if x.data_ptr() != scratch.data_ptr():
        x = scratch[: x.shape[0]].copy_(x)
    x.sub_(_global_row_max(x.amax(dim=-1), group).unsqueeze(-1))
    sum_exp = all_reduce(torch.exp(x, out=out).sum(dim=-1), dist.ReduceOp.SUM, group)
    return torch.sub(x, sum_exp.log_().unsqueeze(-1), out=out)


def log_softmax_stats(*xs: torch.Tensor, group) -> list[torch.Tensor]:
    """Global log-sum-exp per row of sharded [rows, shard] chunks: one all-reduce MAX and one SUM for all."""
    row_max = _global_row_max(torch.stack([x.max(dim=-1).values for x in xs]), group)
    sum_exp = torch.stack([torch.exp(x - m.unsqueeze(-1)).sum(dim=-1) for x, m in zip(xs, row_max)])
    all_reduce(sum_exp, dist.ReduceOp.SUM, group)
    return list(row_max + torch.log(sum_exp))


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, group=None, vocab_range: VocabRange = None,
                           temperature: float = 1.0, chunk_tokens: int = 1024) -> torch.Tensor:
    """Per-token entropy H(softmax(logits / temperature)) of sharded logits; returns fp32 [leading shape].

    H = lse - sum_v p_v x_v, so one extra all-reduce SUM per chunk on top of the log-sum-exp.
    """
    lead, width = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, width)
    dtype = working_dtype(logits.dtype)
    cols = valid_columns(width, group, vocab_range, logits.device)
    out = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        x = to_fp32_masked(flat[start:start + chunk_tokens], cols, temperature, dtype)
        (lse,) = log_softmax_stats(x, group=group)
        p = torch.exp(x - lse.unsqueeze(-1))
        px = torch.where(p > 0, p * x, torch.zeros_like(p)).sum(dim=-1)
        all_reduce(px, dist.ReduceOp.SUM, group)
        out[start:start + chunk_tokens] = lse - px
    return out.reshape(lead).float()
