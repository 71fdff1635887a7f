"""The one loss dispatch (losses/objective.py), single process: the teacher signal keeps only what the coverage
reads, the precomputed signal and the in-loss path give the same loss and gradient, and the entropy metrics are
computed only when logged (by default only with full coverage)."""
import dataclasses

import pytest
import torch

from megatron_opsd.config import LossConfig
from megatron_opsd.losses import Objective, TeacherSignal, vocab_parallel_entropy

N, WIDTH, REAL_V = 6, 40, 37
COMBINATIONS = [("full", "reverse_kl"), ("full", "jsd"), ("topk", "forward_kl"), ("sampled", "pg"), ("sampled", "k3")]


def inputs():
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(N, WIDTH, generator=g, dtype=torch.float64) * 2 for _ in range(3)]  # full, ref-only, base
    student = torch.randn(N, WIDTH, generator=g, dtype=torch.float64, requires_grad=True)
    token_ids = torch.randint(0, REAL_V, (N,), generator=g)
    weights = torch.tensor([0.2, 0.2, 0.0, 0.2, 0.2, 0.2], dtype=torch.float64)
    return rows, student, token_ids, weights


def objective(coverage, divergence, **kw):
    return Objective(LossConfig(coverage=coverage, divergence=divergence, top_k=5, temperature=1.3, **kw),
                     vocab_range=(0, REAL_V))


@pytest.mark.parametrize("target", ["teacher", "pmi"])
@pytest.mark.parametrize("coverage, divergence", COMBINATIONS)
def test_precomputed_signal_equals_the_in_loss_path(coverage, divergence, target):
    rows, student, token_ids, weights = inputs()
    obj = objective(coverage, divergence, target=target, pmi_clip=2.0)
    precomputed = obj.teacher_signal(rows, token_ids, weights)
    in_loss = TeacherSignal(target=obj.target(rows))  # what a DemoPSD-like signal carries: compacted in the loss
    losses, grads = [], []
    for signal in (precomputed, in_loss):
        loss, per_token = obj.loss(student, signal, token_ids, weights)
        (grad,) = torch.autograd.grad(loss, student)
        losses.append(loss)
        grads.append(grad)
        assert per_token[2] == 0  # zero-weight token
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert losses[0].abs() > 1e-3


def held_elements(part) -> int:
    """Tensor elements a signal part keeps alive from the teacher's forward to the student's loss."""
    if isinstance(part, torch.Tensor):
        return part.numel()
    if dataclasses.is_dataclass(part):
        return sum(held_elements(getattr(part, f.name)) for f in dataclasses.fields(part))
    return sum(held_elements(p) for p in part) if isinstance(part, tuple) else 0


@pytest.mark.parametrize("coverage, divergence, per_token", [("full", "jsd", WIDTH), ("topk", "reverse_kl", 2 * 5 + 1),
                                                             ("sampled", "pg", 1)])
def test_signal_keeps_only_the_coverage_part(coverage, divergence, per_token):
    """The signal holds the vocabulary row only for full coverage; top-k keeps the teacher's own top 5 (ids,
    log-probs at the loss temperature, the tail's mass), sampled the teacher's log-prob of each sampled token."""
    rows, _, token_ids, weights = inputs()
    signal = objective(coverage, divergence).teacher_signal(rows[:1], token_ids, weights)
    assert held_elements(signal.compact) == N * per_token and signal.target is None
    logprobs = (rows[0][:, :REAL_V] / 1.3).log_softmax(-1)  # the reference: the teacher at the loss temperature
    if coverage == "full":
        torch.testing.assert_close(signal.compact.values, rows[0], rtol=0, atol=0)
    if coverage == "topk":
        top = logprobs.topk(5)
        assert torch.equal(signal.compact.ids, top.indices)
        torch.testing.assert_close(signal.compact.logprobs, top.values, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.cat([signal.compact.logprobs, signal.compact.tail[:, None]], -1)
                                   .logsumexp(-1), torch.zeros(N, dtype=torch.float64), rtol=0, atol=1e-12)
    if coverage == "sampled":
        torch.testing.assert_close(signal.compact, logprobs.gather(-1, token_ids[:, None])[:, 0], rtol=0, atol=1e-12)
    demopsd = objective(coverage, divergence, target="demopsd").teacher_signal(rows[:1], token_ids, weights)
    assert demopsd.compact is None and demopsd.target.values is rows[0]  # the barycenter needs the student


@pytest.mark.parametrize("coverage, divergence, log_entropy, logged", [
    ("full", "reverse_kl", None, True), ("topk", "reverse_kl", None, False), ("sampled", "pg", None, False),
    ("topk", "reverse_kl", True, True), ("full", "reverse_kl", False, False)])
def test_entropy_only_when_logged(coverage, divergence, log_entropy, logged):
    rows, _, token_ids, weights = inputs()
    obj = objective(coverage, divergence, log_entropy=log_entropy)
    signal = obj.teacher_signal(rows[:1], token_ids, weights)
    assert obj.logs_entropy is logged and (signal.teacher_entropy_sum is not None) is logged
    if logged:
        expected = (vocab_parallel_entropy(rows[0], vocab_range=(0, REAL_V)) * (weights > 0)).sum()
        torch.testing.assert_close(signal.teacher_entropy_sum, expected)
