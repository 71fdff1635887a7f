"""Teacher top-k divergences vs a plain-torch full-vocabulary reference (fp64, log_softmax over the real vocab).

TP=1 in-process and TP=2 as real gloo process groups; padded vocabulary whose padded teacher columns hold the
*largest* values (a top-k that does not mask by id would pick them), k smaller than, larger than and equal to
the shard width, tail bucket and renormalised modes, every kind, loss mask, temperature.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_opsd.losses import topk_divergence, vocab_parallel_divergence, vocab_parallel_topk
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed

REAL_V, PADDED_V, B, S = 37, 40, 3, 5
T_TEACHER, T_STUDENT = 1.3, 0.9
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 implementation vs fp64 reference
# every kind with and without the tail, k below and above the TP=2 shard width (20); few cases, because each
# costs a handful of gloo collectives per chunk
CASES = [dict(kind=kind, beta=beta, k=k, tail=tail, token_clip=None)
         for kind, beta, k in (("reverse_kl", 0.5, 5), ("forward_kl", 0.5, 30), ("jsd", 0.3, 5), ("jsd", 0.3, 30))
         for tail in (True, False) if (kind, k, tail) != ("jsd", 30, True)]
CASES += [dict(kind="reverse_kl", beta=0.5, k=REAL_V, tail=True, token_clip=None),  # = full-vocabulary KL
          dict(kind="jsd", beta=0.5, k=REAL_V, tail=True, token_clip=None),
          dict(kind="reverse_kl", beta=0.5, k=8, tail=True, token_clip=0.02)]


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, PADDED_V, generator=gen) * 2
    teacher = torch.randn(B, S, PADDED_V, generator=gen) * 2
    student[..., REAL_V:] = 30.0  # garbage in padded columns
    teacher[..., REAL_V:] = 40.0  # the largest "logits": must never be chosen
    mask = torch.rand(B, S, generator=gen) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


def reference(student, teacher, mask, kind, beta, k, tail, token_clip):
    """fp64 plain autograd over the real vocabulary: (ids, teacher log-probs, teacher log tail, loss, per-token,
    grad [.., PADDED_V])."""
    s = student.double().clone().requires_grad_(True)
    logp = F.log_softmax(s[..., :REAL_V] / T_STUDENT, -1)
    logq = F.log_softmax(teacher.double()[..., :REAL_V] / T_TEACHER, -1)
    q_top, ids = logq.topk(k, dim=-1)
    p_top = logp.gather(-1, ids)
    outside = torch.ones_like(logq, dtype=torch.bool).scatter(-1, ids, False)
    q_tail = logq.masked_fill(~outside, -math.inf).logsumexp(-1)
    p_tail = logp.masked_fill(~outside, -math.inf).logsumexp(-1)
    if tail and k == REAL_V:  # the tail is empty on both sides: it contributes exactly 0
        lp, lq = p_top, q_top
    elif tail:
        lp, lq = torch.cat([p_top, p_tail[..., None]], -1), torch.cat([q_top, q_tail[..., None]], -1)
    else:
        lp, lq = p_top.log_softmax(-1), q_top.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    if kind == "jsd":
        m = beta * q + (1 - beta) * p
        f = beta * torch.xlogy(q, q / m) + (1 - beta) * torch.xlogy(p, p / m)
    elif kind == "forward_kl":
        f = q * (lq - lp)
    else:
        f = p * (lp - lq)
    if token_clip is not None:
        f = f.clamp(max=token_clip)
    per_token = f.sum(-1) * mask
    loss = per_token.sum() / mask.sum()
    loss.backward()
    return ids, q_top.detach(), q_tail.detach(), loss.detach(), per_token.detach(), s.grad


def run_cases(student, teacher, mask, group, rank, size):
    width = PADDED_V // size
    cols = slice(rank * width, (rank + 1) * width)
    out = []
    for case in CASES:
        t = teacher[..., cols].clone().requires_grad_(True)
        top = vocab_parallel_topk(t, case["k"], group=group, vocab_range=(0, REAL_V), temperature=T_TEACHER,
                                  chunk_tokens=8)
        assert not top.logprobs.requires_grad and not top.tail.requires_grad
        s = student[..., cols].clone().requires_grad_(True)
        loss, per_token = topk_divergence(s, top, kind=case["kind"], beta=case["beta"], tail=case["tail"],
                                          token_clip=case["token_clip"], group=group, loss_mask=mask,
                                          temperature=T_STUDENT, vocab_range=(0, REAL_V), chunk_tokens=8)
        loss.backward()
        assert t.grad is None
        out.append((top, loss.detach(), per_token, s.grad))
    return out


def tp_worker(student, teacher, mask):
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return run_cases(student, teacher, mask, group, dist.get_rank(group), dist.get_world_size(group))


def check(per_rank, student, teacher, mask):
    errors = {}
    for i, case in enumerate(CASES):
        top, loss, per_token, _ = per_rank[0][i]
        for other in per_rank[1:]:  # every rank holds the same ids, teacher log-probs and loss
            assert torch.equal(other[i][0].ids, top.ids) and torch.equal(other[i][1], loss)
        grad = torch.cat([r[i][3] for r in per_rank], dim=-1)
        ids, q_top, q_tail, ref_loss, ref_pt, ref_grad = reference(student, teacher, mask, **case)
        assert torch.equal(top.ids, ids), case
        assert (top.ids < REAL_V).all()
        torch.testing.assert_close(top.logprobs.double(), q_top, **TOL)
        torch.testing.assert_close(top.tail.double(), q_tail, **TOL)
        torch.testing.assert_close(loss.double(), ref_loss, **TOL, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(per_token.double(), ref_pt, **TOL, msg=lambda m: f"{case}: {m}")
        assert grad[..., REAL_V:].abs().max() == 0, "padded columns get no gradient"
        torch.testing.assert_close(grad.double(), ref_grad, **TOL, msg=lambda m: f"{case}: {m}")
        assert ref_grad.abs().max() > 1e-3 and ref_loss.abs() > 1e-3  # not vacuous
        errors[str(case)] = (abs(loss.double() - ref_loss).item(), (grad.double() - ref_grad).abs().max().item())
    return errors


def test_topk_tp1_matches_full_vocab_reference():
    student, teacher, mask = make_inputs()
    check([run_cases(student, teacher, mask, None, 0, 1)], student, teacher, mask)


def test_topk_tp2_matches_full_vocab_reference():
    student, teacher, mask = make_inputs(seed=2)
    per_rank = run_distributed(tp_worker, 2, ParallelConfig(tensor_model_parallel_size=2), student, teacher, mask)
    errors = check(per_rank, student, teacher, mask)
    print("max |loss - ref|, max |grad - ref|:", max(e[0] for e in errors.values()), max(e[1] for e in errors.values()))


def test_all_k_with_tail_equals_full_vocabulary_divergence():
    """k = the whole vocabulary: the tail is empty (log 0 = -inf on both sides, no NaN) and the loss and its
    gradient are the full-vocabulary divergence's."""
    student, teacher, mask = make_inputs(seed=3)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        top = vocab_parallel_topk(teacher, REAL_V, vocab_range=(0, REAL_V))
        assert torch.isneginf(top.tail).all()
        a = student.clone().requires_grad_(True)
        loss, _ = topk_divergence(a, top, kind=kind, loss_mask=mask, vocab_range=(0, REAL_V))
        loss.backward()
        b = student.clone().requires_grad_(True)
        full, _ = vocab_parallel_divergence(b, teacher, kind=kind, loss_mask=mask, vocab_range=(0, REAL_V))
        full.backward()
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        assert torch.isfinite(a.grad).all()


