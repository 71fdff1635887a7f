"""LoRA teacher modes (frozen = the base with the adapters off, live, EMA / refreshed second adapter set, Purified
OPSD's frozen-base forwards), the config's validation, and a checkpoint round trip at TP=2 that resumes exactly."""
from types import SimpleNamespace

import pytest
import torch

from megatron_opsd.config import ConfigError, config_to_dict, load_config
from megatron_opsd.models.lora import LoRASettings
from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.opsd.lora_teacher import teacher_adapter_mode
from test_opsd_step import rollouts

SETTINGS = LoRASettings(rank=4, alpha=8.0)


def _logits(chunks, tokens):
    with torch.no_grad():
        return chunks[0](tokens, torch.arange(tokens.shape[1]).unsqueeze(0), attention_mask=None)


def modes_worker(hf_dir: str) -> dict:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.lora import adapters_of, use_adapters
    from megatron_opsd.models.lora_peft import init_lora_
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.training.opsd.lora_teacher import add_teacher_adapters, step_teacher_adapters, teacher_adapters

    plain = build_model(hf_dir)
    load_hf_checkpoint(plain, hf_dir)
    chunks = build_model(hf_dir, lora=SETTINGS)
    load_hf_checkpoint(chunks, hf_dir)
    tokens = torch.tensor([rollouts()[0][0] + rollouts()[2][0]])
    out = {"base_at_init": (_logits(chunks, tokens) - _logits(plain, tokens)).abs().max().item()}  # B = 0
    init_lora_(chunks, seed=1, b_std=0.05)
    ema = SimpleNamespace(weights="ema", ema_decay=0.5, purified=False)
    add_teacher_adapters(chunks, ema)
    student0 = _logits(chunks, tokens)
    with teacher_adapters(chunks, SimpleNamespace(weights="frozen", purified=False), "reference"):
        out["frozen_vs_base"] = (_logits(chunks, tokens) - _logits(plain, tokens)).abs().max().item()
    with teacher_adapters(chunks, SimpleNamespace(weights="live", purified=True), "base"):
        out["purified_base_vs_base"] = (_logits(chunks, tokens) - _logits(plain, tokens)).abs().max().item()
    out["student_vs_base"] = (student0 - _logits(plain, tokens)).abs().max().item()
    adapters = adapters_of(chunks)
    old = [(a.lora_A.detach().clone(), a.lora_B.detach().clone()) for a in adapters]
    init_lora_(chunks, seed=2, b_std=0.05)  # "the optimizer moved the student"
    with use_adapters(chunks, "teacher"):
        out["teacher_vs_student0"] = (_logits(chunks, tokens) - student0).abs().max().item()
    step_teacher_adapters(chunks, ema, step=0)
    out["ema_err"] = max((a.teacher_A - 0.5 * (o[0] + a.lora_A)).abs().max().item() for a, o in zip(adapters, old))
    refresh = SimpleNamespace(weights="refresh", refresh_every=2, purified=False)
    before = adapters[0].teacher_B.detach().clone()
    step_teacher_adapters(chunks, refresh, step=0)
    out["refresh_step0_kept"] = torch.equal(adapters[0].teacher_B, before)
    step_teacher_adapters(chunks, refresh, step=1)
    out["refresh_step1_copied"] = all(torch.equal(a.teacher_B, a.lora_B) for a in adapters)
    return out


@pytest.mark.slow
def test_teacher_modes_tp2(tiny_checkpoints):
    """Every LoRA teacher mode (frozen, live, EMA, refresh, purified base) at TP=2 in spawned ranks: which adapters
    each teacher forward uses, compared on logits; the mode table's unit test cannot check the forwards."""
    results = run_distributed(modes_worker, 2, ParallelConfig(tensor_model_parallel_size=2),
                              tiny_checkpoints["qwen3"])
    for out in results:
        # (two model instances agree to ~2e-7, not bitwise)
        assert out["base_at_init"] < 1e-5  # PEFT's init: B = 0, the adapted model starts as the base
        assert out["frozen_vs_base"] < 1e-5 and out["purified_base_vs_base"] < 1e-5
        assert out["student_vs_base"] > 1e-3  # the adapters do change the logits
        assert out["teacher_vs_student0"] < 1e-6  # the teacher set kept the adapters it was created from
        assert out["ema_err"] < 1e-7
        assert out["refresh_step0_kept"] and out["refresh_step1_copied"]


