"""One OPSD step per loss variant on fixed rollouts, through megatron (training/opsd/step.py, as the trainer calls
it): Purified OPSD (three teacher forwards -> PMI target), DemoPSD (barycenter of teacher and detached student),
teacher top-k, sampled-token estimators, and two combinations. For each: TP=2 equals TP=1 (loss, pre-clip
gradient norm, updated parameters) and the loss and gradient norm equal a transformers + plain-torch fp64
reference (autograd through the HF student; the teacher and the targets carry no gradient).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.config import LossConfig, OptimConfig
from megatron_opsd.losses import token_weights

REL_TOL = 1e-4  # megatron fp32 vs transformers fp32 (+ fp64 loss maths); measured errors are printed with -s
# Adam's first update is lr * g / (|g| + eps): with eps = 1 it is ~ lr * g, so comparing the parameter updates of
# TP=1 and TP=2 compares their gradients element by element (with eps = 1e-8 it is ~ lr * sign(g), which flips
# on near-zero gradient entries and hides how large the differences are).
OPTIMIZER = OptimConfig(lr=10.0, clip_grad=1e6, adam_eps=1.0)  # the norm is computed, nothing clipped

VARIANTS = {
    # name: (LossConfig kwargs, teacher contexts)
    "pmi_jsd": (dict(divergence="jsd", beta=0.5, target="pmi", pmi_clip=1.0, pmi_beta=0.5),
                ("full", "ref_only", "base")),
    "demopsd": (dict(divergence="reverse_kl", target="demopsd", demopsd_alpha_max=0.5, demopsd_beta=200.0), ("full",)),
    "topk_jsd": (dict(coverage="topk", top_k=5, divergence="jsd", beta=0.5, temperature=1.1), ("full",)),
    "pg": (dict(coverage="sampled", divergence="pg"), ("full",)),
    "pmi_k3": (dict(coverage="sampled", divergence="k3", target="pmi", pmi_clip=1.0, pmi_beta=0.5),
               ("full", "ref_only", "base")),
    "demopsd_topk_renorm": (dict(coverage="topk", top_k=7, topk_tail=False, target="demopsd", demopsd_alpha_max=0.5,
                                 demopsd_beta=200.0), ("full",)),
}


def rollouts():
    g = torch.Generator().manual_seed(11)
    student = [torch.randint(5, 379, (n,), generator=g).tolist() for n in (5, 7, 6, 5)]
    full = [torch.randint(5, 379, (n,), generator=g).tolist() for n in (11, 9, 12, 10)]
    ref_only = [torch.randint(5, 379, (n,), generator=g).tolist() for n in (8, 10, 7, 9)]
    responses = [torch.randint(5, 379, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    return student, {"full": full, "ref_only": ref_only, "base": student}, responses


def step_worker(hf_dir: str, micro_batch_size: int, names: list):
    from megatron.core import parallel_state as ps

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import iter_hf_tensors, load_hf_checkpoint
    from megatron_opsd.training.engine import optimizer_step, setup_training, zero_grads
    from megatron_opsd.training.batches import response_microbatches
    from megatron_opsd.training.opsd.step import student_forward_backward, teacher_signals
    from megatron_opsd.training.response_rows import collect_response_rows

    student, teachers, responses = rollouts()
    weights = token_weights([len(r) for r in responses], "token_mean")
    kw = dict(micro_batch_size=micro_batch_size, pad_id=0, dp_size=ps.get_data_parallel_world_size(),
              dp_rank=ps.get_data_parallel_rank())
    results = {}
    for name in names:
        settings, contexts = VARIANTS[name]
        loss = LossConfig(**settings)
        student_chunks, teacher_chunks = build_model(hf_dir), build_model(hf_dir)
        load_hf_checkpoint(student_chunks, hf_dir)
        load_hf_checkpoint(teacher_chunks, hf_dir)  # frozen teacher: the initial weights
        ddp, optimizer, scheduler = setup_training(student_chunks, OPTIMIZER, 1000)
        real_vocab = student_chunks[0].real_vocab_size
        student_mbs = response_microbatches(student, responses, weights, **kw)
        rows = {c: collect_response_rows(teacher_chunks, response_microbatches(teachers[c], responses, weights, **kw))
                for c in contexts}
        signals = teacher_signals(rows, student_mbs, loss=loss, real_vocab_size=real_vocab)
        zero_grads(ddp, optimizer)
        out = student_forward_backward(ddp, student_mbs, signals, loss=loss, real_vocab_size=real_vocab)
        info = optimizer_step(optimizer, scheduler)
        params = {k: t for k, t in iter_hf_tensors(student_chunks) if t is not None}
        results[name] = (out.loss, float(info["grad_norm"]), params)
    return results


# ------------------------------------------------------------------------------------------ plain reference
def _divergence(kind, beta, lp, lq):
    """Per-row divergence of normalised log-probs [n, m] (fp64)."""
    p, q = lp.exp(), lq.exp()
    if kind == "reverse_kl":
        return (p * torch.where(p > 0, lp - lq, torch.zeros_like(lp))).sum(-1)
    if kind == "forward_kl":
        return (q * torch.where(q > 0, lq - lp, torch.zeros_like(lp))).sum(-1)
    lm = torch.log(beta * q + (1 - beta) * p)
    return (beta * q * (lq - lm) + (1 - beta) * p * (lp - lm)).sum(-1)


def _topk_buckets(lp, lq, k, tail):
    top_q, ids = lq.topk(k, -1)
    top_p = lp.gather(-1, ids)
    if not tail:
        return top_p.log_softmax(-1), top_q.log_softmax(-1)
    rest = torch.ones_like(lq, dtype=torch.bool).scatter(-1, ids, False)
    tail_p = lp.masked_fill(~rest, -math.inf).logsumexp(-1, keepdim=True)
    tail_q = lq.masked_fill(~rest, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([top_p, tail_p], -1), torch.cat([top_q, tail_q], -1)


def reference(hf_dir: str, name: str, **override) -> tuple[float, float, float]:
    """(loss, gradient norm over all HF parameters, mean DemoPSD alpha or 0) for one variant."""
    from transformers import AutoModelForCausalLM

    settings, _ = VARIANTS[name]
    s = LossConfig(**{**settings, **override})
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    student, teachers, responses = rollouts()
    total = sum(len(r) for r in responses)

    def rows(prompt, response, grad=False):
        with torch.set_grad_enabled(grad):
            logits = model(torch.tensor([prompt + response])).logits[0]
        return logits[len(prompt) - 1: len(prompt) + len(response) - 1].double() / s.temperature

    loss, alphas = 0.0, []
    for i, r in enumerate(responses):
        lp = rows(student[i], r, grad=True).log_softmax(-1)
        lq = rows(teachers["full"][i], r).log_softmax(-1)
        if s.target == "pmi":
            lr, l0 = rows(teachers["ref_only"][i], r).log_softmax(-1), rows(teachers["base"][i], r).log_softmax(-1)
            delta = lq - lr
            delta = s.pmi_clip * torch.tanh((delta - delta.mean(-1, keepdim=True)) / s.pmi_clip)
            lq = (l0 + delta / s.pmi_beta).log_softmax(-1)
        elif s.target == "demopsd":
            ls = lp.detach()
            jsd = _divergence("jsd", 0.5, ls, lq)
            alpha = ((torch.sigmoid(s.demopsd_beta * jsd) - 0.5) * 2 * s.demopsd_alpha_max)[:, None]
            alphas.append(alpha)
            lq = ((1 - alpha) * lq + alpha * ls).log_softmax(-1)
        if s.coverage == "topk":
            per_token = _divergence(s.divergence, s.beta, *_topk_buckets(lp, lq, s.top_k, s.topk_tail))
        elif s.coverage == "sampled":
            y = torch.tensor(r)[:, None]
            ls_y, lt_y = lp.gather(-1, y)[:, 0], lq.gather(-1, y)[:, 0]
            ratio = lt_y - ls_y
            per_token = -ratio.detach() * ls_y if s.divergence == "pg" else torch.expm1(ratio) - ratio
        else:
            per_token = _divergence(s.divergence, s.beta, lp, lq)
        loss = loss + per_token.sum() / total
    loss.backward()
    grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), grad_norm, float(torch.cat(alphas).mean()) if alphas else 0.0


def test_variants_tp2_equal_tp1_and_reference(tiny_checkpoints):
    from safetensors.torch import load_file

    hf_dir, names = tiny_checkpoints["qwen3"], list(VARIANTS)
    initial = load_file(f"{hf_dir}/model.safetensors")
    one = run_distributed(step_worker, 1, ParallelConfig(), hf_dir, 1, names)[0]
    two = run_distributed(step_worker, 2, ParallelConfig(tensor_model_parallel_size=2), hf_dir, 2, names)
    for name in names:
        loss, grad_norm, params = one[name]
        ref_loss, ref_norm, alpha = reference(hf_dir, name)
        if "demopsd" in name:
            assert alpha > 0.05, "the barycenter must differ from the teacher, or the test is vacuous"
        if "pmi" in name:  # the PMI target changes the loss (not vacuous)
            plain = reference(hf_dir, name, target="teacher")[0]
            assert abs(plain - ref_loss) > 0.05 * abs(ref_loss), (plain, ref_loss)
        assert loss == pytest.approx(ref_loss, rel=REL_TOL), name
        assert grad_norm == pytest.approx(ref_norm, rel=REL_TOL), name
        assert abs(ref_loss) > 1e-4 and ref_norm > 1e-3, name
        for rank in range(2):
            loss2, norm2, params2 = two[rank][name]
            assert loss2 == pytest.approx(loss, rel=REL_TOL), (name, rank)
            assert norm2 == pytest.approx(grad_norm, rel=REL_TOL), (name, rank)
        params2 = two[0][name][2]  # HF-layout parameters are gathered on rank 0
        updates = {k: (params[k] - initial[k], params2[k] - initial[k]) for k in params}
        worst = max(((u2 - u1).norm() / u1.norm()).item() for u1, u2 in updates.values() if u1.norm() > 1e-6)
        assert sum(u1.norm() > 1e-6 for u1, _ in updates.values()) > len(updates) // 2, "most tensors must move"
        assert worst < REL_TOL, name
        print(f"{name}: loss {loss:.6g} (ref {ref_loss:.6g}, rel err {abs(loss - ref_loss) / abs(ref_loss):.1e}), "
              f"grad norm {grad_norm:.6g} (ref {ref_norm:.6g}, rel err {abs(grad_norm - ref_norm) / ref_norm:.1e}), "
              f"TP=2: loss rel err {abs(two[0][name][0] - loss) / abs(loss):.1e}, update rel err {worst:.1e}")

