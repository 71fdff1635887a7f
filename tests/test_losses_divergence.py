"""Vocab-parallel divergences vs a plain unsharded torch reference (log_softmax over the real vocabulary).

TP=1 in-process, TP=2/4 as real gloo process groups (megatron's TP group); padded vocabulary with garbage
values in the padded columns, loss masks, temperature 1.3, fp32 and bf16 inputs, every kind and reduction.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_opsd.losses import vocab_parallel_divergence, vocab_parallel_entropy
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed

REAL_V, PADDED_V, B, S, T = 37, 40, 3, 5, 1.3
CASES = [dict(kind=k, beta=b, reduction=r, dtype=d, token_clip=None)
         for k, b in (("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3))
         for r in ("token_mean", "sequence_mean", "sum") for d in ("float32", "bfloat16")]
CASES += [dict(kind="reverse_kl", beta=0.5, reduction="sum", dtype="float32", token_clip=0.02),
          dict(kind="jsd", beta=0.5, reduction="token_mean", dtype="float32", token_clip=0.01)]


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, PADDED_V, generator=gen) * 2
    teacher = torch.randn(B, S, PADDED_V, generator=gen) * 2
    student[..., REAL_V:] = 30.0  # padded columns hold arbitrary values: must be masked by id, not by value
    teacher[..., REAL_V:] = -7.0
    mask = torch.rand(B, S, generator=gen) > 0.3
    mask[1] = False  # one fully masked sequence (sequence_mean must skip it)
    mask[0, 0] = True
    return student, teacher, mask


def reference(student, teacher, mask, kind, beta, reduction, token_clip, temperature=T):
    """Plain autograd over the gathered real vocabulary; returns (loss, per_token, grad [.., PADDED_V])."""
    s = student.float().clone().requires_grad_(True)
    logp = F.log_softmax(s[..., :REAL_V] / temperature, dim=-1)
    logq = F.log_softmax(teacher.float()[..., :REAL_V] / temperature, dim=-1)
    p, q = logp.exp(), logq.exp()
    if kind == "jsd" and beta not in (0.0, 1.0):
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log(1 - beta))  # log(b q + (1-b) p)
        f = beta * q * (logq - logm) + (1 - beta) * p * (logp - logm)
    elif kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        f = q * (logq - logp)
    else:
        f = p * (logp - logq)
    if token_clip is not None:
        f = f.clamp(max=token_clip)
    per_token = f.sum(-1) * mask
    m = mask.float()
    if reduction == "sum":
        loss = per_token.sum()
    elif reduction == "token_mean":
        loss = per_token.sum() / m.sum().clamp(min=1)
    else:
        counts = m.sum(-1)
        has = counts > 0
        loss = (per_token.sum(-1)[has] / counts[has]).mean()
    loss.backward()
    return loss.detach(), per_token.detach(), s.grad


def run_cases(student, teacher, mask, cases, group, rank, size):
    """Each rank takes its vocabulary shard of the same full logits; returns per case (loss, per_token, grad)."""
    width = student.shape[-1] // size
    cols = slice(rank * width, (rank + 1) * width)
    out = []
    for case in cases:
        dtype = getattr(torch, case["dtype"])
        s = student[..., cols].to(dtype).requires_grad_(True)
        t = teacher[..., cols].to(dtype)
        loss, per_token = vocab_parallel_divergence(
            s, t, kind=case["kind"], beta=case["beta"], reduction=case["reduction"], token_clip=case["token_clip"],
            group=group, loss_mask=mask, temperature=T, vocab_range=(0, REAL_V), chunk_tokens=4)
        loss.backward()
        out.append((loss.detach(), per_token, s.grad))
    entropy = vocab_parallel_entropy(student[..., cols], group=group, vocab_range=(0, REAL_V), temperature=T,
                                     chunk_tokens=4)
    return out, entropy


def tp_worker(student, teacher, mask, cases):
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return run_cases(student, teacher, mask, cases, group, dist.get_rank(group), dist.get_world_size(group))


def check_against_reference(per_rank, student, teacher, mask):
    for i, case in enumerate(CASES):
        loss, per_token, _ = per_rank[0][0][i]
        grad = torch.cat([rank_out[0][i][2] for rank_out in per_rank], dim=-1)
        for rank_out in per_rank[1:]:  # every rank returns the same loss
            torch.testing.assert_close(rank_out[0][i][0], loss, rtol=0, atol=0)
        dtype = getattr(torch, case["dtype"])
        ref_loss, ref_pt, ref_grad = reference(student.to(dtype), teacher.to(dtype), mask, case["kind"], case["beta"],
                                               case["reduction"], case["token_clip"])
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(per_token, ref_pt, rtol=1e-4, atol=1e-6, msg=lambda m: f"{case}: {m}")
        assert grad.dtype == dtype
        assert grad[..., REAL_V:].abs().max() == 0, "padded columns must get zero gradient"
        torch.testing.assert_close(grad.float(), ref_grad, **tol, msg=lambda m: f"{case}: {m}")
        assert ref_grad.abs().max() > 1e-3  # the comparison is not vacuous
    ref_entropy = -(F.softmax(student[..., :REAL_V] / T, -1) * F.log_softmax(student[..., :REAL_V] / T, -1)).sum(-1)
    for rank_out in per_rank:
        torch.testing.assert_close(rank_out[1], ref_entropy, rtol=1e-5, atol=1e-6)


def test_tp1_matches_reference():
    student, teacher, mask = make_inputs()
    check_against_reference([run_cases(student, teacher, mask, CASES, None, 0, 1)], student, teacher, mask)


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tensor_parallel_matches_reference(tp):
    """The vocab-parallel divergences at TP=2 (and TP=4, slow) in spawned gloo ranks equal the unsharded reference:
    loss, per-token values, gradients and entropy; TP=1 alone cannot show the cross-rank reductions."""
    student, teacher, mask = make_inputs(seed=tp)
    per_rank = run_distributed(tp_worker, tp, ParallelConfig(tensor_model_parallel_size=tp), student, teacher, mask,
                               CASES)
    check_against_reference(per_rank, student, teacher, mask)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_gradcheck_float64(kind, beta, reduction):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])

    def fn(x):
        return vocab_parallel_divergence(x, t, kind=kind, beta=beta, loss_mask=mask, temperature=T, vocab_range=(0, 6),
                                         chunk_tokens=2, reduction=reduction, reusable_backward=True)[0]

    assert torch.autograd.gradcheck(fn, (s,))


def test_jsd_endpoints_are_kl():
    student, teacher, mask = make_inputs()
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = vocab_parallel_divergence(student, teacher, kind="jsd", beta=beta, loss_mask=mask, vocab_range=(0, REAL_V))
        b = vocab_parallel_divergence(student, teacher, kind=kind, loss_mask=mask, vocab_range=(0, REAL_V))
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_all_masked_gives_zero_loss_and_grad(kind):
    student, teacher, _ = make_inputs()
    student = student.requires_grad_(True)
    for reduction in ("token_mean", "sequence_mean", "sum"):
        loss, per_token = vocab_parallel_divergence(student, teacher, kind=kind, reduction=reduction,
                                                    loss_mask=torch.zeros(B, S, dtype=torch.bool))
        loss.backward()
        assert loss.item() == 0 and not torch.isnan(loss)
        assert per_token.abs().max() == 0
        assert student.grad.abs().max() == 0
        student.grad = None


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_identical_student_teacher(kind):
    student, _, mask = make_inputs()
    s = student.clone().requires_grad_(True)
    loss, per_token = vocab_parallel_divergence(s, student.clone(), kind=kind, loss_mask=mask, temperature=T,
                                                vocab_range=(0, REAL_V))
    loss.backward()
    assert abs(loss.item()) < 1e-6 and per_token.abs().max() < 1e-6
    assert s.grad.abs().max() < 1e-7


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_neg_inf_logits_in_real_vocab(kind):
    """-inf on the same entries for both (e.g. banned tokens): finite loss/grads equal to a -1e30 reference."""
    student, teacher, mask = make_inputs()
    banned = torch.rand(B, S, PADDED_V, generator=torch.Generator().manual_seed(3)) < 0.2
    student, teacher = student.masked_fill(banned, -math.inf), teacher.masked_fill(banned, -math.inf)
    s = student.clone().requires_grad_(True)
    loss, per_token = vocab_parallel_divergence(s, teacher, kind=kind, loss_mask=mask, temperature=T,
                                                vocab_range=(0, REAL_V), chunk_tokens=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert s.grad[banned].abs().max() == 0
    ref_loss, ref_pt, ref_grad = reference(student.masked_fill(banned, -1e30), teacher.masked_fill(banned, -1e30),
                                           mask, kind, 0.5, "token_mean", None)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_huge_logits(kind):
    student, teacher, mask = make_inputs()
    student, teacher = student * 5e3, teacher * 5e3  # |logits| up to ~1e4
    s = student.clone().requires_grad_(True)
    loss, _ = vocab_parallel_divergence(s, teacher, kind=kind, loss_mask=mask, vocab_range=(0, REAL_V))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    ref_loss, _, ref_grad = reference(student, teacher, mask, kind, 0.5, "token_mean", None, temperature=1.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_sequence_ids_for_seq_batch_layout():
    """Megatron's [seq, batch, vocab] layout with explicit sequence_ids equals the [batch, seq] row inference."""
    student, teacher, mask = make_inputs()
    ids = torch.arange(B).unsqueeze(0).expand(S, B)
    a, pa = vocab_parallel_divergence(student, teacher, loss_mask=mask, reduction="sequence_mean")
    b, pb = vocab_parallel_divergence(student.transpose(0, 1), teacher.transpose(0, 1), loss_mask=mask.t(),
                                      reduction="sequence_mean", sequence_ids=ids)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(pa, pb.t())


