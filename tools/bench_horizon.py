"""Benchmark truncated OPD: step time with ``rollout.horizon: H`` vs full OPD on the demo task, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_horizon.py [--horizon 16 --pairs 6] [--model HF_DIR] \
        [--markdown docs/benchmarks.md]

One real OPSD trainer (the demo's OPSDC stage config, ``megatron_opsd/demo/configs/opsdc.yaml``, TP=1) with one
real vLLM sidecar runs steps that alternate between full OPD (horizon null) and truncated OPD (horizon H), so both see the
same machine load; the first pair is a warm-up and is not counted. With ``rollout.filter: all`` the trainer
generates only H tokens and both forwards end at prompt + H (``OPSDTrainer._generation_limit``). The model is
the demo's random initial tiny Qwen3 (``megatron_opsd.demo.prepare``), which rarely stops before
``rollout.max_tokens`` = 192, or ``--model`` (e.g. the demo's SFT model, whose responses are shorter). With
``--markdown FILE`` the results replace this tool's section in FILE.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

BEGIN, END = "<!-- bench_horizon:begin -->", "<!-- bench_horizon:end -->"
PHASES = ("time/rollout", "time/teacher", "time/student", "time/sync")


def bench_worker(cfg, horizon: int, pairs: int) -> dict:
    """Alternating full / horizon steps on one trainer; per setting, the per-step times of the counted pairs."""
    from megatron_opsd.training.loop import train_one_step
    from megatron_opsd.training.opsd.trainer import OPSDTrainer

    trainer = OPSDTrainer(cfg)
    trainer.run.connect_sidecar()
    runs = {"full": [], f"horizon {horizon}": []}
    try:
        settings = [("full", None), (f"horizon {horizon}", horizon)]
        for pair in range(pairs + 1):
            for name, h in settings[::-1] if pair % 2 else settings:  # alternate which setting goes first
                trainer.cfg.rollout.horizon = h
                metrics = train_one_step(trainer.run, trainer)
                if pair > 0:  # the first pair warms up (vLLM graph capture, allocator)
                    runs[name].append({k: metrics[k] for k in ("time/step", *PHASES, "tokens")})
    finally:
        trainer.run.close()
    return runs


def summarise(runs: dict) -> dict:
    return {name: {k: statistics.median(step[k] for step in steps) for k in steps[0]} for name, steps in runs.items()}


def to_markdown(summary: dict, args: argparse.Namespace, model: str) -> str:
    (full_name, full), (short_name, short) = sorted(summary.items(), key=lambda kv: kv[0] != "full")
    rows = [f"| {name} | {s['tokens']:.0f} | " + " | ".join(f"{s[k]:.2f}" for k in ("time/step", *PHASES)) + " |"
            for name, s in ((full_name, full), (short_name, short))]
    ratio = " | ".join(f"**{full[k] / max(short[k], 1e-9):.1f}x**" for k in ("time/step", *PHASES))
    command = "python tools/bench_horizon.py" + (f" --horizon {args.horizon}" if args.horizon != 16 else "") + \
        (f" --pairs {args.pairs}" if args.pairs != 6 else "")
    return "\n".join([
        BEGIN, "## Truncated OPD step time (`tools/bench_horizon.py`)", "",
        f"`{command}`: the demo's OPSDC stage (TP=1, 16 prompts x 1 rollout, `rollout.max_tokens` 192) on {model},",
        f"one trainer and one vLLM sidecar, steps alternating full / horizon {args.horizon}; medians of "
        f"{args.pairs} steps each after a warm-up pair, seconds. CPU, 2 cores shared with several other jobs: only the "
        "ratios are meaningful. `tokens` = distilled tokens per step. At PP=1 the teacher's forward runs inside the "
        "student's loss, one micro-batch at a time (`training/opsd/step.py` `teacher_signal_source`): `student s` includes "
        "it, `teacher s` is only the set-up of its signal source (PP > 1: the teacher's forwards).", "",
        "| setting | tokens | step s | rollout s | teacher s | student s | sync s |",
        "|---|---|---|---|---|---|---|", *rows, f"| full / horizon | | {ratio} |", "",
        "Full responses average ~155 tokens here (the random model seldom stops); the saving scales with "
        "response length / h. Before truncation cut generation and forwards, a horizon step cost a full one "
        "(only the loss weights past h were zero).", "", END]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=6, help="counted steps per setting (after one warm-up pair)")
    parser.add_argument("--model", default=None, help="HF model dir (default: the demo's random initial model)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--markdown", type=Path, default=None, help="replace this tool's section in FILE")
    args = parser.parse_args()

    from bench_sidecar import write_results

    from megatron_opsd.config import load_config
    from megatron_opsd.demo.prepare import prepare
    from megatron_opsd.demo.recipe import DemoRecipe, stage_config_dir
    from megatron_opsd.parallel.launch import run_distributed

    with tempfile.TemporaryDirectory(prefix="bench-horizon-") as tmp:
        inputs = prepare(Path(tmp), DemoRecipe(), seed=0)
        model = args.model or str(inputs.init_model)
        cfg = load_config(str(stage_config_dir() / "opsdc.yaml"), [  # package data: runs from any directory
            f"model.path={model}", f"data.train_path={inputs.train}", "data.eval_path=null", "train.eval_every=0",
            f"train.steps={2 * (args.pairs + 1)}", f"logging.dir={tmp}/run", "logging.progress=false"])
        runs = run_distributed(bench_worker, 1, cfg.parallel, cfg, args.horizon, args.pairs)[0]
    summary = summarise(runs)
    print(json.dumps(summary, indent=1))
    write_results(args, runs, summary, lambda name: to_markdown(summary, args, name), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
