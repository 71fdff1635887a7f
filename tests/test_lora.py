"""LoRA on megatron's parallel layers: one OPSD step (frozen teacher = the base with the adapters off, reverse
KL) at TP=1, TP=2 and PP=2 equals PEFT on transformers (loss, adapter gradients, Adam-updated adapters), starting
from the adapter our model exported in PEFT's format; the base stays frozen and outside the optimizer; the merged
export is base + scale * B A."""
import pytest
import torch

from megatron_opsd.models.lora import LoRASettings
from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from test_opsd_step import rollouts

SETTINGS = LoRASettings(rank=4, alpha=8.0)
LR, CLIP, EPS = 1e-3, 1e-3, 1e-8  # CLIP below the grad norm: the clipping (TP-aware grad norm) is exercised


def lora_step_worker(hf_dir: str, adapter_dir: str, micro_batch_size: int):
    from megatron.core import parallel_state as ps

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.lora import use_adapters
    from megatron_opsd.models.lora_peft import gather_lora_tensors, init_lora_, save_peft_adapter
    from megatron_opsd.models.weights import iter_hf_tensors, load_hf_checkpoint
    from megatron_opsd.config import LossConfig, OptimConfig
    from megatron_opsd.training.engine import optimizer_step, setup_training, zero_grads
    from megatron_opsd.losses import token_weights
    from megatron_opsd.training.batches import response_microbatches
    from megatron_opsd.training.opsd.step import student_forward_backward
    from megatron_opsd.training.response_rows import collect_response_rows

    chunks = build_model(hf_dir, lora=SETTINGS)
    load_hf_checkpoint(chunks, hf_dir)
    init_lora_(chunks, seed=3, b_std=0.05)  # non-zero B: A gets a gradient
    save_peft_adapter(chunks, adapter_dir, SETTINGS, hf_dir)  # the reference starts from this export
    base_before = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters() if not p.requires_grad}
    ddp, optimizer, scheduler = setup_training(chunks, OptimConfig(lr=LR, clip_grad=CLIP, adam_eps=EPS), 1000)
    student, teacher, responses = rollouts()
    weights = token_weights([len(r) for r in responses], "token_mean")
    kw = dict(micro_batch_size=micro_batch_size, pad_id=0, dp_size=ps.get_data_parallel_world_size(),
              dp_rank=ps.get_data_parallel_rank())
    student_mbs = response_microbatches(student, responses, weights, **kw)
    with use_adapters(ddp, "off"):  # the frozen teacher: the base model, no second replica
        teacher_rows = collect_response_rows(ddp, response_microbatches(teacher, responses, weights, **kw))
    zero_grads(ddp, optimizer)
    out = student_forward_backward(ddp, student_mbs, teacher_rows, loss=LossConfig(),
                                   real_vocab_size=chunks[0].real_vocab_size)
    grads = gather_lora_tensors(chunks, grads=True)
    info = optimizer_step(optimizer, scheduler)
    updated = gather_lora_tensors(chunks)
    merged = {n: t for n, t in iter_hf_tensors(chunks) if t is not None}
    with use_adapters(chunks, "off"):
        base = {n: t for n, t in iter_hf_tensors(chunks) if t is not None}
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    in_optimizer = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    in_ddp = sum(p.numel() for c in ddp for buffer in c.buffers for p in buffer.params)
    base_changed = any(not torch.equal(p, base_before[n]) for c in chunks for n, p in c.named_parameters()
                       if n in base_before)
    return dict(loss=out.loss, grads=grads, updated=updated, grad_norm=float(info["grad_norm"]), merged=merged,
                base=base, trainable=trainable, in_optimizer=in_optimizer, in_ddp=in_ddp, base_changed=base_changed)


def run(hf_dir, adapter_dir, tp, pp, micro_batch_size=1):
    results = run_distributed(lora_step_worker, tp * pp, ParallelConfig(tensor_model_parallel_size=tp,
                                                                        pipeline_model_parallel_size=pp),
                              hf_dir, str(adapter_dir), micro_batch_size)
    return results[0]


