"""The demo's run machinery, shared by ``megatron-opsd demo`` and ``demo --ablation`` (``demo/ablation.py``): the flags
every demo mode shares, the stage configs as a pipeline, a fresh run directory, per-stage wall/CPU clocks, and
the demo's own run (prepare -> SFT -> OPSDC per filter -> evaluate -> table). ``demo/cli.py`` parses the flags.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from megatron_opsd.config import load_config
from megatron_opsd.demo import report
from megatron_opsd.demo.evaluate import DemoEvaluator, demo_sidecar
from megatron_opsd.demo.prepare import DemoInputs, prepare
from megatron_opsd.demo.recipe import stage_config_dir
from megatron_opsd.evaluation.runner import OneSidecarEvaluator, training_eval_settings
from megatron_opsd.pipeline import PipelineConfig, StageConfig, run_pipeline
from megatron_opsd.pipeline.config import PipelineEvalConfig, validate_pipeline_config
from megatron_opsd.training.grpo.config import load_rl_config
from megatron_opsd.training.sft.config import load_sft_config

# What a demo run writes under its run directory (removed at the start of a new run with the same name).
_OWNED = ("data", "init", "stages", "eval", "results.json", "table.md", "curves.png")
EVAL_MAX_MODEL_LEN = 512  # the evaluation sidecar's model length (prompts + eval_max_tokens fit)


class DemoArgumentError(ValueError):
    pass


def resolve_run(args: argparse.Namespace, recipe, name: str, filters: tuple, stages: tuple):
    """The flags every demo mode shares (``--name``/``--out``, ``--filters`` from ``filters``, ``--nproc``,
    ``--config-dir`` holding ``<stage>.yaml`` for ``stages``) applied to ``recipe``: (recipe, run_dir, config_dir)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DemoArgumentError(f"--name {name!r} must be a folder name (letters, digits, '.', '_', '-')")
    if args.filters is not None:
        chosen = tuple(f.strip() for f in args.filters.split(",") if f.strip())
        if not chosen or any(f not in filters for f in chosen):
            raise DemoArgumentError(f"--filters {args.filters!r}: choose a comma-separated subset of {','.join(filters)}")
        if len(set(chosen)) != len(chosen):
            raise DemoArgumentError(f"--filters {args.filters!r} names a filter twice")
        recipe = replace(recipe, filters=chosen)
    if args.nproc is not None:
        if args.nproc not in (1, 2):
            raise DemoArgumentError(f"--nproc must be 1 or 2 (the tiny model has 4 attention heads, 2 KV heads), "
                                    f"got {args.nproc}")
        recipe = replace(recipe, nproc=args.nproc)
    run_dir = Path(args.out) if args.out else Path("runs") / name
    config_dir = Path(args.config_dir) if args.config_dir else stage_config_dir()
    for stage in stages:
        if not (config_dir / f"{stage}.yaml").is_file():
            raise DemoArgumentError(f"--config-dir: {config_dir / (stage + '.yaml')} not found; give a folder holding "
                                    f"{', '.join(st + '.yaml' for st in stages)}, or omit --config-dir for the "
                                    "packaged ones")
    return recipe, run_dir, config_dir


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of every finished child process (stages, sidecars)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class StageClock:
    """Wall and CPU seconds per stage (printed as each ends; ``total`` goes into results.json's runtime)."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.t0, self.c0 = time.perf_counter(), _cpu_seconds()

    def run(self, name: str, fn, *a, **kw):
        t, c = time.perf_counter(), _cpu_seconds()
        out = fn(*a, **kw)
        self.stages[name] = {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(_cpu_seconds() - c, 1)}
        print(f"[demo] {name}: {self.stages[name]['wall_s']:.0f} s wall, {self.stages[name]['cpu_s']:.0f} s CPU",
              flush=True)
        return out

    def total(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.t0, 1), "cpu_s": round(_cpu_seconds() - self.c0, 1),
                "stages": self.stages}


def demo_pipeline(recipe, run_dir: Path, config_dir: Path, seed: int):
    """The demo's training stages as a ``megatron-opsd pipeline`` config: SFT from the random tiny model, then
    one OPSDC stage per filter, each from the SFT export (``init_from: sft``). No per-stage evaluation: the
    demo evaluates every model on one sidecar afterwards (greedy and sampled, student and concise prompts)."""
    inputs = DemoInputs.under(run_dir)
    common = [f"parallel.tensor_model_parallel_size={recipe.nproc}", f"data.seed={seed}", f"train.seed={seed}"]
    sft = StageConfig(name="sft", kind="sft", config=str(config_dir / "sft.yaml"), evaluate=False,
                      overrides=common + [f"data.train_path={inputs.sft}", f"train.steps={recipe.sft_steps}"])
    opsdc = [StageConfig(name=f"opsdc-{f}", kind="opsd", config=str(config_dir / "opsdc.yaml"), init_from="sft",
                         evaluate=False,
                         overrides=common + [f"data.train_path={inputs.train}", f"data.eval_path={inputs.curve}",
                                             f"rollout.seed={seed}", f"rollout.filter={f}",
                                             f"train.steps={recipe.opsdc_steps}", f"train.eval_every={recipe.eval_every}",
                                             *recipe.opsdc_overrides])
             for f in recipe.filters]
    cfg = PipelineConfig(name=run_dir.name, out_dir=str(run_dir / "stages"), model=str(inputs.init_model),
                         nproc=recipe.nproc, eval=PipelineEvalConfig(path=None, baseline=False), stages=[sft, *opsdc])
    return validate_pipeline_config(cfg)


def stage_config_objects(pipeline_cfg):
    """Each stage's config loaded as its command will load it (a bad key fails before anything runs)."""
    loaders = {"sft": load_sft_config, "rl": load_rl_config, "opsd": load_config}
    return {stage.name: loaders[stage.kind](stage.config, list(stage.overrides) + [f"model.path={pipeline_cfg.model}"])
            for stage in pipeline_cfg.stages}


