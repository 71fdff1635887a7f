"""Purified-OPSD (PMI) and DemoPSD target builders vs plain-torch fp64 references, at TP=1 and TP=2 (gloo).

Padded vocabulary with garbage in the padded columns (they must get probability exactly 0), logits scaled so
that the PMI soft clip and the centring both change the target (checked: not vacuous), DemoPSD alphas well
above 0. The targets are then used with ``vocab_parallel_divergence``: as ``teacher_is_logprobs=True`` and as
plain "teacher logits" (identical at temperature 1, since log-softmax of log-probs is the identity); loss and
student gradient equal autograd of the plain reference (the DemoPSD reference builds its target from the
detached student, so only the KL carries gradient; it is evaluated on the built fp32 target, whose own error
against the fp64 formula is checked separately).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_opsd.losses import demopsd_target_logprobs, pmi_target_logprobs, vocab_parallel_divergence
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed

REAL_V, PADDED_V, B, S, T = 37, 40, 3, 5, 1.3
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 implementation vs fp64 reference (log-probs of magnitude up to ~40)
PMI_SETTINGS = [dict(clip=10.0, beta=1.0), dict(clip=2.0, beta=0.7), dict(clip=2.0, beta=0.7, center="teacher")]
DEMO_SETTINGS = [dict(alpha_max=0.15, beta=1.0), dict(alpha_max=0.5, beta=4.0)]


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    full, ref_only, base, student = (torch.randn(B, S, PADDED_V, generator=gen) * 8 for _ in range(4))
    for i, x in enumerate((full, ref_only, base, student)):
        x[..., REAL_V:] = 50.0 - 20 * i  # garbage in padded columns
    mask = torch.rand(B, S, generator=gen) > 0.3
    mask[0, 0] = True
    return full, ref_only, base, student, mask


def lsm(x, temperature=T):
    return F.log_softmax(x.double()[..., :REAL_V] / temperature, -1)


def pmi_reference(full, ref_only, base, clip, beta, center="uniform", centre=True, soft_clip=True):
    delta = lsm(full) - lsm(ref_only)
    if centre:  # teacher.pmi_center: the plain vocabulary mean, or the mean under the full teacher
        weights = lsm(full).exp() if center == "teacher" else torch.full_like(delta, 1.0 / delta.shape[-1])
        delta = delta - (weights * delta).sum(-1, keepdim=True)
    if soft_clip:
        delta = clip * torch.tanh(delta / clip)
    return F.log_softmax(lsm(base) + delta / beta, -1)


def demo_reference(student, teacher, alpha_max, beta):
    log_s, log_t = lsm(student), lsm(teacher)
    p, q = log_s.exp(), log_t.exp()
    log_m = torch.log(0.5 * p + 0.5 * q)
    jsd = 0.5 * (p * (log_s - log_m)).sum(-1) + 0.5 * (q * (log_t - log_m)).sum(-1)
    alpha = (torch.sigmoid(beta * jsd) - 0.5) * 2 * alpha_max
    return F.log_softmax((1 - alpha[..., None]) * log_t + alpha[..., None] * log_s, -1), alpha


def kl_reference(student, target, temperature):
    """KL(softmax(student / temperature) || exp(target)) token mean over the mask, autograd to the student."""
    s = student.double().clone().requires_grad_(True)
    logp = F.log_softmax(s[..., :REAL_V] / temperature, -1)
    return s, (logp.exp() * (logp - target)).sum(-1)


def run_cases(full, ref_only, base, student, mask, group, rank, size):
    width = PADDED_V // size
    cols = slice(rank * width, (rank + 1) * width)
    shard = [x[..., cols] for x in (full, ref_only, base, student)]
    kw = dict(group=group, vocab_range=(0, REAL_V), chunk_tokens=4)
    pmi = [pmi_target_logprobs(shard[0], shard[1], shard[2], temperature=T, **s, **kw) for s in PMI_SETTINGS]
    demo = [demopsd_target_logprobs(shard[3], shard[0], temperature=T, return_alpha=True, **s, **kw)
            for s in DEMO_SETTINGS]
    losses = []  # (target name, how it is passed, student temperature) -> (loss, grad)
    for name, target in (("pmi", pmi[0]), ("demopsd", demo[0][0])):
        for how, temperature in (("logprobs", 1.0), ("as_logits", 1.0), ("logprobs", T)):
            s = shard[3].clone().requires_grad_(True)
            loss, _ = vocab_parallel_divergence(s, target, loss_mask=mask, temperature=temperature,
                                                teacher_is_logprobs=how == "logprobs", **kw)
            loss.backward()
            losses.append(((name, how, temperature), loss.detach(), s.grad))
    return pmi, demo, losses


def tp_worker(*inputs):
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return run_cases(*inputs, group, dist.get_rank(group), dist.get_world_size(group))


def check(per_rank, full, ref_only, base, student, mask):
    errors = {}
    pmi_refs = [pmi_reference(full, ref_only, base, **s) for s in PMI_SETTINGS]
    for i, ref in enumerate(pmi_refs):
        got = torch.cat([r[0][i] for r in per_rank], -1)
        assert got.dtype == torch.float32 and got.shape == (B, S, PADDED_V)
        assert got[..., REAL_V:].exp().max() == 0, "padded entries must get probability 0"
        torch.testing.assert_close(got[..., :REAL_V].double(), ref, **TOL)
        torch.testing.assert_close(got[..., :REAL_V].double().logsumexp(-1), torch.zeros(B, S, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        errors[f"pmi {PMI_SETTINGS[i]}"] = (got[..., :REAL_V].double() - ref).abs().max().item()
        s = PMI_SETTINGS[i]  # not vacuous: the clip and the centring each change the target
        assert (pmi_reference(full, ref_only, base, **s, soft_clip=False) - ref).abs().max() > 0.1
        assert (pmi_reference(full, ref_only, base, **s, centre=False) - ref).abs().max() > 0.1
        if s.get("center") == "teacher":  # the two centres give different targets where the clip bites
            assert (pmi_reference(full, ref_only, base, **{**s, "center": "uniform"}) - ref).abs().max() > 0.1
    demo_refs = [demo_reference(student, full, **s) for s in DEMO_SETTINGS]
    for i, (ref, ref_alpha) in enumerate(demo_refs):
        got = torch.cat([r[1][i][0] for r in per_rank], -1)
        assert got[..., REAL_V:].exp().max() == 0, "padded entries must get probability 0"
        torch.testing.assert_close(got[..., :REAL_V].double(), ref, **TOL)
        for r in per_rank:
            torch.testing.assert_close(r[1][i][1].double(), ref_alpha, rtol=1e-5, atol=1e-6)
        assert ref_alpha.min() > 0.02 and ref_alpha.max() < DEMO_SETTINGS[i]["alpha_max"]
        assert (ref - lsm(full)).abs().max() > 0.1  # the barycenter is not the teacher
        errors[f"demopsd {DEMO_SETTINGS[i]}"] = (got[..., :REAL_V].double() - ref).abs().max().item()
    # the divergence to the built target (the target's own error is bounded above): KL reference in fp64 on the
    # gathered fp32 target, autograd to the student only
    targets = {"pmi": torch.cat([r[0][0] for r in per_rank], -1)[..., :REAL_V].double(),
               "demopsd": torch.cat([r[1][0][0] for r in per_rank], -1)[..., :REAL_V].double()}
    for j, ((name, how, temperature), loss, _) in enumerate(per_rank[0][2]):
        grad = torch.cat([r[2][j][2] for r in per_rank], -1)
        s, per_token = kl_reference(student, targets[name], temperature)
        ref_loss = (per_token * mask).sum() / mask.sum()
        ref_loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        assert grad[..., REAL_V:].abs().max() == 0
        torch.testing.assert_close(grad.double(), s.grad, rtol=1e-5, atol=1e-5)  # fp32, logits up to ~30
        assert s.grad.abs().max() > 1e-3
        errors[f"KL to {name} ({how}, T={temperature})"] = (abs(loss.double() - ref_loss).item(),
                                                            (grad.double() - s.grad).abs().max().item())
    # passing the target as plain teacher logits at temperature 1 is the same as teacher_is_logprobs=True
    by_key = {key: (loss, grad) for key, loss, grad in per_rank[0][2]}
    for name in targets:
        a, b = by_key[(name, "logprobs", 1.0)], by_key[(name, "as_logits", 1.0)]
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-7)
    return errors


def test_targets_tp1_match_reference():
    inputs = make_inputs()
    check([run_cases(*inputs, None, 0, 1)], *inputs)


def test_targets_tp2_match_reference():
    inputs = make_inputs(seed=2)
    per_rank = run_distributed(tp_worker, 2, ParallelConfig(tensor_model_parallel_size=2), *inputs)
    for key, err in check(per_rank, *inputs).items():
        print(f"{key}: max abs error {err}")


def test_pmi_beta_one_without_clip_is_base_times_likelihood_ratio():
    """With a huge clip (tanh ~ identity) and beta = 1: P ∝ pi_0 * pi_T / pi_R (the PMI reweighting)."""
    full, ref_only, base, _, _ = make_inputs(seed=4)
    got = pmi_target_logprobs(full / 8, ref_only / 8, base / 8, vocab_range=(0, REAL_V), clip=1e6)
    log = lambda x: F.log_softmax(x.double()[..., :REAL_V] / 8, -1)  # noqa: E731
    expected = F.log_softmax(log(base) + log(full) - log(ref_only), -1)
    torch.testing.assert_close(got[..., :REAL_V].double(), expected, rtol=1e-5, atol=1e-5)


def test_demopsd_identical_student_and_teacher_gives_teacher():
    """JSD = 0 -> alpha = 0 -> the target is the teacher's distribution."""
    _, _, _, student, _ = make_inputs(seed=5)
    target, alpha = demopsd_target_logprobs(student, student, vocab_range=(0, REAL_V), return_alpha=True)
    assert alpha.abs().max() < 1e-6
    torch.testing.assert_close(target[..., :REAL_V], F.log_softmax(student[..., :REAL_V], -1), rtol=1e-5, atol=1e-5)


