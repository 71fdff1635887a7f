"""One OPSD step (frozen teacher with a longer context, reverse KL) at TP=1, TP=2 and PP=2 from the same
weights and rollouts: same loss, same updated parameters; the loss equals an unsharded transformers reference."""
from typing import Optional

import pytest
import torch

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed, run_layouts
from megatron_opsd.config import LossConfig, OptimConfig
from megatron_opsd.losses import token_weights

REL_TOL = 1e-4


def rollouts():
    g = torch.Generator().manual_seed(7)
    student = [torch.randint(5, 379, (n,), generator=g).tolist() for n in (5, 7, 6, 5)]
    teacher = [torch.randint(5, 379, (n,), generator=g).tolist() for n in (11, 9, 12, 10)]
    responses = [torch.randint(5, 379, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    return student, teacher, responses


def step_worker(hf_dir: str, reduction: str, micro_batch_size: int, sequence_parallel: bool = False, keep: int = 4,
                layout: Optional[dict] = None):
    """(loss, grad norm, updated params by HF name, layer-norm grads after finalize_model_grads, the sequence
    length the final norm saw, the micro-batch count). ``keep``: the first ``keep`` rollouts are distilled on (what
    a filter keeps); ``layout``: more ``response_microbatches`` keywords (pad_multiple, microbatch_multiple)."""
    from megatron.core import parallel_state as ps

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import iter_hf_tensors, load_hf_checkpoint
    from megatron_opsd.training.engine import optimizer_step, setup_training, zero_grads
    from megatron_opsd.training.batches import response_microbatches
    from megatron_opsd.training.opsd.step import student_forward_backward
    from megatron_opsd.training.response_rows import collect_response_rows

    student_chunks = build_model(hf_dir, sequence_parallel=sequence_parallel)
    load_hf_checkpoint(student_chunks, hf_dir)
    teacher_chunks = build_model(hf_dir, sequence_parallel=sequence_parallel)
    load_hf_checkpoint(teacher_chunks, hf_dir)  # frozen teacher: the initial weights
    ddp, optimizer, scheduler = setup_training(student_chunks, OptimConfig(lr=1e-3, clip_grad=1.0), 1000)
    student, teacher, responses = (side[:keep] for side in rollouts())
    weights = token_weights([len(r) for r in responses], reduction)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    kw = dict(micro_batch_size=micro_batch_size, pad_id=0, dp_size=dp, dp_rank=dp_rank, **(layout or {}))
    student_mbs = response_microbatches(student, responses, weights, **kw)
    teacher_mbs = response_microbatches(teacher, responses, weights, **kw)
    teacher_rows = collect_response_rows(teacher_chunks, teacher_mbs)
    seen = []  # the final norm's input rows: seq / TP when the sequence is really split
    final_norm = student_chunks[-1].decoder.final_layernorm
    if final_norm is not None:
        final_norm.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    zero_grads(ddp, optimizer)
    out = student_forward_backward(ddp, student_mbs, teacher_rows, loss=LossConfig(),
                                   real_vocab_size=student_chunks[0].real_vocab_size)
    norm_grads = {name: p.main_grad.clone() for chunk in student_chunks for name, p in chunk.named_parameters()
                  if "layernorm" in name}
    info = optimizer_step(optimizer, scheduler)
    params = {name: t for name, t in iter_hf_tensors(student_chunks) if t is not None}
    return out.loss, info["grad_norm"], params, norm_grads, set(seen), len(student_mbs)


def reference_loss(hf_dir: str, reduction: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    student, teacher, responses = rollouts()
    per_seq = []
    for s, t, r in zip(student, teacher, responses):
        with torch.no_grad():
            ls = model(torch.tensor([s + r])).logits[0, len(s) - 1: len(s) + len(r) - 1].log_softmax(-1)
            lt = model(torch.tensor([t + r])).logits[0, len(t) - 1: len(t) + len(r) - 1].log_softmax(-1)
        per_seq.append((ls.exp() * (ls - lt)).sum(-1))  # reverse KL(student || teacher) per response token
    if reduction == "token_mean":
        return torch.cat(per_seq).mean().item()
    return torch.stack([k.mean() for k in per_seq]).mean().item()


def run(hf_dir, tp, pp, dp=1, reduction="token_mean", micro_batch_size=1, sequence_parallel=False, vpp=None,
        keep=4, **layout):
    """Rank 0's ``step_worker`` result (the loss and grad norm are reduced onto every rank)."""
    cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel)
    return run_distributed(step_worker, tp * pp * dp, cfg, hf_dir, reduction, micro_batch_size, sequence_parallel,
                           keep, layout)[0]


def relative_errors(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_step_tp1_matches_reference(tiny_checkpoints, reduction):
    loss, *_ = run(tiny_checkpoints["qwen3"], 1, 1, reduction=reduction)
    assert loss == pytest.approx(reference_loss(tiny_checkpoints["qwen3"], reduction), rel=1e-5)


def test_step_same_across_tp_pp_dp(tiny_checkpoints):
    """TP=2 (with and without sequence parallelism), PP=2 and DP=2 against TP=1: loss, grad norm, updated
    parameters; at TP=2 also the norm weights' gradients (q/k norms see a rank's heads, and with sequence
    parallelism every norm sees a rank's tokens: finalize_model_grads must sum them over TP). The reference is
    unpadded (sequences cut at the longest, 13 tokens); the sequence-parallel step is padded as for FP8
    (ParallelConfig.sequence_multiple(8, fp8=True) = 16 at TP=2: 8 rows per rank), so padding for TE's FP8 rows
    leaves the real tokens' loss, gradients and update unchanged."""
    hf_dir = tiny_checkpoints["qwen3"]
    base_loss, base_norm, base_params, base_norm_grads, *_ = run(hf_dir, 1, 1, pad_multiple=1)
    fp8_pad = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True).sequence_multiple(8, fp8=True)
    layouts = ((2, 1, 1, 2, False), (2, 1, 1, 2, True), (1, 2, 1, 1, False), (1, 1, 2, 1, False))
    assert all(tp * pp * dp == 2 for tp, pp, dp, _, _ in layouts)  # one world of two ranks runs them all
    results = run_layouts(step_worker, 2, [
        (ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp),
         (hf_dir, "token_mean", mbs, sp, 4, {"pad_multiple": fp8_pad if sp else 8}))
        for tp, pp, dp, mbs, sp in layouts])
    for (tp, pp, dp, mbs, sp), per_rank in zip(layouts, results, strict=True):
        layout = dict(tp=tp, pp=pp, dp=dp, sequence_parallel=sp)
        loss, grad_norm, params, norm_grads, seen, _ = per_rank[0]  # rank 0's (loss and grad norm: reduced)
        assert loss == pytest.approx(base_loss, rel=REL_TOL), layout
        assert grad_norm == pytest.approx(base_norm, rel=REL_TOL), layout
        assert relative_errors(params, base_params) < REL_TOL, layout
        if tp > 1:
            assert relative_errors(norm_grads, base_norm_grads) < REL_TOL, layout
            assert seen == {16 // tp if sp else 16}, layout  # student rows: 13 tokens at most, padded to 16


def test_interleaved_pipeline_pads_an_odd_kept_count(tiny_checkpoints):
    """PP=2 x VPP=2 with 3 kept rollouts (micro-batch size 1): megatron's interleaved schedule refuses M=3
    (not a multiple of PP); ParallelConfig.microbatch_multiple() pads to M=4 with a zero-weight dummy, and the step
    equals the unpadded PP=1 step (M=3): loss, grad norm, updated parameters."""
    hf_dir = tiny_checkpoints["qwen3_4l"]
    vpp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    base_loss, base_norm, base_params, _, _, base_m = run(hf_dir, 1, 1, keep=3)
    loss, grad_norm, params, _, _, m = run(hf_dir, 1, 2, vpp=2, keep=3, microbatch_multiple=vpp.microbatch_multiple())
    assert (base_m, m) == (3, 4)
    assert loss == pytest.approx(base_loss, rel=REL_TOL)
    assert grad_norm == pytest.approx(base_norm, rel=REL_TOL)
    assert relative_errors(params, base_params) < REL_TOL


def test_token_weights_equal_reduction_weights():
    from megatron_opsd.losses import vocab_parallel_divergence
    from megatron_opsd.losses.divergence import reduction_weights

    torch.manual_seed(0)
    student = torch.randn(3, 5, 40, requires_grad=True)
    teacher = torch.randn(3, 5, 40)
    mask = torch.rand(3, 5) > 0.3
    for reduction in ("token_mean", "sequence_mean"):
        ref, _ = vocab_parallel_divergence(student, teacher, loss_mask=mask, reduction=reduction)
        (g_ref,) = torch.autograd.grad(ref, student)
        weights = reduction_weights(mask, reduction, None)
        got, _ = vocab_parallel_divergence(student, teacher, loss_mask=mask, reduction="sum", token_weights=weights)
        (g_got,) = torch.autograd.grad(got, student)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(g_got, g_ref)
