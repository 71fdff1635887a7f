"""The preflight: run it first on a new cluster. Proves the CUDA/NCCL paths on N GPUs of one node in minutes
(docs/gpu.md "Before your first run on a new cluster"):

    torchrun --standalone --nproc-per-node N tools/gpu_check.py --out preflight.json   # N = 1, 2, 4, 8 GPUs
    torchrun --standalone --nproc-per-node 2 tools/gpu_check.py --device cpu           # CPU, gloo (CI runs this)
    python tools/gpu_check.py ...                                                      # the same as N = 1

Builds a small random Qwen3 with the real vocabulary (151,936) and runs each probe on every rank, recording it in
the JSON (status pass | fail | skip, its numbers, the error of a failed probe, seconds; a probe fails if it fails
on any rank; one failing probe never hides the others) and printing a pass/fail table; exit status 1 if any
failed. Probes at the world's data-parallel layout (TP = PP = 1, DP = N):

  logits_fp32 / logits_bf16   megatron's local spec vs transformers on the device (max |diff|, mean KL, top-1)
  step_opsd_<kind>            one OPSD step per loss kind through OPSDTrainer.train_step on fixed rollouts
  step_sft, step_grpo         one SFT step (SFTTrainer.train_step), one GRPO step (GRPOTrainer.train_step)
                              on CUDA each step's loss and grad norm are compared with the same step run on the
                              CPU (this script with --device cpu in a single-process subprocess)
  teacher_per_microbatch      the PP=1 trainer's teacher forward per micro-batch gives the step's loss and grad
                              norm of teacher-forwards-first (training/opsd/step.py teacher_signal_source), for the
                              plain teacher, Purified OPSD (three teachers) and DemoPSD
  divergence                  vocab-parallel reverse KL forward+backward at 8,192 x 151,936 vs the naive
                              log-softmax of both: time, peak memory, achieved bytes/s vs a measured copy bandwidth
  opsd_throughput             OPSD step (teacher forward + student forward/backward + Adam) at a ~1B shape:
                              tokens/s and MFU (6N per trained token + 2N per teacher token over --peak-tflops)
  fp8                         with Transformer Engine: FP8 vs BF16 logits and one step, FP8 active in the student's
                              and the no-grad teacher's forward (skipped without TE)

and the multi-rank probes, at the layouts N allows (``layouts_for``: TP, TP+SP, PP, PP+VPP, DP, and at N >= 8
TP x PP x DP):

  layout_<layout>             one OPSD step (EMA teacher, fixed rollouts) through OPSDTrainer.train_step at that
                              layout equals the same step on a single rank (a separate one-process run): loss,
                              grad norm, every updated student and teacher tensor (LAYOUT_REL_TOL)
  divergence_tp<T>            the vocab-parallel reverse KL with the vocabulary split over the TP group equals the
                              naive full log-softmax (loss, each rank's gradient slice); time and achieved fraction
                              of the device's copy bandwidth (on CPU: of a measured memcpy)
  checkpoint_resume_<layout>  save after step 1, step 2; a new trainer resumes the checkpoint at the same layout and
                              its step 2 equals the first one's (loss, grad norm, student and teacher tensors)
  fp8_teacher_update          with TE: after a teacher update (teacher.weights=refresh), the FP8 teacher's logits
                              change and equal a fresh FP8 replica's (TE's cached FP8 weights are re-cast); skipped
                              with "TE absent" otherwise
  sidecar_push_tp<S>          with vLLM: a real sidecar at TP=S <= N (started at the beginning, on rank 0) gets one
                              step's weights through the collective transport (NCCL on GPUs, gloo on CPU) from the
                              trainer's own push (Run.push_weights); its greedy tokens equal the trainer's logits
                              argmax at every position (teacher-forced; near-ties below TIE_GAP are not counted)
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

REAL_VOCAB = 151_936
# probe name -> the loss config keys (coverage x divergence) it runs
LOSS_KINDS = {"reverse_kl": ["loss.divergence=reverse_kl"], "forward_kl": ["loss.divergence=forward_kl"],
              "jsd": ["loss.divergence=jsd"], "topk": ["loss.coverage=topk", "loss.top_k=16"],
              "k1": ["loss.coverage=sampled", "loss.divergence=k1", "loss.allow_k1_loss=true"],  # a logging estimator
              "k3": ["loss.coverage=sampled", "loss.divergence=k3"],
              "pg": ["loss.coverage=sampled", "loss.divergence=pg"]}
# Small model for parity and steps; the throughput shape is ~1.1 B parameters (hidden 2048, 16 layers).
# 8 KV heads (GQA 2:1) allow TP up to 8; 4 layers allow PP=2 x VPP=2.
SMALL = dict(hidden_size=64, num_layers=4, num_heads=16, num_kv_heads=8, head_dim=32, intermediate_size=128)
ONE_B = dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=6144,
             tie_word_embeddings=True)
PROBES = ("logits_fp32", "logits_bf16", *(f"step_opsd_{k}" for k in LOSS_KINDS), "step_sft", "step_grpo",
          "teacher_per_microbatch", "divergence", "opsd_throughput", "fp8")
# the multi-rank probes' names start with these (the rest names the layout, the TP size or the sidecar's TP)
MULTI_RANK_PROBES = ("layout_", "divergence_tp", "checkpoint_resume_", "fp8_teacher_update", "sidecar_push_tp")
STEP_REL_TOL = 2e-2  # device step vs CPU step, both fp32 params (cuBLAS/TF32-level and reduction-order noise)
# A layout's step vs the single-rank step, fp32 params: only the order of reductions differs (TP's split matmuls
# and all-reduces, PP's p2p, DP's gradient reduce-scatter). Measured on CPU: <= 1e-6 (tests/test_opsd_step.py
# asserts 1e-4 for the same comparison); on GPUs the split GEMMs pick other cuBLAS kernels, hence the margin.
LAYOUT_REL_TOL = {"cpu": 1e-4, "cuda": 2e-3}
RESUME_REL_TOL = {"cpu": 1e-6, "cuda": 1e-5}  # the same layout before and after a checkpoint: (near) bitwise
TIE_GAP = 1e-4  # a greedy position whose top-2 logits are closer than this is a near-tie: not counted either way
SIDECAR_PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45]]
SIDECAR_TOKENS = 8


# ------------------------------------------------------------------------------------------ fixtures
class NoWeightPush:
    """Stands in for the sidecar client: these steps have no sidecar (vLLM is not part of the check)."""

    def push_weights(self, model_chunks, version, restore=False):
        return None


def fixed_rollouts(trainer, teacher_contexts: list, seed: int = 0, prompts: int = 2):
    """``prompts`` prompts x two rollouts of fixed token ids (student prompt, teacher prompts, responses,
    rewards); the same on every rank and in every layout."""
    import torch

    from megatron_opsd.training.rollouts import StepRollouts

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(20, 400, (n,), generator=g).tolist()  # noqa: E731 - inside the tokenizer
    student = [ids(6 - i % 2) for i in range(prompts)]
    responses = [[ids(7 - i % 3), ids(4 + i % 3)] for i in range(prompts)]
    teacher = {ctx: [[ids(9 - i % 2)] * 2 for i in range(prompts)] for ctx in teacher_contexts}
    rewards = [[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(prompts)]
    logprobs = [[[-1.0] * len(r) for r in group] for group in responses]
    return StepRollouts(student, responses, [[r > 0.5 for r in g] for g in rewards], rewards, logprobs, teacher)


def write_checkpoint(root: Path, vocab_size: int = REAL_VOCAB, name: str = "qwen3_small") -> Path:
    """The small random Qwen3; ``vocab_size=None``: the tokenizer's own (the sidecar's model: vLLM detokenizes
    what it samples, so every id must be a token)."""
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    kw = {"vocab_size": vocab_size} if vocab_size else {}
    return make_tiny_hf_checkpoint(root / name, family="qwen3", **kw, **SMALL)


def base_overrides(model: Path, run_dir: Path, train_path: Path, prompts: int = 2) -> list:
    return [f"model.path={model}", f"data.train_path={train_path}", f"logging.dir={run_dir}",
            "logging.tensorboard=false", "logging.progress=false", "rollout.sidecar_urls=http://sidecar.invalid:1",
            f"rollout.prompts_per_step={prompts}", "rollout.n=2", "optim.lr=1e-3", "train.steps=1"]


def world() -> tuple[int, int]:
    """(rank, world size) of this process (0, 1 before torch.distributed starts)."""
    import torch

    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def step_prompts(ctx: dict) -> int:
    """Prompts per fixed step: two rollouts each, so every data-parallel rank of the world gets a row (the CPU
    reference of a CUDA run is told the CUDA world's number)."""
    return ctx.get("step_prompts") or max(2, (world()[1] + 1) // 2)


# ------------------------------------------------------------------------------------------ probes
def probe_logits(ctx: dict, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_opsd.models.gpt import PARAMS_DTYPES, build_model
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.parallel.device import current_device, to_device

    dtype = PARAMS_DTYPES[dtype_name]
    chunks = build_model(ctx["model"], params_dtype=dtype)
    load_hf_checkpoint(chunks, ctx["model"])
    batch = to_device({"tokens": torch.randint(0, REAL_VOCAB, (2, 64), generator=torch.Generator().manual_seed(1)),
                       "position_ids": torch.arange(64).expand(2, -1)})
    hf = AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=dtype).to(current_device()).eval()
    with torch.no_grad():
        ours = chunks[0].eval()(batch["tokens"], batch["position_ids"], attention_mask=None)[..., :REAL_VOCAB].float()
        ref = hf(batch["tokens"]).logits.float()
    return compare_logits(ours, ref, max_abs=1e-3 if dtype_name == "float32" else 0.1)


def compare_logits(ours, ref, *, max_abs: float) -> dict:
    import torch

    logp, logq = torch.log_softmax(ours, -1), torch.log_softmax(ref, -1)
    kl = (logq.exp() * (logq - logp)).sum(-1).mean().item()
    out = {"max_abs_diff": (ours - ref).abs().max().item(), "mean_kl": kl,
           "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(), "tolerance": max_abs}
    out["status"] = "pass" if out["max_abs_diff"] <= max_abs and math.isfinite(kl) else "fail"
    return out


def _opsd_trainer(ctx: dict, name: str, overrides: list, prompts: int = 0, model: str = ""):
    """An OPSDTrainer on fixed rollouts (``prompts`` of them; default ``step_prompts()``) and no sidecar."""
    from megatron_opsd.config import load_config
    from megatron_opsd.data.contexts import teacher_context_names
    from megatron_opsd.training.opsd.trainer import OPSDTrainer

    prompts = prompts or step_prompts(ctx)
    cfg = load_config(None, base_overrides(model or ctx["model"], ctx["root"] / name, ctx["opsd_data"], prompts)
                      + overrides)
    trainer = OPSDTrainer(cfg)
    trainer.run.client = NoWeightPush()
    contexts = teacher_context_names(cfg.teacher)
    trainer.rollouts = lambda timer: fixed_rollouts(trainer, contexts, prompts=prompts)
    return trainer


def _step_numbers(trainer, close: bool = True) -> dict:
    from megatron_opsd.training.loop import train_one_step

    try:
        metrics = train_one_step(trainer.run, trainer)
    finally:
        if close and trainer.run.logger is not None:
            trainer.run.logger.close()
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}


def probe_opsd_step(ctx: dict, kind: str) -> dict:
    return _step_numbers(_opsd_trainer(ctx, f"opsd_{kind}", LOSS_KINDS[kind]))


def probe_sft_step(ctx: dict) -> dict:
    from megatron_opsd.training.sft.config import load_sft_config
    from megatron_opsd.training.sft.trainer import SFTTrainer

    cfg = load_sft_config(None, [f"model.path={ctx['model']}", f"data.train_path={ctx['sft_data']}",
                                 f"logging.dir={ctx['root'] / 'sft'}", "logging.tensorboard=false",
                                 "logging.progress=false", f"data.global_batch_size={2 * step_prompts(ctx)}",
                                 "data.shuffle=false",
                                 "optim.lr=1e-3", "train.steps=1"])
    return _step_numbers(SFTTrainer(cfg))


def probe_grpo_step(ctx: dict) -> dict:
    from megatron_opsd.training.grpo.config import load_rl_config
    from megatron_opsd.training.grpo.trainer import GRPOTrainer

    prompts = step_prompts(ctx)
    cfg = load_rl_config(None, base_overrides(ctx["model"], ctx["root"] / "grpo", ctx["opsd_data"], prompts)
                         + ["rl.recompute_old_logprobs=true"])
    trainer = GRPOTrainer(cfg)
    trainer.run.client = NoWeightPush()
    trainer.rollouts = lambda timer: fixed_rollouts(trainer, [], prompts=prompts)
    return _step_numbers(trainer)


TEACHER_TARGETS = {"teacher": ["loss.divergence=jsd"], "pmi": ["loss.target=pmi", "teacher.purified=true"],
                   "demopsd": ["loss.target=demopsd"]}


def probe_teacher_per_microbatch(ctx: dict) -> dict:
    """The trainer's PP=1 per-micro-batch teacher vs all teacher rows collected first: same loss and grad norm,
    for the plain teacher, Purified OPSD's three teacher forwards and DemoPSD's barycenter."""
    out = {}
    for target, overrides in TEACHER_TARGETS.items():
        result = _teacher_modes(ctx, target, overrides)
        out.update({f"{target}_{k}": v for k, v in result.items()})
    out["status"] = "pass" if all(v == "pass" for k, v in out.items() if k.endswith("_status")) else "fail"
    return out


def _teacher_modes(ctx: dict, target: str, overrides: list) -> dict:
    from megatron_opsd.training.opsd import step as opsd_step_module  # opsd_step calls its teacher_signal_source
    from megatron_opsd.training.response_rows import collect_response_rows

    numbers = {}
    for mode in ("microbatch", "step"):
        trainer = _opsd_trainer(ctx, f"teacher_{target}_{mode}", overrides)
        if mode == "step":
            original = opsd_step_module.teacher_signal_source

            def step_first(model_for, teacher_mbs, student_mbs, *, loss, real_vocab_size, teacher_scope):
                rows = {}
                for c, mbs in teacher_mbs.items():
                    with teacher_scope(c):
                        rows[c] = collect_response_rows(model_for(c), mbs)
                return opsd_step_module.teacher_signals(rows, student_mbs, loss=loss, real_vocab_size=real_vocab_size)

            opsd_step_module.teacher_signal_source = step_first
            try:
                numbers[mode] = _step_numbers(trainer)
            finally:
                opsd_step_module.teacher_signal_source = original
        else:  # at PP=1 the trainer's source is per micro-batch (a callable), not a list
            assert callable(opsd_step_module.teacher_signal_source(trainer.teacher_model, {}, [], loss=None, real_vocab_size=0))
            numbers[mode] = _step_numbers(trainer)
    a, b = numbers["microbatch"], numbers["step"]
    ok = all(math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7) for k in a)
    return {**{f"{k}_{m}": v for m, n in numbers.items() for k, v in n.items()}, "status": "pass" if ok else "fail"}


def probe_divergence(ctx: dict, tokens: int) -> dict:
    """Chunked vocab-parallel reverse KL vs the naive full log-softmax, forward + backward, on every rank
    separately (TP=1): the single-device kernel's speed and memory."""
    return _divergence(ctx, tokens, tp=1)


def probe_divergence_tp(ctx: dict, tokens: int, tp: int) -> dict:
    """The same with the vocabulary split over a TP group of ``tp`` ranks (the layout's world is TP x DP): loss
    and each rank's gradient slice vs the naive full log-softmax of the unsplit logits."""
    from megatron_opsd.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    return _divergence(ctx, tokens, tp=tp)


def _divergence(ctx: dict, tokens: int, tp: int) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_opsd.losses import vocab_parallel_divergence
    from megatron_opsd.parallel.device import current_device

    device, cuda = current_device(), ctx["cuda"]
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    full_student = torch.randn(tokens, REAL_VOCAB, device=device, dtype=dtype, generator=g)
    full_teacher = torch.randn(tokens, REAL_VOCAB, device=device, dtype=dtype, generator=g)
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    shard = REAL_VOCAB // tp  # 151,936 = 2^7 x 1187: whole shards at TP = 1, 2, 4, 8
    lo = (ps.get_tensor_model_parallel_rank() if tp > 1 else 0) * shard
    student = full_student[:, lo:lo + shard].clone().requires_grad_(True)
    teacher = full_teacher[:, lo:lo + shard].contiguous()
    weights = torch.full((tokens,), 1.0 / tokens, device=device)

    def ours():
        loss, _ = vocab_parallel_divergence(student, teacher, kind="reverse_kl", reduction="sum", group=group,
                                            token_weights=weights)
        loss.backward()
        return loss

    def naive():  # on the whole vocabulary, on every rank
        full = full_student.detach().requires_grad_(True)
        logp, logq = torch.log_softmax(full.float(), -1), torch.log_softmax(full_teacher.float(), -1)
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
        loss.backward()
        student.grad = full.grad[:, lo:lo + shard]
        return loss

    out = {"tokens": tokens, "vocab": REAL_VOCAB, "tp": tp, "dtype": str(dtype).replace("torch.", "")}
    grads = {}
    for name, fn in (("ours", ours), ("naive", naive)):
        fn()  # warm-up (allocator, kernels)
        student.grad = None
        seconds, peak, loss = _timed(fn, cuda)
        out[f"{name}_ms"], out[f"{name}_loss"] = seconds * 1e3, loss.item()
        if peak is not None:
            out[f"{name}_peak_extra_gib"] = peak / 2**30
        grads[name] = student.grad.float()
        student.grad = None
    out["grad_max_abs_diff"] = (grads["ours"] - grads["naive"]).abs().max().item()
    # The least traffic any implementation needs on this rank: read its student and teacher shards once, write
    # the gradient shard once.
    least = 3 * tokens * shard * student.element_size()
    out["least_bytes"] = least
    out["achieved_bytes_per_s"] = least / (out["ours_ms"] / 1e3)
    out["copy_bytes_per_s"] = _copy_bandwidth(device, cuda)
    out["copy_kind"] = "device-to-device copy" if cuda else "host memcpy (torch copy_)"
    out["fraction_of_copy_bandwidth"] = out["achieved_bytes_per_s"] / out["copy_bytes_per_s"]
    ok = math.isclose(out["ours_loss"], out["naive_loss"], rel_tol=1e-2) and out["grad_max_abs_diff"] < 1e-3
    out["status"] = "pass" if ok else "fail"
    out["summary"] = (f"loss {out['ours_loss']:.6g} vs naive {out['naive_loss']:.6g}, grad diff "
                      f"{out['grad_max_abs_diff']:.1e}; {out['ours_ms']:.1f} ms, "
                      f"{out['fraction_of_copy_bandwidth']:.2f} of {out['copy_kind']} bandwidth "
                      f"({out['copy_bytes_per_s'] / 1e9:.0f} GB/s)")
    return out


def _timed(fn, cuda: bool):
    import torch

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() - base) if cuda else None, result