def test_demopsd_default_beta_reaches_alpha_max():
    """The per-token JSD is at most ln 2 (disjoint distributions): the default loss.demopsd_beta must let alpha_t
    reach alpha_max there (beta = 1 stops at a third of it)."""
    from megatron_opsd.config import LossConfig

    student, teacher = torch.zeros(1, REAL_V), torch.zeros(1, REAL_V)
    student[0, 0], teacher[0, 1] = 60.0, 60.0  # all mass on different tokens: JSD = ln 2 to fp32 precision
    cfg = LossConfig()
    _, alpha = demopsd_target_logprobs(student, teacher, alpha_max=cfg.demopsd_alpha_max, beta=cfg.demopsd_beta,
                                       return_alpha=True)
    assert alpha.item() >= 0.99 * cfg.demopsd_alpha_max
    _, alpha_default = demopsd_target_logprobs(student, teacher, return_alpha=True)  # the function's default too
    assert alpha_default.item() == pytest.approx(alpha.item())


def test_bad_inputs_are_named():
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="same"):
        pmi_target_logprobs(x, x, torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="clip="):
        pmi_target_logprobs(x, x, x, clip=0.0)
    with pytest.raises(ValueError, match="alpha_max="):
        demopsd_target_logprobs(x, x, alpha_max=1.5)
    assert not math.isnan(pmi_target_logprobs(x, x, x).sum().item())
