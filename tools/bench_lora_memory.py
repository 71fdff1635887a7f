"""Trainer memory with and without LoRA on the demo model: the bytes the real OPSD trainer holds after one step
(student weights, gradient buffers, optimizer state, teacher weights) next to ``megatron-opsd plan``'s prediction
for the same config.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_lora_memory.py [--rank 16 --alpha 32] \
        [--run-dir runs/demo] [--markdown docs/benchmarks.md]

Each variant builds ``OPSDTrainer`` from the demo's OPSDC config (``demo/configs/opsdc.yaml``: frozen teacher,
fp32 weights, distributed optimizer) in its own process (TP=1) and runs one real ``train_step`` (teacher forward,
student forward/backward, Adam step: Adam's state exists only after a step); only the rollouts are a fixed batch
(random response tokens of ``rollout.max_tokens``) instead of the sidecar's, and nothing is pushed. The bytes are
those of the distinct tensor storages reachable from the trainer's student chunks, DDP buffers, optimizer and
teacher, each counted once, in that order (megatron's DDP keeps parameters and gradients in flat buffers, so a
parameter's bytes are its buffer's share). With ``--run-dir`` the demo's model and prompts there are used;
otherwise the demo's inputs are written to a temporary folder (its random init model: memory does not depend on
the weights' values).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BEGIN, END = "<!-- bench_lora_memory:begin -->", "<!-- bench_lora_memory:end -->"
CATEGORIES = ("student weights", "student grads", "optimizer state", "teacher weights")


def _storages(tensors) -> dict:
    """data_ptr -> bytes of the distinct storages behind ``tensors``."""
    out = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def trainer_tensors(trainer) -> dict:
    """Category -> the tensors the trainer holds for it (the categories of ``megatron-opsd plan``)."""
    from megatron_opsd.models.lora import adapters_of

    run = trainer.run
    teacher_sets = [t for a in adapters_of(run.student) for t in (a.teacher_A, a.teacher_B) if t is not None]
    teacher_ids = {id(t) for t in teacher_sets}
    student = [p for chunk in run.student for p in chunk.parameters() if id(p) not in teacher_ids]
    trained = [p for p in student if p.requires_grad]
    grads = [b.grad_data for chunk in run.ddp for b in (*chunk.buffers, *chunk.expert_parallel_buffers)]
    grads += [getattr(p, "main_grad", None) for p in trained] + [p.grad for p in trained]
    optimizer_tensors = []
    for opt in getattr(run.optimizer, "chained_optimizers", [run.optimizer]):
        for group in opt.optimizer.param_groups:  # fp32 master shards (views when the weights are fp32)
            optimizer_tensors += list(group["params"])
        optimizer_tensors += [v for state in opt.optimizer.state.values() for v in state.values()
                              if hasattr(v, "untyped_storage")]
    replicas = [p for chunks in (trainer.teacher, trainer.initial) if chunks for c in chunks for p in c.parameters()]
    return {"student weights": student, "student grads": grads, "optimizer state": optimizer_tensors,
            "teacher weights": replicas + teacher_sets}


def held_bytes(trainer) -> dict:
    """Bytes per category, each storage counted once (in CATEGORIES order)."""
    seen, out = set(), {}
    for category, tensors in trainer_tensors(trainer).items():
        storages = {k: v for k, v in _storages(tensors).items() if k not in seen}
        seen |= set(storages)
        out[category] = sum(storages.values())
    return out


def fixed_rollouts(trainer):
    """One step's worth of rollouts without a sidecar: the sampler's prompts, random responses of max_tokens."""
    import torch

    from megatron_opsd.data.sequences import student_prompt_ids
    from megatron_opsd.training.rollouts import StepRollouts

    cfg, examples, tokenizer = trainer.cfg, trainer.sampler.next_batch(), trainer.run.tokenizer
    gen = torch.Generator().manual_seed(0)
    student = [student_prompt_ids(tokenizer, ex, cfg.data, cfg.model.enable_thinking) for ex in examples]
    responses = [[torch.randint(10, trainer.run.real_vocab, (cfg.rollout.max_tokens,), generator=gen).tolist()
                  for _ in range(cfg.rollout.n)] for _ in examples]
    correct = [[True] * cfg.rollout.n for _ in examples]
    texts = [[tokenizer.decode(r) for r in g] for g in responses]
    return StepRollouts(student, responses, correct, teachers=trainer.teacher_prompts(examples, texts, correct))


def measure(config_path: str, overrides: list) -> dict:
    """In a spawned rank: the trainer's held bytes after one step, and the planner's for the same config."""
    from megatron_opsd.config import load_config
    from megatron_opsd.planning.cli import settings_from_config
    from megatron_opsd.planning.memory import ModelShape, estimate_memory
    from megatron_opsd.training.loop import PhaseTimer
    from megatron_opsd.training.opsd.trainer import OPSDTrainer

    cfg = load_config(config_path, overrides)
    trainer = OPSDTrainer(cfg)
    rollouts = fixed_rollouts(trainer)
    trainer.rollouts = lambda timer: rollouts  # the sidecar's part of the step
    metrics = trainer.train_step(PhaseTimer(trainer.phases))  # the method's step alone: no weight push, no evaluation
    measured = held_bytes(trainer)
    settings, _ = settings_from_config(cfg, data_parallel=1, implementation="local")
    planned = estimate_memory(ModelShape.from_hf_config(cfg.model.path), settings).stages[0].components
    trainable = sum(p.numel() for c in trainer.run.student for p in c.parameters() if p.requires_grad)
    return {"measured": measured, "planned": {k: planned[k] for k in CATEGORIES}, "loss": metrics["loss"],
            "trainable_params": trainable}


def demo_inputs(run_dir, tmp: Path) -> tuple:
    """(model dir, train prompts) of a demo run, or of demo inputs freshly written under ``tmp``."""
    from megatron_opsd.demo.prepare import DemoInputs, prepare
    from megatron_opsd.demo.recipe import FULL

    if run_dir:
        inputs = DemoInputs.under(Path(run_dir))
        model = Path(run_dir) / "stages" / "sft" / "hf"
        return (model if model.is_dir() else inputs.init_model), inputs.train
    inputs = prepare(tmp / "demo", FULL, seed=0)
    return inputs.init_model, inputs.train


def to_markdown(results: dict, command: str) -> str:
    mib = 2 ** 20
    lines = [BEGIN, "### Trainer memory, demo model, measured vs planned (`tools/bench_lora_memory.py`)", "",
             f"`{command}`: the real OPSD trainer after one step (TP=1, fp32, distributed optimizer, frozen teacher; "
             "demo config `megatron_opsd/demo/configs/opsdc.yaml`), MiB held per category (distinct tensor "
             "storages) / `megatron-opsd plan`'s prediction for the same config:", "",
             "| variant | trainable params | " + " | ".join(CATEGORIES) + " | total |",
             "|---|---|" + "---|" * (len(CATEGORIES) + 1)]
    for name, r in results.items():
        cells = [f"{r['measured'][c] / mib:.2f} / {r['planned'][c] / mib:.2f}" for c in CATEGORIES]
        total = f"{sum(r['measured'].values()) / mib:.2f} / {sum(r['planned'].values()) / mib:.2f}"
        lines.append(f"| {name} | {r['trainable_params']:,} | " + " | ".join(cells) + f" | {total} |")
    return "\n".join(lines + [END]) + "\n"


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_sidecar import add_output_arguments, command_line, publish

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=None, help="a `megatron-opsd demo` run directory (default: fresh inputs)")
    parser.add_argument("--rank", type=int, default=16, help="model.lora.rank of the LoRA variant")
    parser.add_argument("--alpha", type=float, default=32.0, help="model.lora.alpha of the LoRA variant")
    add_output_arguments(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from megatron_opsd.demo.recipe import stage_config_dir
    from megatron_opsd.parallel.launch import run_distributed

    with tempfile.TemporaryDirectory(prefix="opsd-lora-mem-") as tmp:
        model, train = demo_inputs(args.run_dir, Path(tmp))
        common = [f"model.path={model}", f"data.train_path={train}", "data.eval_path=null",
                  "train.eval_every=0", "logging.progress=false"]
        variants = {"full fine-tuning": [], f"LoRA r={args.rank}": [
            f"model.lora.rank={args.rank}", f"model.lora.alpha={args.alpha}"]}
        results = {}
        for i, (name, extra) in enumerate(variants.items()):
            overrides = common + [f"logging.dir={tmp}/v{i}"] + extra
            results[name] = run_distributed(measure, 1, None, str(stage_config_dir() / "opsdc.yaml"), overrides)[0]
            print(name, json.dumps(results[name], indent=1), flush=True)
    publish(to_markdown(results, command_line()), results, args.json, args.markdown, BEGIN, END)
    return 0


if __name__ == "__main__":
    from megatron_opsd.lifecycle import install_shutdown_handlers

    install_shutdown_handlers()
    raise SystemExit(main())
