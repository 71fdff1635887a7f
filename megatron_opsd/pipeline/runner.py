"""Run SFT -> RLVR -> OPSD (any sequence of sft / rl / opsd stages), then evaluate every stage's model.

Every stage runs as its own `megatron-opsd sft|rl|train` process (local ``--nproc`` processes, or a cluster
``launcher``), so each starts with a clean distributed state and a crash in one stage never corrupts another.
A stage's model is exported as an HF directory (``<out_dir>/<stage>/hf``) that the next stage loads as
``model.path`` and the evaluation sidecar serves: checkpoints flow between stages without conversion steps.
Run locally (no ``launcher``), the pipeline starts one vLLM sidecar for all of it (``OneSidecarEvaluator``): each
rl/opsd stage is handed that sidecar (``rollout.sidecar_urls``) serving its start model, pushed to it as version 0,
and the evaluations after the last stage push each model to it in turn: vLLM starts once, not once per stage and
once more for the evaluations (20-45 s each on CPU; minutes for a large model). A stage that needs its own
sidecar (its own ``rollout.sidecar_urls``, LoRA adapter pushes, another dtype or sidecar TP) starts it as before.
Each evaluation is cached in ``<stage>/eval.json``.

Re-running the same command after a crash skips finished stages (their ``stage_done.json``) and resumes the
interrupted one from its last checkpoint (``--resume``). Stage processes die with the pipeline process, and a
SIGTERM to it stops the running stage cleanly first (``megatron_opsd.lifecycle``).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from megatron_opsd.config import DataConfig, load_config
from megatron_opsd.evaluation.report import benchmark_summary
from megatron_opsd.evaluation.runner import EvalSettings, OneSidecarEvaluator
from megatron_opsd.lifecycle import run_process
from megatron_opsd.pipeline.config import STAGE_COMMANDS, PipelineConfig, StageConfig
from megatron_opsd.rollout.environment import on_gpu
from megatron_opsd.training.checkpoint import write_text_atomic
from megatron_opsd.training.grpo.config import load_rl_config
from megatron_opsd.training.run import local_sidecar_options

DONE_MARKER = "stage_done.json"


class PipelineError(RuntimeError):
    pass


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def stage_command(cfg: PipelineConfig, stage: StageConfig, model_dir: str) -> list[str]:
    """The command that trains ``stage`` from ``model_dir`` and, at its end, exports it to ``<stage>/hf``
    (``export.hf_dir``: the training processes write it, no second job reloads the checkpoint)."""
    stage_dir = Path(cfg.out_dir) / stage.name
    cli = [sys.executable, "-m", "megatron_opsd.cli"]
    launcher = shlex.split(cfg.launcher) if cfg.launcher else cli
    train = launcher + [STAGE_COMMANDS[stage.kind], "--config", stage.config, "--resume"]
    if not cfg.launcher:
        train += ["--nproc", str(stage.nproc or cfg.nproc)]
    train += list(stage.overrides) + [f"model.path={model_dir}", f"logging.dir={stage_dir}",
                                      f"checkpoint.dir={stage_dir / 'checkpoints'}",
                                      f"export.hf_dir={stage_dir / 'hf'}"]
    return train


def stage_sidecar_options(stage: StageConfig) -> Optional[dict]:
    """The local sidecar an rl/opsd stage would start (``training.run.local_sidecar_options``); None for an SFT
    stage or one given ``rollout.sidecar_urls``."""
    if stage.kind == "sft":
        return None
    stage_cfg = (load_rl_config if stage.kind == "rl" else load_config)(stage.config, list(stage.overrides))
    return None if stage_cfg.rollout.sidecar_urls else local_sidecar_options(stage_cfg)


def shared_sidecar_options(cfg: PipelineConfig) -> Optional[dict]:
    """Flags of one sidecar that serves every stage that would start its own (the longest ``max_model_len``), or
    None: a cluster ``launcher`` (the stages run elsewhere), CUDA (a stage refuses a local sidecar on its training
    GPU: ``refuse_local_sidecar_on_gpu``, and so does the pipeline), no such stage, or stages whose sidecars
    differ in anything else (dtype, TP, LoRA adapters: a restored base model would keep serving an adapter)."""
    return _one_sidecar_for(_stage_sidecars(cfg))


def _stage_sidecars(cfg: PipelineConfig) -> dict[str, Optional[dict]]:
    """Stage name -> the sidecar it would start (``stage_sidecar_options``); empty where none is shared (a cluster
    ``launcher`` or CUDA), so that no stage config is loaded for nothing."""
    if cfg.launcher or on_gpu():
        return {}
    return {stage.name: stage_sidecar_options(stage) for stage in cfg.stages}


def _one_sidecar_for(per_stage: dict[str, Optional[dict]]) -> Optional[dict]:
    wanted = [o for o in per_stage.values() if o is not None]
    if not wanted or any(o["max_lora_rank"] for o in wanted):
        return None
    rest = {tuple((k, v) for k, v in o.items() if k != "max_model_len") for o in wanted}
    if len(rest) > 1:
        return None
    return {**wanted[0], "max_model_len": max(o["max_model_len"] for o in wanted)}


def _run(cmd: list[str], stage: str) -> None:
    print(f"[pipeline] {stage}: {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rc = run_process(cmd, env=env)  # dies with the pipeline; SIGTERM here stops it cleanly (lifecycle.py)
    if rc != 0:
        raise PipelineError(f"stage {stage!r} failed (exit {rc}) running: {shlex.join(cmd)}\nFix the cause and "
                            "re-run the same pipeline command: finished stages are skipped and this stage resumes "
                            "from its last checkpoint.")


def evaluate_stage(cfg: PipelineConfig, name: str, model_dir: str, models: OneSidecarEvaluator) -> Optional[dict]:
    """Greedy (by default) accuracy and response length of ``model_dir`` on ``eval.path`` (on ``models``'
    sidecar), cached in ``<out_dir>/<name>/eval.json``."""
    e = cfg.eval
    if e.path is None:
        return None
    out = Path(cfg.out_dir) / name / "eval.json"
    if out.is_file():
        return json.loads(out.read_text())
    data = DataConfig(system_prompt=e.system_prompt)
    if e.prompt_template is not None:
        data.prompt_template = e.prompt_template
    settings = EvalSettings(**e.request_fields(), seed=e.seed, enable_thinking=e.enable_thinking, limit=e.limit,
                            data=data)
    out.parent.mkdir(parents=True, exist_ok=True)  # also for "start", which has no stage folder
    results = models.results(model_dir, [e.path], settings)
    summary = {"stage": name, "model": str(model_dir),
               **benchmark_summary(next(iter(results["benchmarks"].values())))}
    _write_json_atomic(out, summary)
    return summary


def results_table(rows: list[dict]) -> str:
    """Markdown: one row per evaluated model; token change relative to the first row."""
    lines = ["| stage | accuracy | mean tokens | p90 tokens | tokens vs first row | truncated |",
             "|---|---|---|---|---|---|"]
    first = rows[0]["mean_tokens"] if rows else None
    for r in rows:
        change = f"{100.0 * (r['mean_tokens'] / first - 1.0):+.1f}%" if first else "n/a"
        lines.append(f"| {r['stage']} | {100.0 * r['accuracy']:.1f}% | {r['mean_tokens']:.1f} | {r['p90_tokens']:.0f} "
                     f"| {change} | {100.0 * r['truncated_share']:.1f}% |")
    return "\n".join(lines)


def run_pipeline(cfg: PipelineConfig, sidecar: Optional[OneSidecarEvaluator] = None) -> dict:
    """Train every stage in order (skipping finished ones), evaluate each, write results.json and table.md.
    ``sidecar``: a caller's shared sidecar (the demo's, which runs the pipeline stage by stage), used where it
    offers what the stages need (``shared_sidecar_options``)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pipeline.json").write_text(json.dumps(asdict(cfg), indent=2))
    exports: dict[str, str] = {}
    to_evaluate = [("start", cfg.model, {})] if cfg.eval.baseline else []  # (row name, model, extra fields)
    previous = cfg.model
    e = cfg.eval
    with ExitStack() as stack:
        per_stage = _stage_sidecars(cfg)  # each stage config loaded once per run
        shared, options = None, _one_sidecar_for(per_stage)
        # the evaluations join it when they ask for its dtype and a model length (None: the model's own)
        eval_joins = options is not None and e.dtype == options["dtype"] and e.max_model_len is not None
        if options is not None:
            if eval_joins:
                options["max_model_len"] = max(options["max_model_len"], e.max_model_len)
            shared = sidecar if sidecar is not None and sidecar.offers(options) else stack.enter_context(
                OneSidecarEvaluator(log_path=out_dir / "sidecar.log", **options))  # starts when first served
        for stage in cfg.stages:
            start_model = exports[stage.init_from] if stage.init_from else previous
            stage_dir = out_dir / stage.name
            hf_dir = stage_dir / "hf"
            if (stage_dir / DONE_MARKER).is_file() and (hf_dir / "config.json").is_file():
                print(f"[pipeline] {stage.name}: finished earlier, skipping ({hf_dir})", flush=True)
            else:
                cmd = stage_command(cfg, stage, start_model)
                if shared is not None and per_stage[stage.name] is not None:
                    cmd.append(f"rollout.sidecar_urls=[{shared.lend(start_model)}]")
                _run(cmd, stage.name)
                _write_json_atomic(stage_dir / DONE_MARKER, {"stage": asdict(stage), "started_from": start_model})
            exports[stage.name] = previous = str(hf_dir)
            if stage.evaluate:
                to_evaluate.append((stage.name, str(hf_dir), {"kind": stage.kind, "started_from": start_model}))
        rows = []
        models = shared if eval_joins else stack.enter_context(  # starts only if a row is not cached
            OneSidecarEvaluator(log_path=out_dir / "eval_sidecar.log", dtype=e.dtype, max_model_len=e.max_model_len))
        for name, model_dir, extra in to_evaluate:
            if (row := evaluate_stage(cfg, name, model_dir, models)) is not None:
                rows.append({**row, **extra})
    table = results_table(rows)
    (out_dir / "table.md").write_text(table + "\n")
    results = {"name": cfg.name, "rows": rows, "exports": exports}
    _write_json_atomic(out_dir / "results.json", results)
    if rows:
        print(table, flush=True)
    print(f"[pipeline] results in {out_dir}/results.json and {out_dir}/table.md; final model {previous}", flush=True)
    return results
