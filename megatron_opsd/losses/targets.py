"""Target builders (Purified OPSD, DemoPSD): target log-probs in the logits' sharded layout, no gradient.

Both return fp32 [..., vocab_shard] normalised log-probs (padded columns -inf) for
``vocab_parallel_divergence(student_logits, target, teacher_is_logprobs=True, ...)``. ``teacher_is_logprobs``
only skips the temperature: the divergence log-softmaxes its teacher input, and log-softmax of normalised
log-probs is the identity, so at temperature 1 passing the target as plain "teacher logits" gives the same
loss (tests/test_losses_targets.py checks both). The output is as large as the logits; working memory beyond
it is a few fp32 [chunk_tokens, vocab_shard] tensors per chunk, and each chunk costs one all-reduce MAX and
one SUM per log-softmax plus one SUM for the row statistic (residual mean / JSD).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opsd.losses.divergence import divergence_terms
from megatron_opsd.losses.vocab_parallel import (VocabRange, all_reduce, group_rank_and_size, log_softmax_stats,
                                                 to_fp32_masked, valid_columns, working_dtype)

# A residual log pi_T - log pi_R is +-inf (or NaN) only where a probability is exactly 0; it is clamped to
# this magnitude before centring so the vocabulary mean stays finite (the soft clip maps it to +-c anyway).
_RESIDUAL_BOUND = 1e4
PMI_CENTERS = ("uniform", "teacher")  # loss.pmi_center


def _log_softmax(x: torch.Tensor, group) -> torch.Tensor:
    (lse,) = log_softmax_stats(x, group=group)
    return x - lse[:, None]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all logits must have the same [..., vocab_shard] shape, got {shapes}")


def _n_valid(width: int, group, vocab_range: VocabRange) -> int:
    return width * group_rank_and_size(group)[1] if vocab_range is None else vocab_range[1] - vocab_range[0]


@torch.no_grad()
def pmi_target_logprobs(teacher_logits: torch.Tensor, reference_logits: torch.Tensor, base_logits: torch.Tensor,
                        *, group=None, vocab_range: VocabRange = None, temperature: float = 1.0,
                        clip: float = 10.0, beta: float = 1.0, center: str = "uniform",
                        chunk_tokens: int = 1024) -> torch.Tensor:
    """Purified OPSD's PMI target (arXiv 2607.02234; docs/losses.md, "The methods"), as log-probs:

        Delta(v)   = log pi_T(v) - log pi_R(v)                        residual
        Delta~(v)  = c * tanh((Delta(v) - m) / c)                     centred, soft clip
        log P(v)   = log softmax( log pi_0(v) + Delta~(v) / beta )

    ``teacher_logits`` = full teacher pi_T(.|q, r, y<t), ``reference_logits`` = reference-only teacher
    pi_R(.|r, y<t), ``base_logits`` = base pi_0(.|q, y<t); each is divided by ``temperature`` before its
    log-softmax. ``clip`` = c (10 in the paper), ``beta`` = 1 in the paper. The centre m (one all-reduce SUM;
    it only matters through the clip, softmax being shift-invariant): ``center="uniform"``, the plain mean of
    Delta over the valid vocabulary; ``"teacher"``, its mean under pi_T, sum_u pi_T(u) Delta(u) = KL(pi_T || pi_R).
    The uniform mean is set by the ~V tail tokens, so head tokens can sit far from it and be clipped; the
    teacher-weighted mean puts the clip's linear range around the tokens the teacher predicts.
    """
    _check_same_shape(teacher_logits=teacher_logits, reference_logits=reference_logits, base_logits=base_logits)
    if clip <= 0 or beta <= 0:
        raise ValueError(f"clip={clip} and beta={beta} must be > 0")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if center not in PMI_CENTERS:
        raise ValueError(f"center={center!r}: choose one of {PMI_CENTERS}")
    lead, width = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    cols = valid_columns(width, group, vocab_range, teacher_logits.device)
    n_valid = _n_valid(width, group, vocab_range)
    dtype = working_dtype(teacher_logits.dtype)
    flats = [t.detach().reshape(-1, width) for t in (teacher_logits, reference_logits, base_logits)]
    out = torch.empty(flats[0].shape, dtype=torch.float32, device=teacher_logits.device)
    for start in range(0, out.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        xs = [to_fp32_masked(f[rows], cols, temperature, dtype) for f in flats]
        lses = log_softmax_stats(*xs, group=group)  # one MAX + one SUM for the three
        log_t, log_r, log_0 = (x.sub_(lse[:, None]) for x, lse in zip(xs, lses))
        residual = torch.nan_to_num(log_t - log_r, nan=0.0, posinf=_RESIDUAL_BOUND, neginf=-_RESIDUAL_BOUND)
        residual.clamp_(-_RESIDUAL_BOUND, _RESIDUAL_BOUND)
        if cols is not None:
            residual.masked_fill_(~cols, 0.0)
        if center == "uniform":
            mean = all_reduce(residual.sum(dim=-1), dist.ReduceOp.SUM, group) / n_valid
        else:  # padded columns: pi_T = 0 and residual 0
            mean = all_reduce((log_t.exp() * residual).sum(dim=-1), dist.ReduceOp.SUM, group)
        residual = torch.tanh(residual.sub_(mean[:, None]).div_(clip)).mul_(clip / beta)
        out[rows] = _log_softmax(log_0.add_(residual), group).float()  # padded columns stay -inf via log_0
    return out.reshape(*lead, width)


@torch.no_grad()
def demopsd_target_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, group=None,
                            vocab_range: VocabRange = None, temperature: float = 1.0, alpha_max: float = 0.15,
                            beta: float = 8.0, chunk_tokens: int = 1024, return_alpha: bool = False):
    """DemoPSD's reverse-KL barycenter target (arXiv 2607.02502; docs/losses.md, "The methods"), as log-probs,
    student stop-gradient:

        d_t     = JSD(pi_S || pi_T)      (the symmetric JSD, M = (pi_S + pi_T) / 2, in nats, full vocabulary)
        alpha_t = (sigmoid(beta * d_t) - 0.5) * 2 * alpha_max          in [0, alpha_max)
        log P   = log softmax( (1 - alpha_t) log pi_T + alpha_t log pi_S )   i.e. P ∝ pi_T^(1-a) pi_S^a

    Train with ``kind="reverse_kl"`` (KL(pi_theta || sg(P))). ``alpha_max`` = 0.15 in the paper; ``beta`` is
    the sigmoid's sharpness (no published value found; config ``loss.demopsd_beta``). d_t <= ln 2,
    so alpha_t <= (sigmoid(beta ln 2) - 0.5) 2 alpha_max: the default 8 reaches 99.2% of alpha_max (1: 33%). Both
    logits are divided by ``temperature``. With ``return_alpha`` also returns alpha_t [...] (fp32) for logging.
    """
    _check_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max={alpha_max} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    lead, width = student_logits.shape[:-1], student_logits.shape[-1]
    cols = valid_columns(width, group, vocab_range, student_logits.device)
    dtype = working_dtype(student_logits.dtype)
    flat_s, flat_t = student_logits.detach().reshape(-1, width), teacher_logits.detach().reshape(-1, width)
    out = torch.empty(flat_s.shape, dtype=torch.float32, device=student_logits.device)
    alpha = torch.empty(flat_s.shape[0], dtype=torch.float32, device=student_logits.device)
    for start in range(0, out.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        s = to_fp32_masked(flat_s[rows], cols, temperature, dtype)
        t = to_fp32_masked(flat_t[rows], cols, temperature, dtype)
        lse_s, lse_t = log_softmax_stats(s, t, group=group)
        log_s, log_t = s.sub_(lse_s[:, None]), t.sub_(lse_t[:, None])
        jsd = all_reduce(divergence_terms("jsd", 0.5, log_s, log_t)[0].sum(dim=-1), dist.ReduceOp.SUM, group)
        a = (torch.sigmoid(beta * jsd) - 0.5) * (2.0 * alpha_max)
        finite = torch.isfinite(log_s) & torch.isfinite(log_t)  # both -inf exactly on padded columns
        mixed = torch.where(finite, (1.0 - a[:, None]) * log_t + a[:, None] * log_s,
                            torch.full_like(log_t, float("-inf")))
        out[rows] = _log_softmax(mixed, group).float()
        alpha[rows] = a.float()
    out = out.reshape(*lead, width)
    return (out, alpha.reshape(lead)) if return_alpha else out
