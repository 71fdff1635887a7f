"""Benchmark against the peer users would pick for a small model: TRL's on-policy self-distillation trainer, on
the same tiny model, prompts, batch, rollout length and loss, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_peer.py --peer-python /work/trl-venv/bin/python \
        [--steps 12] [--model HF_DIR] [--json docs/results/bench_peer.json] [--markdown docs/benchmarks.md]

The peer runs in its own virtual environment (TRL is not a project dependency), e.g.
``python3.11 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 transformers==5.19.0 trl``.

Which TRL trainer: the demo's OPSDC stage is a same-weights self-teacher shown a privileged context (the concise
instruction), reverse KL over the full vocabulary, 1/|y| per rollout. TRL's GKD/GOLD trainers forward the
teacher on the student's own input (a separate teacher model, no privileged context), so they cannot compute
this loss; TRL's ``SDFTTrainer`` (``trl.experimental.sdft``, the same GKD-style on-policy loop with a teacher
prompt built from ``privileged_context``) can: ``distillation_mode="full_logits"``, ``distillation_alpha=1``
(KL(student || teacher)), ``teacher_model_kind="base"`` (the frozen initial model = our ``teacher.weights:
frozen``), no importance clip, per-sequence mean then batch mean (= our ``loss.reduction: sequence_mean``).

Both sides train ``--steps`` steps of 16 prompts x 1 rollout of at most 192 tokens at temperature 1 (the demo's
``opsdc.yaml``), Adam lr 1e-4, grad clip 1.0, fp32, from the same HF model, on the same prompts in the same order
(the peer gets exactly the prompts our trainer drew). Generation: ours on the vLLM sidecar, the peer's with HF
``generate`` in the training process (TRL's vLLM path needs a vLLM build in the peer venv; not tried on CPU). Each
side runs in its own subprocess; its step time is the median from step 3 on, its peak memory the largest summed
RSS of its process tree (ours: trainer + sidecar processes), sampled every 0.1 s.

Loss parity: the sampled rollouts cannot be the same (vLLM and HF ``generate`` draw differently), so the peer
recomputes its loss (``SDFTTrainer.compute_loss``, its own prompt building and tokenisation) on our step 0's
prompts and response tokens with the initial weights, and that must equal our step-0 loss within ``PARITY_RTOL``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BEGIN, END = "<!-- bench_peer:begin -->", "<!-- bench_peer:end -->"
# TRL's SDFT teacher prompt (``SDFTConfig.teacher_prompt_template``) that rebuilds our teacher.context=concise user
# turn (the instruction, a blank line, the student's user turn) from the student prompt
TEACHER_TEMPLATE = "{privileged_context}\n\n{prompt}"
CONFIG = "megatron_opsd/demo/configs/opsdc.yaml"
# fp32 on both sides; megatron's fused softmax / vocab-parallel KL against HF's eager attention and torch kl_div
PARITY_RTOL = 1e-4
WARMUP_STEPS = 2  # not counted in the step time median


# ------------------------------------------------------------------------------------------- measurement
def peak_tree_rss(proc: subprocess.Popen, every_s: float = 0.1) -> tuple:
    """A thread sampling the summed RSS of ``proc``'s descendants (``proc`` is the lifecycle guard: not counted)
    until it exits: ({"peak_rss_mb": ...}, the thread)."""
    import psutil

    out = {"peak_rss_mb": 0.0}
    root = psutil.Process(proc.pid)

    def sample():
        while proc.poll() is None:
            rss = 0
            try:
                for p in root.children(recursive=True):
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            out["peak_rss_mb"] = max(out["peak_rss_mb"], rss / 2**20)
            time.sleep(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return out, thread


def run_side(cmd: list, log: Path, timeout_s: int) -> dict:
    """Run one side's subprocess under a lifecycle guard (its process group dies with us, and on a timeout); its
    peak tree RSS."""
    from megatron_opsd.lifecycle import start_process, stop_process

    with open(log, "w") as f:
        proc = start_process(cmd, stdout=f, stderr=subprocess.STDOUT)
        mem, thread = peak_tree_rss(proc)
        try:
            rc = proc.wait(timeout=timeout_s)
        finally:
            stop_process(proc)
            thread.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:3]))} ... failed (exit {rc}); see {log}:\n"
                         + log.read_text()[-3000:])
    return mem


def median_step(times: list) -> float:
    return statistics.median(times[WARMUP_STEPS:])


# ------------------------------------------------------------------------------------------- the prompts
def prompt_texts(examples: list, cfg) -> list[dict]:
    """Our student and teacher user turns for ``examples`` (what the peer is given and must reproduce)."""
    from megatron_opsd.data.contexts import student_messages, teacher_messages

    return [{"student": student_messages(ex, cfg.data)[-1]["content"],
             "teacher": teacher_messages(ex, cfg.data, cfg.teacher)[-1]["content"]} for ex in examples]


def peer_rows(steps: list, instruction: str) -> list[dict]:
    """TRL's dataset rows (conversational prompt + privileged context) for our per-step ``prompt_texts``, in
    order; refuses a teacher turn that TEACHER_TEMPLATE does not rebuild exactly."""
    rows = []
    for step in steps:
        for p in step:
            if TEACHER_TEMPLATE.format(prompt=p["student"], privileged_context=instruction) != p["teacher"]:
                raise ValueError(f"the peer's teacher prompt would differ from ours: {p['teacher']!r}")
            rows.append({"prompt": [{"role": "user", "content": p["student"]}], "privileged_context": instruction})
    return rows


# ------------------------------------------------------------------------------------------- our side
def ours_worker(cfg) -> dict:
    """Our OPSD trainer for ``cfg.train.steps`` steps: per-step seconds and loss, and step 0's prompts and
    response tokens (what the peer recomputes its loss on)."""
    import resource

    from megatron_opsd.training.loop import train_one_step
    from megatron_opsd.training.opsd.trainer import OPSDTrainer

    trainer = OPSDTrainer(cfg)
    run = trainer.run
    drawn, first = [], {}
    take = trainer.queue.take

    def recording_take(step):
        batch = take(step)
        drawn.append(prompt_texts(batch.examples, cfg))
        return batch

    trainer.queue.take = recording_take
    rollouts = trainer.rollouts

    def recording_rollouts(timer):
        r = rollouts(timer)
        if not first:
            first.update(student_prompts=r.student_prompts, responses=[g[0] for g in r.responses],
                         teacher_prompts=[g[0] for g in r.teachers[cfg.teacher.context]])
        return r

    trainer.rollouts = recording_rollouts
    steps = []
    run.connect_sidecar()
    try:
        while run.step < cfg.train.steps:
            metrics = train_one_step(run, trainer)
            steps.append({"step_s": metrics["time/step"], "loss": float(metrics["loss"]),
                          "response_tokens": float(metrics.get("rollout/mean_length", 0.0)),
                          **{k: float(v) for k, v in metrics.items() if k.startswith("time/")}})
    finally:
        run.close()
    return {"steps": steps, "prompts": drawn, "step0": first,
            "trainer_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_ours(model: str, train_path: str, steps: int, out: Path, logs: str) -> None:
    from megatron_opsd.config import load_config
    from megatron_opsd.parallel.launch import run_distributed

    overrides = [f"model.path={model}", f"data.train_path={train_path}", "data.eval_path=null", "train.eval_every=0",
                 "checkpoint.save_every=0", f"logging.dir={logs}", "logging.progress=false", f"train.steps={steps}",
                 "rollout.max_staleness=0", "rollout.filter=all"]
    cfg = load_config(CONFIG, overrides)
    result = run_distributed(ours_worker, 1, cfg.parallel, cfg)[0]
    result["settings"] = {"prompts_per_step": cfg.rollout.prompts_per_step, "n": cfg.rollout.n,
                          "max_tokens": cfg.rollout.max_tokens, "temperature": cfg.rollout.temperature,
                          "lr": cfg.optim.lr, "clip_grad": cfg.optim.clip_grad,
                          "micro_batch_size": cfg.optim.micro_batch_size, "loss": cfg.loss.divergence,
                          "reduction": cfg.loss.reduction, "concise_instruction": cfg.teacher.concise_instruction}
    out.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- the peer (TRL)
def run_peer(model: str, ours_json: Path, out: Path, workdir: str) -> None:
    """In the peer venv: TRL's SDFTTrainer with our settings on the prompts our trainer drew; first the loss on
    our step-0 tokens, then the timed training."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    from trl.trainer.utils import pad

    ours = json.loads(ours_json.read_text())
    s = ours["settings"]
    rows = peer_rows(ours["prompts"], s["concise_instruction"])
    args = SDFTConfig(
        output_dir=workdir, per_device_train_batch_size=s["prompts_per_step"], gradient_accumulation_steps=1,
        num_generations=s["n"], max_completion_length=s["max_tokens"], temperature=s["temperature"], top_p=1.0,
        top_k=0, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=s["clip_grad"], max_steps=len(ours["prompts"]), distillation_mode="full_logits",
        distillation_alpha=1.0, teacher_model_kind="base", distillation_is_clip=None,
        teacher_prompt_template=TEACHER_TEMPLATE,
        shuffle_dataset=False, use_vllm=False, use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    steps, t0 = [], [0.0]

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t0[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append({"step_s": time.perf_counter() - t0[0]})

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])
                steps[-1]["response_tokens"] = float(logs.get("completions/mean_length", "nan"))

    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[StepClock()])

    # loss parity: the peer's loss on our step 0's prompts and responses, initial weights
    first = ours["step0"]
    prompts = [r["prompt"] for r in rows[:len(first["responses"])]]
    prompt_ids = trainer._tokenize_prompts(prompts)
    same_prompts = [list(a) == list(b) for a, b in zip(prompt_ids, first["student_prompts"])]
    completion = [torch.tensor(r) for r in first["responses"]]
    batch = {"prompt_ids": pad([torch.tensor(p) for p in prompt_ids], padding_value=tokenizer.pad_token_id,
                               padding_side="left"),
             "prompt_mask": pad([torch.ones(len(p), dtype=torch.long) for p in prompt_ids], padding_value=0,
                                padding_side="left"),
             "completion_ids": pad(completion, padding_value=tokenizer.pad_token_id, padding_side="right"),
             "completion_mask": pad([torch.ones(len(c), dtype=torch.long) for c in completion], padding_value=0,
                                    padding_side="right")}
    batch.update(trainer.teacher_context_builder.build(prompts, [s["concise_instruction"]] * len(prompts),
                                                       batch["completion_ids"], batch["completion_mask"]))
    teacher_ids = [row[m.bool()].tolist() for row, m in zip(batch["teacher_input_ids"],
                                                             batch["teacher_attention_mask"])]
    same_teacher = [t[:len(t) - len(c)] == list(o) for t, c, o in zip(teacher_ids, first["responses"],
                                                                     first["teacher_prompts"])]
    trainer.model.eval()
    with torch.no_grad():
        loss0 = float(trainer.compute_loss(trainer.model, batch))
    trainer.model.train()

    trainer.train()
    out.write_text(json.dumps({"steps": steps, "loss_on_our_step0": loss0,
                               "student_prompts_match": all(same_prompts), "teacher_prompts_match": all(same_teacher),
                               "versions": {"trl": __import__("trl").__version__,
                                            "transformers": __import__("transformers").__version__,
                                            "torch": torch.__version__},
                               "torch_threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------- report
def summarise(ours: dict, peer: dict, mem: dict) -> dict:
    o, p = median_step([s["step_s"] for s in ours["steps"]]), median_step([s["step_s"] for s in peer["steps"]])
    loss0 = ours["steps"][0]["loss"]
    return {"ours_step_s": o, "peer_step_s": p, "speedup": p / o, "ours_peak_rss_mb": mem["ours"],
            "ours_trainer_rss_mb": ours["trainer_max_rss_mb"], "peer_peak_rss_mb": mem["peer"],
            "ours_loss_step0": loss0, "peer_loss_on_our_step0": peer["loss_on_our_step0"],
            "loss_rel_diff": abs(peer["loss_on_our_step0"] - loss0) / abs(loss0),
            "prompts_match": peer["student_prompts_match"] and peer["teacher_prompts_match"],
            "ours_response_tokens": statistics.mean(s["response_tokens"] for s in ours["steps"]),
            "peer_response_tokens": statistics.mean(s.get("response_tokens", float("nan")) for s in peer["steps"]),
            "ours_phases": {k: median_step([s.get(k, 0.0) for s in ours["steps"]])
                            for k in ours["steps"][0] if k.startswith("time/")},
            "ours_losses": [s["loss"] for s in ours["steps"]], "peer_losses": [s.get("loss") for s in peer["steps"]],
            "steps": len(ours["steps"]), "versions": peer["versions"], "peer_threads": peer["torch_threads"]}


def to_markdown(r: dict, command: str, model: str) -> str:
    ph = r["ours_phases"]
    return "\n".join([
        BEGIN, "## Against the peer: TRL's on-policy self-distillation (`tools/bench_peer.py`)", "",
        f"`{command}` on {model}: the demo's OPSDC stage (16 prompts x 1 rollout, at most 192 tokens, T = 1, reverse "
        "KL over the full vocabulary, 1/|y| per rollout, frozen concise-instruction self-teacher, Adam lr 1e-4, fp32) "
        f"against TRL {r['versions']['trl']}'s `SDFTTrainer` with the same settings (`full_logits`, alpha 1, "
        "teacher `base`), same prompts in the same order, each side in its own process. Ours generates on the vLLM "
        "sidecar (the trainer at one torch thread per rank); TRL with HF `generate` in-process at torch's default "
        f"{r['peer_threads']} threads (its vLLM path needs a vLLM build in its venv: not tried on CPU). Step time: "
        f"median of steps {WARMUP_STEPS + 1}-{r['steps']}; memory: peak summed RSS of the side's "
        "process tree. CPU, 2 cores shared with other jobs: only the ratios mean anything.", "",
        "| | step s | steps/s | mean response tokens | peak RSS MiB | loss at step 0 |", "|---|---|---|---|---|---|",
        f"| megatron-opsd (trainer + vLLM sidecar) | {r['ours_step_s']:.2f} | {1 / r['ours_step_s']:.2f} | "
        f"{r['ours_response_tokens']:.0f} | {r['ours_peak_rss_mb']:.0f} (trainer alone "
        f"{r['ours_trainer_rss_mb']:.0f}) | {r['ours_loss_step0']:.6f} |",
        f"| TRL SDFTTrainer (HF generate) | {r['peer_step_s']:.2f} | {1 / r['peer_step_s']:.2f} | "
        f"{r['peer_response_tokens']:.0f} | {r['peer_peak_rss_mb']:.0f} | {r['peer_loss_on_our_step0']:.6f} (on our "
        "step-0 tokens) |",
        f"| ours vs TRL | **{r['speedup']:.2f}x** | | | {r['ours_peak_rss_mb'] / r['peer_peak_rss_mb']:.2f}x | "
        f"rel. diff {r['loss_rel_diff']:.1e} |", "",
        "Our step's phases (median s): " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in ph.items() if v >= 0.005) + ".",
        "", END]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", type=Path, help="python of the venv with TRL installed")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default=None, help="HF model dir (default: the demo's random initial model)")
    parser.add_argument("--timeout", type=int, default=1500, help="seconds per side")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--markdown", type=Path, default=None, help="replace this tool's section in FILE")
    parser.add_argument("--side", choices=("ours", "peer"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ours-json", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "ours":
        run_ours(args.model, args.train_path, args.steps, args.out, args.workdir)
        return 0
    if args.side == "peer":
        run_peer(args.model, args.ours_json, args.out, args.workdir)
        return 0
    if args.peer_python is None or not args.peer_python.is_file():
        parser.error("--peer-python: the python of a venv with TRL installed (see the module docstring)")

    from bench_sidecar import command_line, write_section

    from megatron_opsd.demo.prepare import prepare
    from megatron_opsd.demo.recipe import DemoRecipe

    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        tmp = Path(tmp)
        inputs = prepare(tmp / "demo", DemoRecipe(), seed=0)
        model = args.model or str(inputs.init_model)
        mem = {}
        mem["ours"] = run_side([sys.executable, me, "--side", "ours", "--model", model, "--train-path",
                                str(inputs.train), "--steps", str(args.steps), "--out", str(tmp / "ours.json"),
                                "--workdir", str(tmp / "ours")], tmp / "ours.log", args.timeout)["peak_rss_mb"]
        os.environ["HF_HUB_OFFLINE"] = "1"
        mem["peer"] = run_side([str(args.peer_python), me, "--side", "peer", "--model", model, "--ours-json",
                                str(tmp / "ours.json"), "--out", str(tmp / "peer.json"), "--workdir",
                                str(tmp / "peer")], tmp / "peer.log", args.timeout)["peak_rss_mb"]
        ours, peer = json.loads((tmp / "ours.json").read_text()), json.loads((tmp / "peer.json").read_text())
    result = summarise(ours, peer, mem)
    print(json.dumps(result, indent=1))
    name = "the demo's random initial tiny Qwen3" if args.model is None else f"`{args.model}`"
    section = to_markdown(result, command_line(), name)
    print(section)
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": result, "ours": {k: v for k, v in ours.items() if k != "step0"},
                                         "peer": peer}, indent=1))
    if args.markdown is not None:
        write_section(args.markdown, section, BEGIN, END)
    ok = result["prompts_match"] and result["loss_rel_diff"] <= PARITY_RTOL
    print(f"loss parity at step 0: {'OK' if ok else 'FAILED'} (relative difference {result['loss_rel_diff']:.2e}, "
          f"tolerance {PARITY_RTOL:g}; prompts identical: {result['prompts_match']})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