def test_tail_mass_is_exact_when_topk_holds_almost_everything():
    """The tail is a log-sum-exp over the other columns, not log(1 - sum p): with a tail mass ~1e-12 an fp32
    1 - sum p would be 0 or ~1e-7; ours matches the fp64 reference to 1e-5 relative."""
    k = 4
    teacher = torch.zeros(2, REAL_V)
    teacher[:, :k] = 30.0 + torch.arange(k)
    teacher[1, 10] = 25.0
    top = vocab_parallel_topk(teacher, k)
    logq = F.log_softmax(teacher.double(), -1)
    ref_tail = logq[:, k:].logsumexp(-1)
    assert ref_tail[0].exp() < 1e-11
    torch.testing.assert_close(top.tail.double(), ref_tail, rtol=1e-5, atol=0)
    naive = torch.log1p(-top.logprobs.exp().sum(-1))  # what log(1 - sum p) gives in fp32
    assert not torch.allclose(naive.double(), ref_tail, rtol=1e-2)
    # total mass: top-k + tail = 1
    total = torch.cat([top.logprobs, top.tail[:, None]], -1).double().logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-5)  # fp32 log-probs


def test_bad_inputs_are_named():
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="k=9"):
        vocab_parallel_topk(x, 9)
    with pytest.raises(ValueError, match=r"k=8 must be in \[1, 7\]"):
        vocab_parallel_topk(x, 8, vocab_range=(0, 7))
    top = vocab_parallel_topk(x, 2)
    with pytest.raises(ValueError, match="kind="):
        topk_divergence(x, top, kind="tv")
    with pytest.raises(ValueError, match="teacher_topk"):
        topk_divergence(torch.zeros(3, 2, 8), top)