def test_teacher_adapter_mode_table():
    def cfg(weights, purified=False):
        return SimpleNamespace(weights=weights, purified=purified)

    assert [teacher_adapter_mode(cfg(w), "reference") for w in ("live", "frozen", "ema", "refresh")] == \
        ["student", "off", "teacher", "teacher"]
    assert teacher_adapter_mode(cfg("ema", True), "reference") == "teacher"
    assert teacher_adapter_mode(cfg("ema", True), "reference_only") == "off"
    assert teacher_adapter_mode(cfg("live", True), "base") == "off"


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", "model.lora.rank must be >= 0"),
    ("model.lora.alpha=0", "model.lora.alpha must be > 0"),
    ("model.lora.dropout=1.5", "model.lora.dropout must be in [0, 1)"),
    ("model.lora.targets=[q_proj]", "model.lora.targets"),
    ("model.fp8=hybrid", "model.lora with model.fp8"),
])
def test_lora_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["model.lora.rank=8", override])
    cfg = load_config(None, ["model.lora.rank=8", "model.lora.alpha=16", "model.lora.targets=[linear_qkv,linear_fc2]"])
    assert cfg.model.lora.targets == ["linear_qkv", "linear_fc2"]


def _step(ddp, chunks, optimizer, scheduler):
    """One OPSD step on test_opsd_step's fixed rollouts, frozen (adapters-off) teacher."""
    from megatron_opsd.models.lora import use_adapters
    from megatron_opsd.training.engine import optimizer_step, zero_grads
    from megatron_opsd.config import LossConfig
    from megatron_opsd.losses import token_weights
    from megatron_opsd.training.batches import response_microbatches
    from megatron_opsd.training.opsd.step import student_forward_backward
    from megatron_opsd.training.response_rows import collect_response_rows

    student, teacher, responses = rollouts()
    weights = token_weights([len(r) for r in responses], "token_mean")
    kw = dict(micro_batch_size=2, pad_id=0)
    with use_adapters(ddp, "off"):
        rows = collect_response_rows(ddp, response_microbatches(teacher, responses, weights, **kw))
    zero_grads(ddp, optimizer)
    out = student_forward_backward(ddp, response_microbatches(student, responses, weights, **kw), rows,
                                   loss=LossConfig(), real_vocab_size=chunks[0].real_vocab_size)
    optimizer_step(optimizer, scheduler)
    return out.loss


def resume_worker(hf_dir: str, root: str, resume: bool) -> dict:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.lora_peft import gather_lora_tensors, init_lora_
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.training.checkpoint import load_latest, save_checkpoint
    from megatron_opsd.config import OptimConfig
    from megatron_opsd.training.engine import setup_training
    from megatron_opsd.training.opsd.lora_teacher import add_teacher_adapters, step_teacher_adapters

    ema = SimpleNamespace(weights="ema", ema_decay=0.5, purified=False)
    chunks = build_model(hf_dir, lora=SETTINGS)
    load_hf_checkpoint(chunks, hf_dir)
    init_lora_(chunks, seed=3, b_std=0.05)
    add_teacher_adapters(chunks, ema)
    ddp, optimizer, scheduler = setup_training(chunks, OptimConfig(lr=1e-3), 1000)
    if resume:
        load_latest(root, ddp, optimizer, scheduler)
    else:
        _step(ddp, chunks, optimizer, scheduler)
        step_teacher_adapters(chunks, ema, 0)
        saved = gather_lora_tensors(chunks)
        config = load_config(None, [f"model.path={hf_dir}", f"model.lora.rank={SETTINGS.rank}",
                                    f"model.lora.alpha={SETTINGS.alpha}"])
        save_checkpoint(root, 1, ddp, optimizer, scheduler, config_dict=config_to_dict(config))
    loss = _step(ddp, chunks, optimizer, scheduler)
    step_teacher_adapters(chunks, ema, 1)
    teacher = {}
    for a in sorted((m for c in chunks for m in c.modules() if hasattr(m, "teacher_A")), key=lambda m: (
            m.layer_number, m.target)):
        teacher[(a.layer_number, a.target)] = (a.teacher_A.detach().clone(), a.teacher_B.detach().clone())
    return dict(loss=loss, adapters=gather_lora_tensors(chunks), teacher=teacher, saved=None if resume else saved)


