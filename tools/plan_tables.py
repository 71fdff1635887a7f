"""The planner's LoRA table in docs/benchmarks.md, generated from `megatron-opsd plan` (issue 32: a number in the
docs that the tool no longer prints fails tests/test_docs_commands.py, which regenerates this section).

    .venv/bin/python tools/plan_tables.py [--markdown docs/benchmarks.md]

Each row runs `megatron-opsd plan` on an example config for full fine-tuning and for LoRA r=64 (the commands are
in the section) and reads the per-GPU categories of the peak stage, the peak and the weight sync per step.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- plan_lora_table:begin -->", "<!-- plan_lora_table:end -->"
LORA = ["model.lora.rank=64", "model.lora.alpha=128", "parallel.sequence_parallel=false"]
ROWS = [  # (label, plan arguments of the full fine-tuning run, extra LoRA overrides)
    ("Qwen3-8B", ["--config", "examples/configs/qwen3-8b_correct_only.yaml", "--model-config",
                  "examples/model_configs/qwen3-8b", "--gpus-per-node", "8", "--gpu-memory", "80GB"], []),
    ("Llama-3.1-70B", ["--config", "examples/configs/llama-3.1-70b_opsdc.yaml", "--model-config",
                       "examples/model_configs/llama-3.1-70b", "--nodes", "4", "--gpus-per-node", "8",
                       "--gpu-memory", "80GB"], ["model.recompute_granularity=full"]),
]
CATEGORIES = ("student weights", "student grads", "optimizer state", "teacher weights")


def plan(argv: list[str]) -> dict:
    """`megatron-opsd plan argv`, parsed: the header fields, the peak stage's categories, peak, sync sizes."""
    from megatron_opsd.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["plan", *argv])
    text = out.getvalue()
    stage, peak = re.search(r"peak stage (\d+): ([\d.]+) GiB", text).groups()
    header = re.search(r"TP=(\d+) PP=(\d+) (?:CP=\d+ )?DP=(\d+) SP=(\w+);.*recompute=(\w+); teacher=(\w+)", text).groups()
    stages = [s.strip() for s in re.search(r"^per GPU \(GiB\)\s+(.+)$", text, re.M).group(1).split("stage") if s.strip()]
    values = {}
    for name in CATEGORIES:
        values[name] = re.search(rf"^{name}\s+(.+)$", text, re.M).group(1).split()[stages.index(stage)]
    sync = re.search(r"weight sync per step: merged ([\d.]+ GiB)(?:, adapter only ([\d.]+ GiB))?", text).groups()
    return dict(tp=header[0], pp=header[1], dp=header[2], sp=header[3], recompute=header[4], teacher=header[5],
                stage=stage, peak=float(peak), values=values, merged=sync[0], adapter=sync[1])


def fmt(values: dict) -> str:
    return " / ".join("0" if float(values[c]) == 0 else values[c] for c in CATEGORIES)


def section() -> str:
    lines = [BEGIN, "Commands, from the repository root (LoRA: the same plus "
             f"`{' '.join(LORA)}`; the 70B row also `model.recompute_granularity=full`):", "", "```bash"]
    rows = []
    for label, argv, extra in ROWS:
        full, lora = plan(argv), plan(argv + LORA + extra)
        lines.append("megatron-opsd plan " + " ".join(argv))
        layout = f"TP={full['tp']}" + (f" PP={full['pp']}" if full["pp"] != "1" else f" DP={full['dp']}")
        rows.append(f"| {label}, {layout}, teacher {full['teacher']}, {full['recompute']} recompute (stage "
                    f"{full['stage']}) | {fmt(full['values'])} | {fmt(lora['values'])} | {full['peak']:.2f} (SP "
                    f"{full['sp']}) -> {lora['peak']:.2f} GiB (SP {lora['sp']}, {lora['recompute']} recompute, stage "
                    f"{lora['stage']}) | {full['merged']} -> {lora['adapter']} |")
    lines += ["```", "", "| model, layout, teacher | full FT: weights / grads / Adam / teacher (GiB) | LoRA r=64: "
              "weights / grads / Adam / teacher (GiB) | peak total full FT -> LoRA | sync per step merged -> adapter |",
              "|---|---|---|---|---|", *rows, END]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path, default=None, help="replace this tool's section in FILE")
    args = parser.parse_args()
    text = section()
    if args.markdown is None:
        print(text)
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_sidecar import write_section

    write_section(args.markdown, text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
