"""Sampled-token estimators and vocab-parallel log-probs at given ids, vs plain torch references.

The estimator tests enumerate the whole (small) vocabulary: E_{y~p_S}[k1] = E[k3] = KL(p_S||p_T),
E[grad pg] = grad KL(p_S||p_T), E[grad k3] = grad KL(p_T||p_S), E[grad k1] = 0.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_opsd.losses import vocab_parallel_divergence
from megatron_opsd.losses.sampled import sampled_token_loss, vocab_parallel_logprobs_at, vocab_parallel_token_logprobs
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed

REAL_V, PADDED_V, T = 37, 40, 1.3


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, PADDED_V, generator=gen) * 2
    logits[..., REAL_V:] = 25.0  # garbage in padded columns
    ids = torch.randint(0, REAL_V, (3, 5, 4), generator=gen)
    upstream = torch.randn(3, 5, 4, generator=gen)
    return logits, ids, upstream


def run_logprobs(logits, ids, upstream, dtype, group, rank, size):
    width = logits.shape[-1] // size
    x = logits[..., rank * width:(rank + 1) * width].to(getattr(torch, dtype)).requires_grad_(True)
    lp = vocab_parallel_logprobs_at(x, ids, group=group, temperature=T, vocab_range=(0, REAL_V), chunk_tokens=4)
    (lp * upstream).sum().backward()
    return lp.detach(), x.grad


def tp_worker(logits, ids, upstream, dtype):
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return run_logprobs(logits, ids, upstream, dtype, group, dist.get_rank(group), dist.get_world_size(group))


def check_logprobs(per_rank, logits, ids, upstream, dtype):
    x = logits.to(getattr(torch, dtype)).float().requires_grad_(True)
    ref = F.log_softmax(x[..., :REAL_V] / T, -1).gather(-1, ids)
    (ref * upstream).sum().backward()
    grad = torch.cat([g for _, g in per_rank], dim=-1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=1e-3)
    for lp, _ in per_rank:
        torch.testing.assert_close(lp, ref.detach(), rtol=1e-5, atol=1e-5)
    assert grad[..., REAL_V:].abs().max() == 0
    torch.testing.assert_close(grad.float(), x.grad, **tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprobs_at_tp1(dtype):
    logits, ids, upstream = make_inputs()
    check_logprobs([run_logprobs(logits, ids, upstream, dtype, None, 0, 1)], logits, ids, upstream, dtype)


def test_logprobs_at_tp2():
    logits, ids, upstream = make_inputs(seed=2)
    per_rank = run_distributed(tp_worker, 2, ParallelConfig(tensor_model_parallel_size=2), logits, ids, upstream,
                               "float32")
    check_logprobs(per_rank, logits, ids, upstream, "float32")


def expected_over_vocab(estimator, student, teacher):
    """(sum_y p_S(y) * estimator value, sum_y p_S(y) * grad) by enumerating y, one token per row."""
    p = F.softmax(student, -1).detach()
    value, grad = torch.zeros(student.shape[0], dtype=student.dtype), torch.zeros_like(student)
    for y in range(student.shape[-1]):
        z = student.clone().requires_grad_(True)
        y_ids = torch.full((student.shape[0],), y)
        ls = vocab_parallel_token_logprobs(z, y_ids)
        lt = vocab_parallel_token_logprobs(teacher, y_ids)
        for n in range(student.shape[0]):  # per-token weight p_S(y | n)
            loss, per_token = sampled_token_loss(ls[n:n + 1], lt[n:n + 1], estimator=estimator, reduction="sum")
            value[n] += p[n, y] * (loss.detach() if estimator != "pg" else per_token[0])
            grad += p[n, y] * torch.autograd.grad(loss, z, retain_graph=True)[0]
    return value, grad


@pytest.mark.parametrize("estimator", ["k1", "k3", "pg"])
def test_estimators_in_expectation(estimator):
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    value, grad = expected_over_vocab(estimator, student, teacher)
    s = student.clone().requires_grad_(True)
    reverse, kl = vocab_parallel_divergence(s, teacher, reduction="sum")
    reverse.backward()
    torch.testing.assert_close(value, kl)  # k1, k3 and the pg's logged k1 are unbiased for KL(p_S||p_T)
    if estimator == "pg":
        torch.testing.assert_close(grad, s.grad)
    elif estimator == "k3":
        f = s.detach().clone().requires_grad_(True)
        vocab_parallel_divergence(f, teacher, kind="forward_kl", reduction="sum")[0].backward()
        torch.testing.assert_close(grad, f.grad)
    else:
        torch.testing.assert_close(grad, torch.zeros_like(grad))
    assert s.grad.abs().max() > 1e-2


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_sampled_loss_values_and_mask(reduction):
    gen = torch.Generator().manual_seed(7)
    ls = (-torch.rand(2, 4, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    lt = -torch.rand(2, 4, generator=gen, dtype=torch.float64) * 3
    mask = torch.tensor([[True, True, False, True], [False, True, False, False]])
    loss, per_token = sampled_token_loss(ls, lt, estimator="k3", loss_mask=mask, reduction=reduction)
    r = lt - ls
    k3 = (torch.exp(r) - 1 - r) * mask
    expected = {"sum": k3.sum(), "token_mean": k3.sum() / mask.sum(),
                "sequence_mean": (k3.sum(-1) / mask.sum(-1)).mean()}[reduction]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(per_token, k3.detach())
    loss.backward()
    assert ls.grad[~mask].abs().max() == 0
    zero, _ = sampled_token_loss(ls, lt, loss_mask=torch.zeros_like(mask))
    assert zero.item() == 0


def test_bad_inputs_are_named():
    ls, lt = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="estimator="):
        sampled_token_loss(ls, lt, estimator="k2")
    with pytest.raises(ValueError, match="loss_mask shape"):
        sampled_token_loss(ls, lt, loss_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="ids shape"):
        vocab_parallel_logprobs_at(torch.zeros(2, 3, 5), torch.zeros(3, 2, 1, dtype=torch.long))


def test_token_weights_replace_the_reduction():
    """token_weights = reduction_weights(mask, r) gives the reduction's loss and gradient; masked tokens count 0."""
    from megatron_opsd.losses.divergence import reduction_weights

    gen = torch.Generator().manual_seed(9)
    ls = (-torch.rand(2, 4, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    lt = -torch.rand(2, 4, generator=gen, dtype=torch.float64) * 3
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    for estimator in ("k1", "k3", "pg"):
        for reduction in ("token_mean", "sequence_mean"):
            ref, _ = sampled_token_loss(ls, lt, estimator=estimator, loss_mask=mask, reduction=reduction)
            (g_ref,) = torch.autograd.grad(ref, ls)
            weights = reduction_weights(mask, reduction, None) + (~mask) * 5.0  # junk on masked tokens is ignored
            got, _ = sampled_token_loss(ls, lt, estimator=estimator, loss_mask=mask, token_weights=weights)
            (g_got,) = torch.autograd.grad(got, ls)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
            torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="token_weights shape"):
        sampled_token_loss(ls, lt, token_weights=torch.ones(3))