def clear_run_dir(run_dir: Path, owned: tuple) -> None:
    """A fresh run: remove what an earlier run with this name wrote (the ``owned`` entries), keep the rest."""
    for entry in owned:
        path = run_dir / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def run_demo(recipe, run_dir: Path, config_dir: Path, seed: int, quick: bool) -> dict:
    pipeline_cfg = demo_pipeline(recipe, run_dir, config_dir, seed)
    configs = stage_config_objects(pipeline_cfg)
    clear_run_dir(run_dir, _OWNED)
    clock = StageClock()
    print(f"[demo] {'quick' if quick else 'full'} run, seed {seed}, under {run_dir}", flush=True)
    inputs = clock.run("prepare", prepare, run_dir, recipe, seed)
    print(f"[demo] task: {recipe.n_train} train / {recipe.n_test} held-out problems ({recipe.task_steps} steps, "
          f"values 0-{recipe.max_value}); SFT mixture {inputs.sft}; random tiny Qwen3 {inputs.init_model}", flush=True)
    # The pipeline skips finished stages, so running it on a growing prefix of the stage list trains one more
    # stage per call: the same runs as one call, with each stage's time measured on its own.
    # One sidecar serves the OPSDC stages and the evaluations (demo_sidecar).
    with demo_sidecar(pipeline_cfg, max_model_len=EVAL_MAX_MODEL_LEN, log_path=run_dir / "eval" / "sidecar.log") \
            as shared:
        for i, stage in enumerate(pipeline_cfg.stages):
            clock.run(stage.name, run_pipeline, replace(pipeline_cfg, stages=pipeline_cfg.stages[:i + 1]), shared)
        opsdc_cfg = configs[f"opsdc-{recipe.filters[0]}"]
        return evaluate_and_report(recipe, run_dir, seed, quick, clock, opsdc_cfg,
                                   {s.name: {"config": s.config, "overrides": s.overrides,
                                             "init_from": s.init_from or "init"} for s in pipeline_cfg.stages},
                                   models=shared)