def _copy_bandwidth(device, cuda: bool) -> float:
    """Copy bytes/s (read + write) of a 2 GiB device buffer (a 256 MiB host buffer on CPU): the bound a
    memory-bound kernel meets."""
    import torch

    src = torch.empty((1 << 30) if cuda else (1 << 27), dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    if cuda:
        torch.cuda.synchronize()
    return 5 * 2 * src.numel() * src.element_size() / (time.perf_counter() - start)


def probe_opsd_throughput(ctx: dict, shape: dict, seq: int, response: int, microbatches: int) -> dict:
    """One timed OPSD step (after one warm-up) on a random model: the trainer's library calls, live teacher."""
    import torch

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.tiny import tiny_hf_config
    from megatron_opsd.planning.memory import ModelShape
    from megatron_opsd.config import LossConfig, OptimConfig
    from megatron_opsd.training.engine import optimizer_step, setup_training, zero_grads
    from megatron_opsd.losses import token_weights
    from megatron_opsd.training.batches import response_microbatches
    from megatron_opsd.training.opsd.step import student_forward_backward, teacher_signal_source

    hf_config = tiny_hf_config("qwen3", vocab_size=REAL_VOCAB, max_position_embeddings=max(seq, 512), **shape)
    dtype = torch.bfloat16 if ctx["cuda"] else torch.float32
    chunks = build_model(hf_config, params_dtype=dtype)
    ddp, optimizer, scheduler = setup_training(chunks, OptimConfig(lr=1e-6), total_steps=1000)
    g = torch.Generator().manual_seed(0)
    prompt = seq - response
    prompts = [torch.randint(0, REAL_VOCAB, (prompt,), generator=g).tolist() for _ in range(microbatches)]
    responses = [torch.randint(0, REAL_VOCAB, (response,), generator=g).tolist() for _ in range(microbatches)]
    weights = token_weights([response] * microbatches, "token_mean")
    loss = LossConfig()

    def step():
        student = response_microbatches(prompts, responses, weights, micro_batch_size=1, pad_id=0)
        teacher = {"teacher": response_microbatches(prompts, responses, weights, micro_batch_size=1, pad_id=0)}
        signals = teacher_signal_source(lambda context: ddp, teacher, student, loss=loss, real_vocab_size=REAL_VOCAB)
        zero_grads(ddp, optimizer)
        out = student_forward_backward(ddp, student, signals, loss=loss, real_vocab_size=REAL_VOCAB)
        optimizer_step(optimizer, scheduler)
        return out.loss

    step()
    seconds, peak, value = _timed(step, ctx["cuda"])
    params = ModelShape.from_hf_config(hf_config.to_dict()).total_params()
    tokens = seq * microbatches  # trained (student) tokens; the teacher forwards as many
    flops = 6 * params * tokens + 2 * params * tokens
    out = {"params": params, "seq": seq, "microbatches": microbatches, "dtype": str(dtype).replace("torch.", ""),
           "step_s": seconds, "tokens_per_s": tokens / seconds, "loss": value,
           "status": "pass" if math.isfinite(value) else "fail"}
    if ctx["cuda"]:
        out.update(peak_gib=peak / 2**30, mfu=flops / seconds / (ctx["peak_tflops"] * 1e12),
                   peak_tflops=ctx["peak_tflops"])
    return out


def probe_fp8(ctx: dict) -> dict:
    """FP8 (TE, current scaling) vs BF16 on the same weights; FP8 must be active in the student's forward and in
    the no-grad teacher forward (a forward hook on a TE linear reads FP8GlobalStateManager)."""
    import torch

    from megatron_opsd.models.families import have_transformer_engine

    if not ctx["cuda"] or not have_transformer_engine():
        return {"status": "skip", "reason": "TE absent: Transformer Engine is not usable here (needs CUDA and TE)"}
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.parallel.device import to_device
    from megatron_opsd.training.response_rows import response_rows

    models = {}
    for name, fp8 in (("bf16", None), ("fp8", "hybrid")):
        models[name] = build_model(ctx["model"], params_dtype=torch.bfloat16, fp8=fp8, fp8_recipe="current")
        load_hf_checkpoint(models[name], ctx["model"])
    seen = []
    layer = next(m for m in models["fp8"][0].modules() if type(m).__module__.startswith("megatron.core.extensions"))
    layer.register_forward_hook(lambda *a: seen.append(FP8GlobalStateManager.is_fp8_enabled()))
    batch = to_device({"tokens": torch.randint(0, REAL_VOCAB, (1, 64), generator=torch.Generator().manual_seed(2)),
                       "position_ids": torch.arange(64).expand(1, -1),
                       "row_mask": torch.ones(1, 64, dtype=torch.bool)})
    logits = {}
    for name, chunks in models.items():
        with torch.no_grad():
            logits[name] = chunks[0](batch["tokens"], batch["position_ids"], attention_mask=None)[..., :REAL_VOCAB]
    student_active = bool(seen and all(seen))
    seen.clear()
    response_rows(models["fp8"][0], batch)  # the trainer's no-grad teacher forward
    out = compare_logits(logits["fp8"].float(), logits["bf16"].float(), max_abs=float("inf"))
    out.update(fp8_active_student=student_active, fp8_active_teacher=bool(seen and all(seen)))
    out["status"] = "pass" if out["fp8_active_student"] and out["fp8_active_teacher"] else "fail"
    return out


# ------------------------------------------------------------------------------------------ multi-rank probes
def layouts_for(n: int, kv_heads: int = SMALL["num_kv_heads"], layers: int = SMALL["num_layers"]) -> dict:
    """Probe name -> layout (tp, pp, vpp, sp) for a world of ``n`` ranks; DP = n / (TP x PP) fills the rest.

    TP: the largest divisor of n up to 8 that divides the KV heads; PP: the largest divisor of n with
    2 x PP dividing the layers (so PP x VPP=2 fits too); at n >= 8 also TP=2 x PP=2 with sequence parallelism."""
    if n == 1:
        return {}
    tp = max(d for d in range(1, min(n, 8) + 1) if n % d == 0 and kv_heads % d == 0)
    pp = max(d for d in range(1, n + 1) if n % d == 0 and layers % (2 * d) == 0)
    layouts = [dict(tp=1, pp=1)]
    if tp > 1:
        layouts += [dict(tp=tp, pp=1), dict(tp=tp, pp=1, sp=True)]
    if pp > 1:
        layouts += [dict(tp=1, pp=pp), dict(tp=1, pp=pp, vpp=2)]
    if n % 4 == 0 and n >= 8 and kv_heads % 2 == 0 and layers % 2 == 0:
        layouts.append(dict(tp=2, pp=2, sp=True))
    return {layout_name(layout, n): layout for layout in layouts}


def layout_name(layout: dict, n: int) -> str:
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    parts = [f"tp{tp}" if tp > 1 else "", f"pp{pp}" if pp > 1 else "", f"vpp{layout['vpp']}" if layout.get("vpp")
             else "", "sp" if layout.get("sp") else "", f"dp{n // (tp * pp)}" if n // (tp * pp) > 1 else ""]
    return "_".join(part for part in parts if part) or "single"


def layout_overrides(layout: dict) -> list:
    return [f"parallel.tensor_model_parallel_size={layout.get('tp', 1)}",
            f"parallel.pipeline_model_parallel_size={layout.get('pp', 1)}",
            *([f"parallel.virtual_pipeline_model_parallel_size={layout['vpp']}"] if layout.get("vpp") else []),
            f"parallel.sequence_parallel={'true' if layout.get('sp') else 'false'}"]


# The layout step: 8 rollouts (enough micro-batches for PP=2 x VPP=2 and one row per DP rank at N = 8) and an
# EMA teacher, so the teacher update, its checkpoint and its sharding are part of what must agree.
LAYOUT_PROMPTS = 4
LAYOUT_OVERRIDES = ["teacher.weights=ema", "teacher.ema_decay=0.5", "optim.micro_batch_size=1"]


def layout_trainer(ctx: dict, name: str, layout: dict, extra: tuple = (), model: str = ""):
    return _opsd_trainer(ctx, name, [*LAYOUT_OVERRIDES, *layout_overrides(layout), *extra], prompts=LAYOUT_PROMPTS,
                         model=model)


def gathered(chunks) -> dict:
    """COLLECTIVE: HF name -> full fp32 CPU tensor on global rank 0 (empty elsewhere)."""
    from megatron_opsd.models.weights import iter_hf_tensors

    return {name: t.float().cpu() for name, t in iter_hf_tensors(chunks) if t is not None}


def step_and_weights(trainer, close: bool = True) -> dict:
    """COLLECTIVE: one train_step's loss and grad norm, then the student's and teacher's full tensors (rank 0)."""
    numbers = _step_numbers(trainer, close=close)
    numbers["params"] = gathered(trainer.run.student)
    numbers["teacher"] = gathered(trainer.teacher)
    return numbers


def single_rank_worker(ctx: dict) -> dict:
    """The reference: the layout step on a world of one process (``run_distributed``, spawned by rank 0)."""
    return step_and_weights(layout_trainer(ctx, "single_rank", {}))


def single_rank_reference(ctx: dict) -> tuple[dict, bool]:
    """COLLECTIVE: rank 0 runs the step in a separate one-process world (its own rendezvous, the current device);
    the other ranks wait. Returns ({loss, grad_norm, params, teacher} on rank 0, {} elsewhere; whether rank 0 has
    it, on every rank). Rank 0 raises its failure only after the barrier and the broadcast, so the ranks' next
    collectives still pair (otherwise the others wait out the world's timeout, 10 min, and the run ends)."""
    import torch

    from megatron_opsd.parallel import ParallelConfig
    from megatron_opsd.parallel.launch import run_distributed

    ref, failure = {}, None
    if world()[0] == 0:
        try:  # its own store: not torchrun's agent store, which a worker under torchrun is told to join
            ref = run_distributed(single_rank_worker, 1, ParallelConfig(), ctx,
                                  env={"TORCHELASTIC_USE_AGENT_STORE": "False"})[0]
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks are told
            failure = err
    have = [failure is None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(have, src=0)
    if failure is not None:  # one line for the table; the world's report (rank 0's traceback) stays chained
        lines = [line for line in str(failure).splitlines() if line.strip()] or [type(failure).__name__]
        raise RuntimeError(f"the single-rank reference failed: {lines[-1].strip()}") from failure
    return ref, have[0]


def max_rel(a: dict, b: dict) -> float:
    """The largest relative (Frobenius) difference between same-named tensors; inf when the names differ."""
    if sorted(a) != sorted(b):
        return float("inf")
    return max((((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a), default=0.0)


def compare_steps(got: dict, ref: dict, tol: float, what: str) -> dict:
    """Rank 0: loss, grad norm and tensors of ``got`` vs ``ref`` within relative ``tol``; other ranks: pass."""
    if world()[0] != 0:
        return {"status": "pass"}
    out = {"loss": got["loss"], f"{what}_loss": ref["loss"], "grad_norm": got["grad_norm"],
           f"{what}_grad_norm": ref["grad_norm"], "tolerance": tol}
    out["loss_rel"] = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    out["grad_norm_rel"] = abs(got["grad_norm"] - ref["grad_norm"]) / max(abs(ref["grad_norm"]), 1e-30)
    out["params_rel"] = max_rel(got["params"], ref["params"])
    out["teacher_rel"] = max_rel(got["teacher"], ref["teacher"])
    out["tensors"] = len(got["params"])
    bad = [k for k in ("loss_rel", "grad_norm_rel", "params_rel", "teacher_rel") if not out[k] <= tol]
    out["status"] = "fail" if bad else "pass"
    if bad:
        out["error"] = f"{', '.join(bad)} above {tol:g} vs the {what} step"
    out["summary"] = (f"vs {what}: loss rel {out['loss_rel']:.1e}, grad norm rel {out['grad_norm_rel']:.1e}, "
                      f"{out['tensors']} student tensors rel {out['params_rel']:.1e}, teacher rel "
                      f"{out['teacher_rel']:.1e} (tol {tol:g})")
    return out


def probe_layout(ctx: dict, name: str, layout: dict, reference: dict) -> dict:
    """One OPSD step at ``layout`` equals the single-rank step."""
    trainer = layout_trainer(ctx, name, layout)
    seqs, rows = set(), set()  # the sequence length the last stage gets, and the rows its final norm sees
    last = trainer.run.student[-1]
    handles = [last.register_forward_pre_hook(lambda module, args: seqs.add(args[0].shape[1]))]
    norm = getattr(getattr(last, "decoder", None), "final_layernorm", None)
    if norm is not None:  # (the last PP stage)
        handles.append(norm.register_forward_hook(lambda module, args, output: rows.add(args[0].shape[0])))
    try:
        got = step_and_weights(trainer)
    finally:
        for handle in handles:
            handle.remove()
    out = compare_steps(got, reference, LAYOUT_REL_TOL[ctx["device_kind"]], "single-rank")
    out["layout"] = layout
    if rows:  # with sequence parallelism each TP rank's norm sees 1/TP of the (padded) sequence
        split = layout.get("tp", 1) if layout.get("sp") else 1
        out["norm_rows_times_split_equal_seq"] = {r * split for r in rows} == seqs
        if not out["norm_rows_times_split_equal_seq"]:
            out["status"] = "fail"
            out["error"] = f"the final norm saw {sorted(rows)} rows of sequences {sorted(seqs)} (split {split})"
    return out


def probe_checkpoint_resume(ctx: dict, name: str, layout: dict) -> dict:
    """Step 1, save, step 2 (A); a new trainer at the same layout resumes the checkpoint and runs step 2 (B):
    B's loss, grad norm, student and teacher (EMA) tensors equal A's."""
    extra = (f"checkpoint.dir={ctx['root'] / ('ckpt_' + name)}",)
    first = layout_trainer(ctx, f"ckpt_a_{name}", layout, extra)
    _step_numbers(first, close=False)
    first.run.save(first.sampler, first.extra_models())
    expected = step_and_weights(first)
    del first
    second = layout_trainer(ctx, f"ckpt_b_{name}", layout, (*extra, "checkpoint.resume=true"))
    loaded = second.run.resume(second.sampler, second.extra_models())
    if loaded is None or loaded.step != 1:
        raise RuntimeError(f"resume found {loaded and loaded.step} instead of the checkpoint of step 1")
    out = compare_steps(step_and_weights(second), expected, RESUME_REL_TOL[ctx["device_kind"]], "uninterrupted")
    out["layout"] = layout
    return out


def probe_fp8_teacher_update(ctx: dict) -> dict:
    """FP8 teacher (TE): after the teacher update (``teacher.weights=refresh`` every step, a large lr) the teacher
    forward's logits change and equal those of a fresh FP8 replica holding the same weights.

    TE casts a linear layer's weights to FP8 on its first forward and keeps that copy while megatron says
    ``is_first_microbatch=False`` (TE 2.10 layernorm_linear.py: ``update_workspace = is_first_microbatch is None
    or is_first_microbatch``); megatron re-opens it only through ``set_is_first_microbatch()``, called from its
    schedules. A teacher forward outside the schedules after a weight update would score with stale weights."""
    import torch

    from megatron_opsd.models.families import have_transformer_engine

    if not ctx["cuda"] or not have_transformer_engine():
        return {"status": "skip", "reason": "TE absent: Transformer Engine is not usable here (needs CUDA and TE)",
                "summary": "TE absent"}
    trainer = _opsd_trainer(ctx, "fp8_teacher", ["model.params_dtype=bfloat16", "model.fp8=hybrid",
                                                 "model.fp8_recipe=current", "teacher.weights=refresh",
                                                 "teacher.refresh_every=1", "optim.lr=1e-2"])
    seen = []  # (args, kwargs, logits) of every forward of the teacher replica inside train_step

    def record(module, args, kwargs, output):
        seen.append((args, kwargs, output.detach().float().clone()))

    handle = trainer.teacher[0].register_forward_hook(record, with_kwargs=True)
    try:
        _step_numbers(trainer, close=False)  # step 1: teacher = initial weights; then the refresh copies the student
        first = list(seen)
        fresh = trainer.run.replica(teacher=True)  # a new FP8 replica of the same (refreshed) weights
        seen.clear()
        _step_numbers(trainer)  # step 2: the same fixed rollouts, so the teacher sees the same inputs
        second = list(seen)
    finally:
        handle.remove()
    if not first or len(first) != len(second):
        raise RuntimeError(f"the teacher forwards were not seen ({len(first)} in step 1, {len(second)} in step 2)")
    with torch.no_grad():
        fresh[0].eval()
        reference = [fresh[0](*args, **kwargs).float() for args, kwargs, _ in second]
    moved = max((r - a[2]).abs().max().item() for r, a in zip(reference, first))
    stale = max((r - b[2]).abs().max().item() for r, b in zip(reference, second))
    out = {"update_moved_logits": moved, "after_vs_fresh": stale, "teacher_forwards": len(second)}
    out["status"] = "pass" if moved > 0 and stale <= 0.1 * moved else "fail"
    if out["status"] == "fail":
        out["error"] = (f"after the teacher update its FP8 logits differ from a fresh replica's by {stale:.3g} "
                        f"(the update moved them by {moved:.3g}): stale FP8 weight copies")
    out["summary"] = f"teacher logits moved {moved:.3g} by the update; vs a fresh FP8 replica {stale:.3g}"
    return out


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def sidecar_placement(n: int, cuda: bool) -> tuple[int, dict, str]:
    """(sidecar TP, its extra environment, why not) for a world of ``n`` trainer ranks on this node.

    On GPUs the sidecar never shares trainer rank 0's GPU: rank 0 sends every bucket and NCCL refuses two ranks
    of one communicator on one device. It takes GPUs no trainer rank uses when the node has them, else those of
    trainer ranks 1.. (a small model: both fit)."""
    if not cuda:
        tp = min(2, n)
        env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")} if tp == 2 else {}
        return tp, env, ""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    spare = gpus[n:] or gpus[1:n]
    if not spare:
        return 0, {}, "needs a GPU that trainer rank 0 does not use: run with N >= 2 or on a node with a spare GPU"
    tp = 2 if len(spare) >= 2 else 1
    return tp, {"CUDA_VISIBLE_DEVICES": ",".join(spare[:tp])}, ""


def start_sidecar_early(ctx: dict) -> dict:
    """Rank 0 starts the sidecar in a thread now, so vLLM's start overlaps the other probes; the box gets
    ``process`` or ``error``. Serves the small-vocabulary checkpoint (the trainer's tiny tokenizer covers it)."""
    box: dict = {}
    tp, env, why = sidecar_placement(world()[1], ctx["cuda"])
    box.update(tp=tp, why=why)
    if world()[0] != 0 or why or not vllm_installed():
        return box

    def start():
        from megatron_opsd.rollout.client import start_sidecar_process

        try:
            box["process"] = start_sidecar_process(
                ctx["sidecar_model"], dtype="float32", max_model_len=256, tensor_parallel_size=tp,
                kv_cache_memory_bytes=256 << 20, gpu_memory_utilization=0.1 if ctx["cuda"] else None,
                enforce_eager=True, log_path=ctx["root"] / "sidecar.log", env=env, startup_timeout_s=900)
        except Exception as err:  # noqa: BLE001 - reported by the sidecar probe
            box["error"] = f"{type(err).__name__}: {err}"

    box["thread"] = threading.Thread(target=start, name="sidecar-start", daemon=True)
    box["thread"].start()
    return box


def probe_sidecar_push(ctx: dict, layout: dict, box: dict) -> dict:
    """A real vLLM sidecar gets one OPSD step's weights from the trainer at ``layout`` through the collective
    transport (the trainer's own ``Run.push_weights`` at the end of ``train_step``); then its greedy tokens equal
    the argmax of the trainer's logits (gathered over TP) at every position, and its weight version is 1."""
    import torch
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opsd.parallel.device import current_device
    from megatron_opsd.rollout.client import SidecarClient
    from megatron_opsd.parallel.control import broadcast_object

    if box.get("thread") is not None:
        box["thread"].join(timeout=900)
    url = broadcast_object(box["process"].url if "process" in box else "")
    error = broadcast_object(box.get("error", ""))
    if error:
        raise RuntimeError(f"the sidecar did not start: {error}")
    trainer = layout_trainer(ctx, "sidecar", layout, ("optim.lr=1e-2",), model=ctx["sidecar_model"])
    rank = world()[0]
    client = trainer.run.client = SidecarClient(url, transport="collective", timeout_s=300, sync_timeout_s=300)

    def greedy() -> list:
        samples = client.generate(SIDECAR_PROMPTS, temperature=0.0, max_tokens=SIDECAR_TOKENS, ignore_eos=True)
        return [s[0].token_ids for s in samples]

    try:
        before = greedy() if rank == 0 else None
        start = time.perf_counter()
        _step_numbers(trainer)  # ... optimizer, teacher update, then Run.push_weights(version 1): collective
        step_s = time.perf_counter() - start
        after = broadcast_object(greedy() if rank == 0 else None)
        version = client.health()["weight_version"] if rank == 0 else None
    finally:
        client.close()
    agree = ties = positions = 0
    chunk = trainer.run.student[0].eval()
    with torch.no_grad():
        for prompt, generated in zip(SIDECAR_PROMPTS, after):
            seq = torch.tensor([prompt + generated], device=current_device())
            logits = chunk(seq, torch.arange(seq.shape[1], device=seq.device).unsqueeze(0), attention_mask=None)
            logits = gather_from_tensor_model_parallel_region(logits)[0, :, :trainer.run.real_vocab].float()
            rows = logits[len(prompt) - 1: len(prompt) - 1 + len(generated)]
            top2 = rows.topk(2, dim=-1)
            for pos, token in enumerate(generated):
                positions += 1
                if (top2.values[pos, 0] - top2.values[pos, 1]).item() < TIE_GAP:
                    ties += 1
                else:
                    agree += int(top2.indices[pos, 0].item() == token)
    out = {"sidecar_tp": box["tp"], "layout": layout, "weight_version": version, "positions": positions,
           "agree": agree, "near_ties": ties, "greedy_changed_by_push": before != after if rank == 0 else None,
           "step_with_push_s": step_s}
    ok = agree == positions - ties and positions - ties > 0
    if rank == 0:
        ok = ok and version == 1 and out["greedy_changed_by_push"]
    out["status"] = "pass" if ok else "fail"
    if not ok:
        out["error"] = (f"greedy vs trainer argmax: {agree}/{positions - ties} positions agree; weight version "
                        f"{version}; greedy changed by the push: {out['greedy_changed_by_push']}")
    out["summary"] = (f"sidecar TP={box['tp']} at version {version}: greedy == trainer argmax at {agree}/"
                      f"{positions - ties} positions ({ties} near-ties), changed by the push: "
                      f"{out['greedy_changed_by_push']}")
    return out


# ------------------------------------------------------------------------------------------ driver
def run_probe(name: str, fn, record: dict) -> None:
    start = time.perf_counter()
    try:
        result = fn()
        result.setdefault("status", "pass")
    except Exception as err:  # noqa: BLE001 - recorded; the next probe still runs
        result = {"status": "fail", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    record[name] = result
    if world()[0] == 0:
        shown = {k: v for k, v in result.items() if k not in ("traceback",)}
        print(f"[{result['status']:>4}] {name}: {json.dumps(shown, default=str)}", flush=True)


def agree(name: str, record: dict) -> None:
    """COLLECTIVE: a probe fails if it failed on any rank; this rank's record names the ranks and their errors."""
    import torch

    if world()[1] == 1:
        return
    mine = record[name]
    everyone = [None] * world()[1]
    torch.distributed.all_gather_object(everyone, (mine["status"], mine.get("error")))
    failed = [f"rank {r}: {error}" for r, (status, error) in enumerate(everyone) if status == "fail"]
    if failed:
        mine["status"], mine["error"] = "fail", "; ".join(failed)


def compare_with_cpu(record: dict, cpu: dict) -> None:
    """On CUDA: each step's loss and grad norm against the same step on the CPU."""
    for name, result in record.items():
        ref = cpu.get(name, {})
        if not name.startswith("step_") or result.get("status") != "pass" or ref.get("status") != "pass":
            continue
        for key in ("loss", "grad_norm"):
            result[f"cpu_{key}"] = ref[key]
            if not math.isclose(result[key], ref[key], rel_tol=STEP_REL_TOL, abs_tol=1e-6):
                result["status"] = "fail"
                result["error"] = f"{key} {result[key]} vs CPU {ref[key]} (rel tol {STEP_REL_TOL})"


def step_probes(ctx: dict) -> dict:
    probes = {f"step_opsd_{kind}": (lambda k=kind: probe_opsd_step(ctx, k)) for kind in LOSS_KINDS}
    probes["step_sft"] = lambda: probe_sft_step(ctx)
    probes["step_grpo"] = lambda: probe_grpo_step(ctx)
    return probes


def world_probes(ctx: dict) -> dict:
    """The probes run at the world's data-parallel layout (each rank its own device)."""
    cuda = ctx["cuda"]
    probes = {"logits_fp32": lambda: probe_logits(ctx, "float32"),
              "logits_bf16": lambda: probe_logits(ctx, "bfloat16"),
              **step_probes(ctx),
              "teacher_per_microbatch": lambda: probe_teacher_per_microbatch(ctx),
              "divergence": lambda: probe_divergence(ctx, 8192 if cuda else 128),
              "opsd_throughput": (lambda: probe_opsd_throughput(ctx, ONE_B, 2048, 1536, 4)) if cuda
              else (lambda: probe_opsd_throughput(ctx, SMALL, 128, 96, 2)),
              "fp8": lambda: probe_fp8(ctx)}
    assert tuple(probes) == PROBES
    return probes


def multi_rank_probes(ctx: dict, sidecar: dict) -> dict:
    """The layout probes (each against the single-rank step), the TP divergence, checkpoint resume, the FP8
    teacher update and the sidecar push, for this world's size."""
    n, cuda = world()[1], ctx["cuda"]
    layouts = layouts_for(n)
    reference: dict = {}
    have_reference = [False]  # on every rank: whether rank 0 holds the reference

    def single_rank() -> dict:
        ref, have_reference[0] = single_rank_reference(ctx)
        reference.update(ref)
        return {"summary": f"loss {reference['loss']:.6g}, grad norm {reference['grad_norm']:.6g} (rank 0)"
                if reference else "on rank 0"}

    def layout_probe(name: str, layout: dict):
        def run():
            if not have_reference[0]:  # every rank skips the layout's collectives alike
                raise RuntimeError("no single-rank reference (see layout_single_rank)")
            return probe_layout(ctx, name, layout, reference)
        return run

    probes = {}
    if layouts:
        probes["layout_single_rank"] = single_rank
        probes.update({f"layout_{name}": layout_probe(name, layout) for name, layout in layouts.items()})
    tp = max((layout["tp"] for layout in layouts.values()), default=1)
    if tp > 1:
        probes[f"divergence_tp{tp}"] = lambda: probe_divergence_tp(ctx, 8192 if cuda else 128, tp)
    ckpt = next((l for l in layouts.values() if l.get("vpp")), None) or \
        next((l for l in layouts.values() if l["tp"] > 1), None) or {}
    ckpt_name = layout_name(ckpt, n)
    probes[f"checkpoint_resume_{ckpt_name}"] = lambda: probe_checkpoint_resume(ctx, ckpt_name, ckpt)
    probes["fp8_teacher_update"] = lambda: probe_fp8_teacher_update(ctx)
    push_layout = next((l for l in layouts.values() if l["tp"] > 1 and not l.get("sp") and l["pp"] == 1), {})
    probes[f"sidecar_push_tp{sidecar['tp']}"] = lambda: sidecar_skip(sidecar) or probe_sidecar_push(ctx, push_layout,
                                                                                                   sidecar)
    return probes


def sidecar_skip(sidecar: dict) -> dict:
    if sidecar["why"]:
        return {"status": "skip", "reason": sidecar["why"], "summary": sidecar["why"]}
    if not vllm_installed():
        return {"status": "skip", "reason": "vLLM absent: pip install the vllm extra to check the sidecar push",
                "summary": "vLLM absent"}
    return {}


def selected(name: str, only: Optional[list]) -> bool:
    return only is None or any(name == w or name.startswith(w) for w in only)


def detail(result: dict) -> str:
    """One line for the table: the probe's summary, why it was skipped, its error, or its first numbers."""
    if result.get("summary"):
        return result["summary"]
    if result["status"] != "pass":
        return str(result.get("reason") or result.get("error", "")).splitlines()[0][:160]
    numbers = [f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float) and k != "seconds"]
    return ", ".join(numbers[:4])


def table(report: dict) -> str:
    head = (f"preflight: {report['world_size']} rank(s) on {report['device']} ({report['backend']}), torch "
            f"{report['torch']}; Transformer Engine {'present' if report['te'] else 'absent'}; vLLM "
            f"{'present' if report['vllm'] else 'absent'}")
    width = max([len(n) for n in report["probes"]] + [5])
    lines = [head, f"{'probe':<{width}}  status  seconds  detail"]
    for name, result in report["probes"].items():
        lines.append(f"{name:<{width}}  {result['status']:<6}  {result['seconds']:>7.1f}  {detail(result)}")
    failed = report["failed"]
    lines.append(f"{len(report['probes']) - len(failed)}/{len(report['probes'])} passed or skipped; failed: "
                 f"{', '.join(failed) or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu_check.json", help="JSON record of every probe (written by rank 0)")
    parser.add_argument("--only", default=None, help="comma-separated probe names or name prefixes (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense BF16 peak for MFU (H100/H200 SXM spec: 989)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints and runs go (default: a temp dir; "
                        "with several nodes, a directory every node sees)")
    parser.add_argument("--model", default=None, help="reuse this small checkpoint (the CPU reference run does)")
    parser.add_argument("--step-prompts", type=int, default=0, help=argparse.SUPPRESS)  # the CPU reference's
    parser.add_argument("--timeout-minutes", type=int, default=10,
                        help="the world group's collective timeout (a rank stuck in a probe ends the run after it)")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    known = (*PROBES, *MULTI_RANK_PROBES)
    unknown = [w for w in only or () if not any(k.startswith(w) or w.startswith(k) for k in known)]
    if unknown:
        print(f"gpu_check: unknown probes {unknown}; choose from {list(known)} (names or prefixes)", file=sys.stderr)
        return 2
    if args.device == "cpu":  # before torch initialises CUDA: the CPU layer (cpu_compat) applies only without it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron_opsd.demo.task import write_jsonl
    from megatron_opsd.parallel import ParallelConfig, destroy_distributed, init_distributed
    from megatron_opsd.parallel.control import broadcast_object

    init_distributed(ParallelConfig(timeout_minutes=args.timeout_minutes))
    rank, n = world()
    tmp = tempfile.TemporaryDirectory(prefix="opsd-gpu-check-") if rank == 0 and not args.workdir else None
    root = Path(args.workdir or broadcast_object(tmp.name if tmp else None))
    ctx = {"root": root, "cuda": cuda, "device_kind": "cuda" if cuda else "cpu", "peak_tflops": args.peak_tflops,
           "model": args.model, "opsd_data": root / "opsd.jsonl", "sft_data": root / "sft.jsonl",
           "step_prompts": args.step_prompts}
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        ctx["model"] = args.model or str(write_checkpoint(root))
        ctx["sidecar_model"] = str(write_checkpoint(root, None, "qwen3_small_sidecar"))
        write_jsonl(ctx["opsd_data"], [{"problem": f"What is {i} + {i}?", "solution": f"{2 * i}",
                                        "answer": str(2 * i)} for i in range(8)])
        write_jsonl(ctx["sft_data"], [{"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."}
                                      for i in range(max(8, 2 * n))])
    ctx.update(broadcast_object({k: ctx.get(k) for k in ("model", "sidecar_model")}))
    record, sidecar = {}, {"tp": 0, "why": "not selected"}
    try:
        sidecar = start_sidecar_early(ctx) if any(selected(f"sidecar_push_tp{k}", only) for k in (1, 2)) else sidecar
        probes = {name: (ParallelConfig(), fn) for name, fn in world_probes(ctx).items()}
        probes.update({name: (None, fn) for name, fn in multi_rank_probes(ctx, sidecar).items()})
        for name, (layout, fn) in probes.items():
            if not selected(name, only):
                continue
            if layout is not None:  # the previous probe may have left another layout
                init_distributed(layout)
            run_probe(name, fn, record)
            agree(name, record)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        steps = sorted(name for name in record if name.startswith("step_"))
        if cuda and steps and rank == 0:
            compare_with_cpu(record, _cpu_reference(root, ctx["model"], steps, step_prompts(ctx)))
    finally:
        if "process" in sidecar:
            sidecar["process"].stop()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "world_size": n,
              "backend": torch.distributed.get_backend(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "te": _te_present(), "vllm": vllm_installed(), "probes": record,
              "failed": sorted(name for name, result in record.items() if result["status"] == "fail")}
    failed = bool(broadcast_object(bool(report["failed"])))
    if rank == 0:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(table(report), flush=True)
        print(f"gpu_check: record in {args.out}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if tmp is not None:
        tmp.cleanup()
    destroy_distributed()
    return 1 if failed else 0


def _te_present() -> bool:
    from megatron_opsd.models.families import have_transformer_engine

    try:
        return bool(have_transformer_engine())
    except Exception:  # noqa: BLE001 - TE installed but unusable counts as absent here; the fp8 probes say why
        return False


# what torchrun tells its workers: the CPU reference is a world of its own and must not join this one
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def _cpu_reference(root: Path, model: str, names: list, prompts: int) -> dict:
    """The same step probes on the CPU, in a one-process subprocess (the CPU layer cannot share a process with
    CUDA), with the same number of prompts as this world's steps."""
    out = root / "cpu_reference.json"
    cmd = [sys.executable, __file__, "--device", "cpu", "--only", ",".join(names), "--out", str(out),
           "--workdir", str(root / "cpu"), "--model", model, "--step-prompts", str(prompts)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    subprocess.run(cmd, check=False, timeout=1800, env=env)
    return json.loads(out.read_text())["probes"] if out.exists() else {}


if __name__ == "__main__":
    sys.exit(main())