def peft_reference(hf_dir: str, adapter_dir: str) -> dict:
    """Loss, per-factor gradients (a fused layer's shared A: the sum over its projections) and one clipped Adam
    step, with PEFT on transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir, is_trainable=True)
    model.eval()
    student, teacher, responses = rollouts()
    per_token = []
    for s, t, r in zip(student, teacher, responses):
        with torch.no_grad(), model.disable_adapter():
            lt = model(torch.tensor([t + r])).logits[0, len(t) - 1: len(t) + len(r) - 1].log_softmax(-1)
        ls = model(torch.tensor([s + r])).logits[0, len(s) - 1: len(s) + len(r) - 1].log_softmax(-1)
        per_token.append((ls.exp() * (ls - lt)).sum(-1))
    loss = torch.cat(per_token).mean()
    loss.backward()
    params = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in model.named_parameters() if "lora_" in n}
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for shared in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):  # megatron's one A per fused layer
        for n in [n for n in grads if f".{shared[0]}.lora_A" in n]:
            names = [n.replace(shared[0], s) for s in shared]
            total = sum(grads[m] for m in names)
            for m in names:
                grads[m] = total
    unique = {n: g for n, g in grads.items() if not any(f".{s}.lora_A" in n for s in ("k_proj", "v_proj", "up_proj"))}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in unique.values())).item()
    coef = min(1.0, CLIP / (norm + 1e-6))
    updated = {n: (params[n].detach() - LR * (g * coef) / ((g * coef).abs() + EPS)) for n, g in grads.items()}
    return dict(loss=loss.item(), grads=grads, grad_norm=norm, updated=updated)


def max_rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)).item() for k in a)


@pytest.mark.slow
def test_lora_step_tp_pp_equal_peft_reference(tiny_checkpoints, tmp_path):
    """One LoRA training step at TP=1 against PEFT (loss, grads, clipping, Adam update, frozen base, merged
    export), then at TP=2 and PP=2 against TP=1: the only check of LoRA numerics across parallel layouts."""
    hf_dir = tiny_checkpoints["qwen3"]
    one = run(hf_dir, tmp_path / "tp1", 1, 1)
    ref = peft_reference(hf_dir, str(tmp_path / "tp1"))
    assert one["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert max_rel(one["grads"], ref["grads"]) < 1e-4
    assert one["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert one["grad_norm"] > CLIP  # clipping was active
    assert max(((one["updated"][k] - ref["updated"][k]).abs().max()).item() for k in ref["updated"]) < 1e-6

    # the base is frozen: only the adapters are trainable, in DDP's buffer and in the optimizer, and unchanged
    adapters = sum(t.numel() for n, t in one["updated"].items() if not any(
        f".{s}.lora_A" in n for s in ("k_proj", "v_proj", "up_proj")))
    assert one["trainable"] == one["in_optimizer"] == one["in_ddp"] == adapters
    assert not one["base_changed"]

    # merged export: W + scale * B A per HF projection; adapters off: the base checkpoint
    scale = SETTINGS.alpha / SETTINGS.rank
    for name, base in one["base"].items():
        a, b = name.replace(".weight", ".lora_A.weight"), name.replace(".weight", ".lora_B.weight")
        expected = base + scale * one["updated"][b] @ one["updated"][a] if a in one["updated"] else base
        torch.testing.assert_close(one["merged"][name], expected, rtol=1e-5, atol=1e-6)

    for tp, pp, mbs in ((2, 1, 2), (1, 2, 1)):
        got = run(hf_dir, tmp_path / f"tp{tp}pp{pp}", tp, pp, mbs)
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-5), (tp, pp)
        assert max_rel(got["grads"], one["grads"]) < 1e-4, (tp, pp)
        assert got["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), (tp, pp)
        assert max_rel(got["updated"], one["updated"]) < 1e-5, (tp, pp)
        assert not got["base_changed"]