@pytest.mark.slow
def test_checkpoint_resumes_exactly_tp2(tiny_checkpoints, tmp_path):
    """A TP=2 LoRA run saved and resumed equals the uninterrupted one bit for bit (adapters and EMA teacher
    adapters), and the checkpoint exports at TP=1 as merged HF weights and a PEFT adapter that PEFT loads to the
    same logits: the only checkpoint round trip for LoRA."""
    cfg = ParallelConfig(tensor_model_parallel_size=2)
    hf_dir = tiny_checkpoints["qwen3"]
    straight = run_distributed(resume_worker, 2, cfg, hf_dir, str(tmp_path), False)
    resumed = run_distributed(resume_worker, 2, cfg, hf_dir, str(tmp_path), True)
    assert resumed[0]["loss"] == straight[0]["loss"]
    for k, v in straight[0]["adapters"].items():
        assert torch.equal(resumed[0]["adapters"][k], v), k
    for rank in range(2):
        for k, (a, b) in straight[rank]["teacher"].items():
            assert torch.equal(resumed[rank]["teacher"][k][0], a) and torch.equal(resumed[rank]["teacher"][k][1], b)


    # export the TP=2 checkpoint at TP=1: merged HF weights and the PEFT adapter (resharded on load)
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_opsd.training.export_cli import export_checkpoint

    export_checkpoint(tmp_path, tmp_path / "merged", tp=1, peft_out=tmp_path / "adapter")
    adapter = {k.removeprefix("base_model.model."): v
               for k, v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items()}
    assert sorted(adapter) == sorted(straight[0]["saved"])
    for k, v in straight[0]["saved"].items():
        torch.testing.assert_close(adapter[k], v, rtol=0, atol=0)
    base = load_file(hf_dir + "/model.safetensors")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    scale = SETTINGS.alpha / SETTINGS.rank
    for name, w in base.items():
        a = name.replace(".weight", ".lora_A.weight")
        expected = w + scale * adapter[name.replace(".weight", ".lora_B.weight")] @ adapter[a] if a in adapter else w
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    tokens = torch.tensor([rollouts()[0][1] + rollouts()[2][1]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = peft(tokens).logits
        want = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_planner_counts_the_adapters_peft_builds(tiny_checkpoints):
    """planning/lora.py's adapter count == PEFT's on the same model, less the A's megatron's fused layers share
    (q/k/v: one A instead of three; gate/up: one instead of two); the plan drops the teacher replica and the
    base's grads and optimizer state."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from megatron_opsd.models.lora import peft_target_modules
    from megatron_opsd.planning import ModelShape, TrainSettings, estimate_memory
    from megatron_opsd.planning.lora import lora_layer_params, lora_total_params

    hf_dir = tiny_checkpoints["qwen3"]
    shape = ModelShape.from_hf_config(hf_dir)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), LoraConfig(
        r=SETTINGS.rank, lora_alpha=SETTINGS.alpha, target_modules=peft_target_modules(SETTINGS)))
    peft_count = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    shared = shape.num_layers * SETTINGS.rank * shape.hidden_size * (2 + 1)
    assert lora_total_params(shape, SETTINGS.rank) == peft_count - shared
    tp2 = lora_layer_params(shape, SETTINGS.rank, tp=2)
    assert shape.num_layers * tp2 < lora_total_params(shape, SETTINGS.rank)  # B or A split over TP
    full = estimate_memory(shape, TrainSettings(teacher_weights="frozen")).stages[0].components
    lora = estimate_memory(shape, TrainSettings(teacher_weights="frozen", lora_rank=SETTINGS.rank)).stages[0]
    adapters = shape.num_layers * lora_layer_params(shape, SETTINGS.rank)
    assert lora.components["teacher weights"] == 0 and full["teacher weights"] > 0
    assert lora.components["student grads"] == adapters * 4
    assert lora.components["optimizer state"] == adapters * 12
    assert lora.components["student weights"] == full["student weights"] + adapters * 2


def test_bf16_adapter_ema_keeps_an_fp32_average():
    """teacher.weights=ema with bf16 adapters at decay 0.999: the teacher set is an fp32 average that follows an
    fp64 reference of the same bf16 student trajectory; the old in-dtype (bf16) average stalls at its start (each
    update is below half a bf16 ulp). A unit test of models.lora (no process group: the forward is not run)."""
    from megatron_opsd.models.lora import LoRAAdapter, update_teacher_adapters_

    torch.manual_seed(0)
    adapter = LoRAAdapter(torch.nn.Linear(64, 48, bias=False, dtype=torch.bfloat16), column=True, glu=False,
                          settings=SETTINGS)
    chunk = torch.nn.Sequential(adapter)
    with torch.no_grad():
        adapter.lora_A.normal_()
        adapter.lora_B.normal_()
    adapter.add_teacher_set()
    student = (adapter.lora_A, adapter.lora_B)
    start = [p.detach().double() for p in student]
    reference = [p.clone() for p in start]
    in_dtype = [p.detach().clone() for p in student]  # what update_teacher_adapters_ did before (bf16 average)
    decay = 0.999
    for _ in range(300):
        with torch.no_grad():
            for p in student:  # the optimizer moves the bf16 student a little each step
                p.add_(0.02 * torch.randn_like(p))
        update_teacher_adapters_([chunk], decay)
        for ref, old, p in zip(reference, in_dtype, student):
            ref.mul_(decay).add_(p.detach().double(), alpha=1 - decay)
            old.mul_(decay).add_(p.detach(), alpha=1 - decay)
    assert adapter.teacher_A.dtype == adapter.teacher_B.dtype == torch.float32
    assert adapter.lora_A.dtype == torch.bfloat16
    for teacher, ref, old, s0 in zip((adapter.teacher_A, adapter.teacher_B), reference, in_dtype, start):
        moved = (ref - s0).norm()
        assert moved > 0.01 * s0.norm()  # the average did move
        assert (teacher.double() - ref).norm() < 1e-3 * moved  # fp32 average: follows the reference (6e-5 seen)
        assert (old.double() - ref).norm() > 0.5 * moved  # bf16 average: stalled (the bug this fixes)
