"""Device check: proves the CUDA path on one GPU in a few minutes, with no vLLM and no network (docs/gpu.md).

    python tools/gpu_check.py --out gpu_check.json              # on a GPU machine (needs megatron-core 0.16.1)
    python tools/gpu_check.py --device cpu --out cpu_check.json # the same probes at small sizes (CI runs this)

Builds a small random Qwen3 with the real vocabulary (151,936) and runs each probe, recording it in the JSON
(status pass | fail | skip, its numbers, and the error of a failed probe; one failing probe never hides the
others; exit status 1 if any failed):

  logits_fp32 / logits_bf16   megatron's local spec vs transformers on the device (max |diff|, mean KL, top-1)
  step_opsd_<kind>            one OPSD step per loss kind through OPSDTrainer.train_step on fixed rollouts
  step_sft, step_grpo         one SFT step (SFTTrainer.train_step), one GRPO step (GRPOTrainer.train_step)
                              on CUDA each step's loss and grad norm are compared with the same step run on the
                              CPU (this script with --device cpu in a subprocess)
  teacher_per_microbatch      the PP=1 trainer's teacher forward per micro-batch gives the step's loss and grad
                              norm of teacher-forwards-first (training/opsd.py teacher_signal_source), for the
                              plain teacher, Purified OPSD (three teachers) and DemoPSD
  divergence                  vocab-parallel reverse KL forward+backward at 8,192 x 151,936 vs the naive
                              log-softmax of both: time, peak memory, achieved bytes/s vs a measured copy bandwidth
  opsd_throughput             OPSD step (teacher forward + student forward/backward + Adam) at a ~1B shape:
                              tokens/s and MFU (6N per trained token + 2N per teacher token over --peak-tflops)
  fp8                         with Transformer Engine: FP8 vs BF16 logits and one step, FP8 active in the student's
                              and the no-grad teacher's forward (skipped without TE)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REAL_VOCAB = 151_936
# probe name -> the loss config keys (coverage x divergence) it runs
LOSS_KINDS = {"reverse_kl": ["loss.divergence=reverse_kl"], "forward_kl": ["loss.divergence=forward_kl"],
              "jsd": ["loss.divergence=jsd"], "topk": ["loss.coverage=topk", "loss.top_k=16"],
              "k1": ["loss.coverage=sampled", "loss.divergence=k1", "loss.allow_k1_loss=true"],  # a logging estimator
              "k3": ["loss.coverage=sampled", "loss.divergence=k3"],
              "pg": ["loss.coverage=sampled", "loss.divergence=pg"]}
# Small model for parity and steps; the throughput shape is ~1.1 B parameters (hidden 2048, 16 layers).
SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=128)
ONE_B = dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=6144,
             tie_word_embeddings=True)
PROBES = ("logits_fp32", "logits_bf16", *(f"step_opsd_{k}" for k in LOSS_KINDS), "step_sft", "step_grpo",
          "teacher_per_microbatch", "divergence", "opsd_throughput", "fp8")
STEP_REL_TOL = 2e-2  # device step vs CPU step, both fp32 params (cuBLAS/TF32-level and reduction-order noise)


# ------------------------------------------------------------------------------------------ fixtures
class NoWeightPush:
    """Stands in for the sidecar client: these steps have no sidecar (vLLM is not part of the check)."""

    def push_weights(self, model_chunks, version):
        return None


def fixed_rollouts(trainer, teacher_contexts: list, seed: int = 0):
    """Two prompts x two rollouts of fixed token ids (student prompt, teacher prompts, responses, rewards)."""
    import torch

    from megatron_opsd.training.rollouts import StepRollouts

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(20, 400, (n,), generator=g).tolist()  # noqa: E731 - inside the tokenizer
    student = [ids(6), ids(5)]
    responses = [[ids(7), ids(4)], [ids(5), ids(6)]]
    teacher = {ctx: [[ids(9)] * 2, [ids(8)] * 2] for ctx in teacher_contexts}
    rewards = [[1.0, 0.0], [0.0, 1.0]]
    logprobs = [[[-1.0] * len(r) for r in group] for group in responses]
    return StepRollouts(student, responses, [[r > 0.5 for r in g] for g in rewards], rewards, logprobs, teacher)


def write_checkpoint(root: Path) -> Path:
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(root / "qwen3_small", family="qwen3", vocab_size=REAL_VOCAB, **SMALL)


def base_overrides(model: Path, run_dir: Path, train_path: Path) -> list:
    return [f"model.path={model}", f"data.train_path={train_path}", f"logging.dir={run_dir}",
            "logging.tensorboard=false", "logging.progress=false", "rollout.sidecar_urls=http://sidecar.invalid:1",
            "rollout.prompts_per_step=2", "rollout.n=2", "optim.lr=1e-3", "train.steps=1"]


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


def _opsd_trainer(ctx: dict, name: str, overrides: list):
    from megatron_opsd.config import load_config
    from megatron_opsd.data.contexts import teacher_context_names
    from megatron_opsd.training.trainer import OPSDTrainer

    cfg = load_config(None, base_overrides(ctx["model"], ctx["root"] / name, ctx["opsd_data"]) + overrides)
    trainer = OPSDTrainer(cfg)
    trainer.run.client = NoWeightPush()
    contexts = teacher_context_names(cfg.teacher)
    trainer.rollouts = lambda timer: fixed_rollouts(trainer, contexts)
    return trainer


def _step_numbers(trainer) -> dict:
    try:
        metrics = trainer.train_step()
    finally:
        if trainer.run.logger is not None:
            trainer.run.logger.close()
    return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}


def probe_opsd_step(ctx: dict, kind: str) -> dict:
    return _step_numbers(_opsd_trainer(ctx, f"opsd_{kind}", LOSS_KINDS[kind]))


def probe_sft_step(ctx: dict) -> dict:
    from megatron_opsd.training.sft import SFTTrainer, load_sft_config

    cfg = load_sft_config(None, [f"model.path={ctx['model']}", f"data.train_path={ctx['sft_data']}",
                                 f"logging.dir={ctx['root'] / 'sft'}", "logging.tensorboard=false",
                                 "logging.progress=false", "data.global_batch_size=2", "data.shuffle=false",
                                 "optim.lr=1e-3", "train.steps=1"])
    return _step_numbers(SFTTrainer(cfg))


def probe_grpo_step(ctx: dict) -> dict:
    from megatron_opsd.training.grpo import load_rl_config
    from megatron_opsd.training.rl_trainer import GRPOTrainer

    cfg = load_rl_config(None, base_overrides(ctx["model"], ctx["root"] / "grpo", ctx["opsd_data"])
                         + ["rl.recompute_old_logprobs=true"])
    trainer = GRPOTrainer(cfg)
    trainer.run.client = NoWeightPush()
    trainer.rollouts = lambda timer: fixed_rollouts(trainer, [])
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
    from megatron_opsd.training import opsd
    from megatron_opsd.training import trainer as opsd_trainer  # opsd_step's module holds teacher_signal_source

    numbers = {}
    for mode in ("microbatch", "step"):
        trainer = _opsd_trainer(ctx, f"teacher_{target}_{mode}", overrides)
        if mode == "step":
            original = opsd_trainer.teacher_signal_source

            def step_first(model_for, teacher_mbs, student_mbs, *, loss, real_vocab_size, teacher_scope):
                rows = {}
                for c, mbs in teacher_mbs.items():
                    with teacher_scope(c):
                        rows[c] = opsd.collect_teacher_rows(model_for(c), mbs)
                return opsd.teacher_signals(rows, student_mbs, loss=loss, real_vocab_size=real_vocab_size)

            opsd_trainer.teacher_signal_source = step_first
            try:
                numbers[mode] = _step_numbers(trainer)
            finally:
                opsd_trainer.teacher_signal_source = original
        else:  # at PP=1 the trainer's source is per micro-batch (a callable), not a list
            assert callable(opsd.teacher_signal_source(trainer.teacher_model, {}, [], loss=None, real_vocab_size=0))
            numbers[mode] = _step_numbers(trainer)
    a, b = numbers["microbatch"], numbers["step"]
    ok = all(math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7) for k in a)
    return {**{f"{k}_{m}": v for m, n in numbers.items() for k, v in n.items()}, "status": "pass" if ok else "fail"}


def probe_divergence(ctx: dict, tokens: int) -> dict:
    """Chunked vocab-parallel reverse KL vs the naive full log-softmax, forward + backward, one rank."""
    import torch

    from megatron_opsd.losses import vocab_parallel_divergence
    from megatron_opsd.parallel.device import current_device

    device, cuda = current_device(), ctx["cuda"]
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(tokens, REAL_VOCAB, device=device, dtype=dtype, generator=g).requires_grad_(True)
    teacher = torch.randn(tokens, REAL_VOCAB, device=device, dtype=dtype, generator=g)

    def ours():
        loss, _ = vocab_parallel_divergence(student, teacher, kind="reverse_kl", reduction="sum",
                                            token_weights=torch.full((tokens,), 1.0 / tokens, device=device))
        loss.backward()
        return loss

    def naive():
        logp, logq = torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1)
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
        loss.backward()
        return loss

    out = {"tokens": tokens, "vocab": REAL_VOCAB, "dtype": str(dtype).replace("torch.", "")}
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
    # The least traffic any implementation needs: read student and teacher once, write the gradient once.
    least = 3 * tokens * REAL_VOCAB * student.element_size()
    out["least_bytes"] = least
    out["achieved_bytes_per_s"] = least / (out["ours_ms"] / 1e3)
    if cuda:
        out["copy_bytes_per_s"] = _copy_bandwidth(device)
        out["fraction_of_copy_bandwidth"] = out["achieved_bytes_per_s"] / out["copy_bytes_per_s"]
    ok = math.isclose(out["ours_loss"], out["naive_loss"], rel_tol=1e-2) and out["grad_max_abs_diff"] < 1e-3
    out["status"] = "pass" if ok else "fail"
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


def _copy_bandwidth(device) -> float:
    """Device-to-device copy bytes/s (read + write) of a 2 GiB buffer: the bound a memory-bound kernel meets."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
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
    from megatron_opsd.training.opsd import (build_microbatches, student_forward_backward,
                                             teacher_signal_source, token_weights)

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
        student = build_microbatches(prompts, responses, weights, micro_batch_size=1, pad_id=0)
        teacher = {"teacher": build_microbatches(prompts, responses, weights, micro_batch_size=1, pad_id=0)}
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
        return {"status": "skip", "reason": "Transformer Engine is not usable here (needs CUDA and TE)"}
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.parallel.device import to_device
    from megatron_opsd.training.opsd import _teacher_rows

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
    _teacher_rows(models["fp8"][0], batch)  # the trainer's no-grad teacher forward
    out = compare_logits(logits["fp8"].float(), logits["bf16"].float(), max_abs=float("inf"))
    out.update(fp8_active_student=student_active, fp8_active_teacher=bool(seen and all(seen)))
    out["status"] = "pass" if out["fp8_active_student"] and out["fp8_active_teacher"] else "fail"
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
    shown = {k: v for k, v in result.items() if k not in ("traceback",)}
    print(f"[{result['status']:>4}] {name}: {json.dumps(shown, default=str)}", flush=True)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu_check.json", help="JSON record of every probe")
    parser.add_argument("--only", default=None, help="comma-separated probe names (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense BF16 peak for MFU (H100/H200 SXM spec: 989)")
    parser.add_argument("--workdir", default=None, help="where the checkpoint and runs go (default: a temp dir)")
    parser.add_argument("--model", default=None, help="reuse this small checkpoint (the CPU reference run does)")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else set(PROBES)
    if wanted - set(PROBES):
        print(f"gpu_check: unknown probes {sorted(wanted - set(PROBES))}; choose from {list(PROBES)}", file=sys.stderr)
        return 2
    if args.device == "cpu":  # before torch initialises CUDA: the CPU layer (cpu_compat) applies only without it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from megatron_opsd.demo.task import write_jsonl
    from megatron_opsd.parallel import ParallelConfig, init_distributed

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="opsd-gpu-check-") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        ctx = {"root": root, "cuda": cuda, "peak_tflops": args.peak_tflops, "model": args.model or str(write_checkpoint(root)),
               "opsd_data": root / "opsd.jsonl", "sft_data": root / "sft.jsonl"}
        write_jsonl(ctx["opsd_data"], [{"problem": f"What is {i} + {i}?", "solution": f"{2 * i}", "answer": str(2 * i)}
                                       for i in range(4)])
        write_jsonl(ctx["sft_data"], [{"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."}
                                      for i in range(4)])
        init_distributed(ParallelConfig())
        probes = {"logits_fp32": lambda: probe_logits(ctx, "float32"),
                  "logits_bf16": lambda: probe_logits(ctx, "bfloat16"),
                  **step_probes(ctx),
                  "teacher_per_microbatch": lambda: probe_teacher_per_microbatch(ctx),
                  "divergence": lambda: probe_divergence(ctx, 8192 if cuda else 128),
                  "opsd_throughput": (lambda: probe_opsd_throughput(ctx, ONE_B, 2048, 1536, 4)) if cuda
                  else (lambda: probe_opsd_throughput(ctx, SMALL, 128, 96, 2)),
                  "fp8": lambda: probe_fp8(ctx)}
        assert tuple(probes) == PROBES
        record = {}
        for name, fn in probes.items():
            if name in wanted:
                run_probe(name, fn, record)
        if cuda and any(n.startswith("step_") for n in record):
            cpu = _cpu_reference(root, ctx["model"], sorted(n for n in record if n.startswith("step_")))
            compare_with_cpu(record, cpu)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "probes": record,
              "failed": sorted(n for n, r in record.items() if r["status"] == "fail")}
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu_check: {len(record) - len(report['failed'])}/{len(record)} probes passed or skipped; "
          f"failed: {report['failed'] or 'none'}; record in {args.out}")
    return 1 if report["failed"] else 0


def _cpu_reference(root: Path, model: str, names: list) -> dict:
    """The same step probes on the CPU, in a subprocess (the CPU layer cannot share a process with CUDA)."""
    out = root / "cpu_reference.json"
    cmd = [sys.executable, __file__, "--device", "cpu", "--only", ",".join(names), "--out", str(out),
           "--workdir", str(root / "cpu"), "--model", model]
    subprocess.run(cmd, check=False, timeout=1800)
    return json.loads(out.read_text())["probes"] if out.exists() else {}


if __name__ == "__main__":
    sys.exit(main())
