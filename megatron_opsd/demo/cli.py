"""`megatron-opsd demo [--quick] [--lora] [--name NAME | --out DIR] [--seed N]`: the newcomer's main job on CPU.

A tiny reproduction of the OPSDC papers' effect through the commands users run at scale: a synthetic
arithmetic task with verbose ("Wait, let me verify ...") and concise traces, a random tiny Qwen3 with a BPE
tokenizer trained on the task, ``megatron-opsd sft`` on the trace mixture, then OPSDC (``megatron-opsd train``:
vLLM sidecar rollouts, concise-instruction self-teacher, reverse KL) from the SFT model once per rollout filter
(all | correct | incorrect), each exported as an HF directory at its end (``export.hf_dir``) and evaluated greedily
on the held-out split. The stages run through ``megatron-opsd pipeline``'s runner (each its own process, from the
previous stage's HF export). Writes under ``runs/<name>/``: ``results.json``, ``table.md``, ``curves.png``, the task
data and initial model, ``stages/<stage>/`` (config, metrics.jsonl, checkpoints, HF export) and ``eval/``.
See docs/demo_design.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from megatron_opsd.config import ConfigError
from megatron_opsd.demo.ablation import resolve_ablation, run_ablation
from megatron_opsd.demo.ablation2 import resolve_hindsight, run_hindsight
from megatron_opsd.demo.recipe import FILTERS, FULL, LORA_FILTERS, LORA_OVERRIDES, QUICK
# the demo's run machinery (demo/run.py); tests and tools also reach these names through this module
from megatron_opsd.demo.run import (DemoArgumentError, clear_run_dir, demo_pipeline,  # noqa: F401
                                    evaluate_and_report, resolve_run, run_demo, stage_config_objects)
from megatron_opsd.pipeline import PipelineError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the CI variant: one OPSDC run (filter all) of 20 steps, 100 held-out problems")
    parser.add_argument("--lora", action="store_true",
                        help="the OPSDC stages train LoRA adapters (demo/recipe.py LORA_OVERRIDES) instead of all "
                             "weights; default filters: all; results go to runs/demo-lora[-quick]")
    parser.add_argument("--name", default=None, help="run name: results go to runs/<name>/ (default demo, "
                                                      "demo-quick with --quick, demo-lora[-quick] with --lora)")
    parser.add_argument("--out", default=None, help="the run directory (default runs/<name>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, tokenizer, model, data order and "
                                                            "rollouts (default 0)")
    parser.add_argument("--filters", default=None,
                        help="comma-separated OPSDC rollout filters to run (default all,correct,incorrect; "
                             "--quick: all); the first one is the before/after verdict")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes per training stage = tensor-parallel size (default 1)")
    parser.add_argument("--ablation", choices=("compression", "hindsight"), default=None,
                        help="run an ablation instead of the demo: 'compression' = SFT -> RLVR -> OPSD with the "
                             "reference teacher per rollout filter and seed (issue 19, megatron_opsd/demo/ablation.py); "
                             "'hindsight' = its second protocol: 3 chains, a teacher not taught to be concise, "
                             "matched budgets, JSD and reverse KL arms (issue 28, docs/ablation2.md)")
    parser.add_argument("--config-dir", default=None, help="folder with the stage configs sft.yaml and opsdc.yaml "
                                                           "(default: the ones shipped in megatron_opsd/demo/configs)")


def resolve(args: argparse.Namespace):
    """(recipe, run_dir, config_dir) from the arguments; bad values raise DemoArgumentError naming the flag."""
    recipe = QUICK if args.quick else FULL
    if args.lora:
        recipe = replace(recipe, filters=LORA_FILTERS, opsdc_overrides=LORA_OVERRIDES)
    if args.seed < 0:
        raise DemoArgumentError(f"--seed must be >= 0, got {args.seed}")
    name = args.name or ("demo" + ("-lora" if args.lora else "") + ("-quick" if args.quick else ""))
    return resolve_run(args, recipe, name, FILTERS, ("sft", "opsdc"))


def main(args: argparse.Namespace) -> int:
    try:
        if args.ablation == "hindsight":
            recipe, run_dir, config_dir = resolve_hindsight(args)
        elif args.ablation is not None:
            recipe, run_dir, config_dir = resolve_ablation(args)
        else:
            recipe, run_dir, config_dir = resolve(args)
    except DemoArgumentError as err:
        print(f"megatron-opsd demo: error: {err}", file=sys.stderr)
        return 2
    quiet = "PYTHONWARNINGS" not in os.environ
    if quiet:  # the stage processes inherit it: no screens of megatron/torch warnings between progress bars
        os.environ["PYTHONWARNINGS"] = "ignore"
    try:
        if args.ablation == "hindsight":
            run_hindsight(recipe, run_dir, config_dir, quick=args.quick)
        elif args.ablation is not None:
            run_ablation(recipe, run_dir, config_dir, quick=args.quick)
        else:
            run_demo(recipe, run_dir, config_dir, args.seed, args.quick)
    except (ConfigError, PipelineError) as err:
        print(f"megatron-opsd demo: error: {err}", file=sys.stderr)
        return 1
    finally:
        if quiet:
            del os.environ["PYTHONWARNINGS"]
    return 0