def evaluate_and_report(recipe, run_dir: Path, seed: int, quick: bool, clock: "StageClock", opsdc_cfg,
                        stage_configs: dict, models: Optional[OneSidecarEvaluator] = None) -> dict:
    """Evaluate the trained models of ``run_dir`` (on ``models``' sidecar if given) and write the table,
    results.json and curves PNG."""
    inputs, stages_dir = DemoInputs.under(run_dir), run_dir / "stages"
    sft_dir = stages_dir / "sft"
    rows, step0 = [], None
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)

    def evaluate_all():
        nonlocal step0
        with DemoEvaluator(sft_dir / "hf", inputs.test, max_tokens=recipe.eval_max_tokens,
                           log_path=eval_dir / "sidecar.log", max_model_len=EVAL_MAX_MODEL_LEN, models=models) as ev:
            sampling = training_eval_settings(opsdc_cfg)  # the trainer's eval_every settings (rollout sampling)

            def row(label: str, prompt: str, model: Path, name: str, **extra) -> dict:
                concise = prompt != "student"
                greedy = ev.evaluate(model, concise_prompt=concise, save_to=eval_dir / f"{name}.json")
                sampled = ev.evaluate(model, concise_prompt=concise, settings=sampling,
                                      save_to=eval_dir / f"{name}_sampled.json")
                return {"label": label, "prompt": prompt, "model": str(model), **extra, **greedy,
                        "sampled": {k: sampled[k] for k in ("accuracy", "mean_tokens", "truncated_share")}}

            rows.append(row("SFT (before)", "student", sft_dir / "hf", "sft"))
            rows.append(row("SFT + concise instruction", "concise (the OPSDC teacher's)", sft_dir / "hf",
                            "sft_concise"))
            # step 0 of the held-out curves: the trainer's eval_every settings on the curve split
            step0 = ev.evaluate_settings(sft_dir / "hf", inputs.curve, sampling)
            for filt in recipe.filters:
                rows.append(row(f"OPSDC filter={filt} (after)", "student", stages_dir / f"opsdc-{filt}" / "hf",
                                f"opsdc-{filt}", filter=filt))

    clock.run("evaluate", evaluate_all)

    curves = {f: report.read_curves(stages_dir / f"opsdc-{f}" / "metrics.jsonl", step0) for f in recipe.filters}
    before = rows[0]
    verdicts = {r["filter"]: report.verdict(before, r) for r in rows if "filter" in r}
    table = report.results_table(rows)
    runtime = clock.total()
    results = {"name": run_dir.name, "run_dir": str(run_dir), "seed": seed, "quick": quick,
               "recipe": recipe.to_dict(), "rows": rows, "verdict": verdicts, "headline_filter": recipe.filters[0],
               "curves": curves, "evaluation": "rows: data/test.jsonl, greedy (accuracy, mean_tokens, ...) and "
               "sampled with the trainer's eval_every settings (rows' 'sampled'); held-out curve points: "
               "train.eval_every on data/curve.jsonl (sampled), step 0 = the SFT model with the same settings",
               "runtime": runtime, "stages": stage_configs}
    png = report.plot_curves(curves, run_dir / "curves.png",
                             f"OPSDC on the CPU demo task (seed {seed}{', quick' if quick else ''}): "
                             f"SFT {before['mean_tokens']:.0f} tokens, {100 * before['accuracy']:.0f}% greedy")
    results["curves_png"] = str(png) if png else None
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (run_dir / "table.md").write_text(table + "\n")

    print("\n" + table + "\n")
    for filt, v in verdicts.items():
        status = "MET" if v["met"] else "NOT MET"
        print(f"OPSDC filter={filt}: {100 * v['token_reduction']:.1f}% fewer tokens, accuracy "
              f"{100 * v['accuracy_change']:+.1f} points -> goal ({v['goal']}) {status}")
    print(f"\nruntime: {runtime['wall_s']:.0f} s wall, {runtime['cpu_s']:.0f} s CPU (this process and its children)")
    print(f"results: {run_dir / 'results.json'}, {run_dir / 'table.md'}"
          + (f", {png}" if png else ""), flush=True)
    return results