def test_teacher_gets_no_grad_and_bad_inputs_are_named():
    student, teacher, mask = make_inputs()
    s, t = student.requires_grad_(True), teacher.requires_grad_(True)
    vocab_parallel_divergence(s, t, loss_mask=mask)[0].backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="kind="):
        vocab_parallel_divergence(s, t, kind="kl")
    with pytest.raises(ValueError, match="loss_mask shape"):
        vocab_parallel_divergence(s, t, loss_mask=mask.t())
    with pytest.raises(ValueError, match="vocab_range"):
        vocab_parallel_divergence(s, t, vocab_range=(0, 41))
    with pytest.raises(ValueError, match="sequence_ids"):
        vocab_parallel_divergence(s.reshape(-1, PADDED_V), t.reshape(-1, PADDED_V), reduction="sequence_mean")


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_in_place_backward_equals_reusable_and_refuses_a_second_pass(kind):
    """The default backward scales the gradient computed in the forward in place (no second [tokens, vocab]
    tensor): same values as the reusable backward, bf16 included, and a second backward is a clear error."""
    student, teacher, mask = make_inputs()
    weights = torch.rand(B, S, generator=torch.Generator().manual_seed(5))  # a non-uniform incoming gradient
    for dtype, tol in ((torch.float32, 0.0), (torch.bfloat16, 1e-2)):
        grads = []
        for reusable in (False, True):
            s = student.to(dtype, copy=True).requires_grad_(True)
            loss, _ = vocab_parallel_divergence(s, teacher.to(dtype), kind=kind, loss_mask=mask, temperature=T,
                                                vocab_range=(0, REAL_V), chunk_tokens=3, token_weights=weights,
                                                reusable_backward=reusable)
            loss.backward(retain_graph=True)
            grads.append(s.grad.float().clone())
            if reusable:
                loss.backward()  # accumulates the same gradient again
                torch.testing.assert_close(s.grad.float(), 2 * grads[-1], rtol=tol, atol=tol)
            else:
                with pytest.raises(RuntimeError, match="reusable_backward=True"):
                    loss.backward()
        assert grads[0].abs().max() > 0
        torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)
    with torch.no_grad():  # no gradient is computed or kept when none can be asked for
        s = student.requires_grad_(True)
        loss, _ = vocab_parallel_divergence(s, teacher, kind=kind, loss_mask=mask)
    assert not loss.requires_grad


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_chunk_loop_has_no_host_syncs_and_chunking_is_exact(kind, monkeypatch):
    """The chunk loop decides which chunks hold tokens once, from one host copy of the mask (issue 31, 9b): no
    ``bool(tensor)`` per chunk. Chunks fully masked, partly masked and full give the same per-token values and
    gradient, bit for bit, as one chunk holding every row."""
    torch.manual_seed(3)
    student = torch.randn(10, 33, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(10, 33, dtype=torch.float64)
    mask = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)  # chunks of 3: empty, partial, full, partial
    whole = vocab_parallel_divergence(student, teacher, kind=kind, loss_mask=mask, chunk_tokens=10)
    (grad_whole,) = torch.autograd.grad(whole[0], student)
    conversions = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: conversions.append(t.shape) or real_bool(t))
    chunked = vocab_parallel_divergence(student, teacher, kind=kind, loss_mask=mask, chunk_tokens=3)
    monkeypatch.undo()
    (grad_chunked,) = torch.autograd.grad(chunked[0], student)
    assert conversions == []
    assert torch.equal(whole[1], chunked[1]) and torch.equal(grad_whole, grad_chunked)
    assert torch.equal(grad_chunked[~mask], torch.zeros_like(grad_chunked[~mask]))


def test_mask_padded_vocab_hides_only_the_padded_columns():
    """megatron's cross-entropy (SFT's loss) takes no vocabulary range: the padded columns go to -inf first, and a
    padded column's logit then has no effect on the CE of the real vocabulary's softmax."""
    from megatron_opsd.losses.vocab_parallel import mask_padded_vocab

    logits = torch.randn(3, 8, dtype=torch.float64)
    masked = mask_padded_vocab(logits, 6, group=None)
    torch.testing.assert_close(masked.log_softmax(-1)[:, :6], logits[:, :6].log_softmax(-1), rtol=0, atol=1e-12)
    assert torch.isneginf(masked[:, 6:]).all() and not torch.isneginf(logits).any()  # out of place
    assert mask_padded_vocab(logits, 8, group=None) is logits  # nothing padded: no copy
