"""The pipeline config: an ordered list of stages (sft, rl, opsd), each a normal stage config plus overrides.

```yaml
name: tiny_pipeline            # outputs under runs/<name>/ (or out_dir)
model: runs/demo/tiny-qwen3    # the HF directory the first stage starts from
nproc: 2                       # local processes per stage (ignored when `launcher` is set)
eval:
  path: runs/demo/test.jsonl   # held-out JSONL with problem/answer fields, evaluated for every stage
  max_tokens: 256
stages:
  - {name: sft,  kind: sft,  config: examples/sft_tiny.yaml}
  - {name: rlvr, kind: rl,   config: examples/grpo_tiny.yaml}
  - {name: opsd, kind: opsd, config: examples/opsdc_tiny.yaml, overrides: [rollout.filter=correct]}
```

Each stage starts from the HF export of ``init_from`` (default: the stage before it; the first stage starts
from ``model``), so stages can also branch from one parent (the demo's filter ablation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import yaml

from megatron_opsd.config import ConfigError, SamplingConfig, apply_overrides, from_dict, validate_values

STAGE_COMMANDS = {"sft": "sft", "rl": "rl", "opsd": "train"}  # stage kind -> megatron-opsd subcommand


@dataclass
class StageConfig:
    name: str = ""  # a folder name under the pipeline's out_dir
    kind: Literal["sft", "rl", "opsd"] = "opsd"
    config: str = ""  # the stage's own YAML (megatron-opsd sft / rl / train config)
    overrides: list[str] = field(default_factory=list)  # key=value applied after the YAML
    init_from: Optional[str] = None  # an earlier stage's name; default: the previous stage
    nproc: Optional[int] = None  # default: the pipeline's nproc
    evaluate: bool = True  # evaluate the stage's model on eval.path


@dataclass
class PipelineEvalConfig(SamplingConfig):
    """The held-out evaluation of every stage: the sampling (``config.SamplingConfig``'s fields: ``eval.n``,
    ``eval.max_tokens``, ...; greedy by default, so rows compare), the file and the prompt format."""

    temperature: float = 0.0  # greedy by default: comparable rows
    path: Optional[str] = None  # held-out JSONL with problem/answer fields; None: no evaluation
    baseline: bool = True  # also evaluate the starting model (the table's first row)
    limit: Optional[int] = None
    seed: int = 0
    enable_thinking: Optional[bool] = None
    system_prompt: Optional[str] = None  # must match the stages' data.system_prompt / prompt_template
    prompt_template: Optional[str] = None
    dtype: str = "auto"  # the evaluation sidecar's dtype (float32 on CPU)
    max_model_len: Optional[int] = None


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    out_dir: Optional[str] = None  # default runs/<name>
    model: str = ""  # the HF directory the first stage starts from
    nproc: int = 1  # local processes per stage (gloo on CPU)
    launcher: Optional[str] = None  # e.g. "torchrun --nproc-per-node 8 --nnodes 2 ... -m megatron_opsd.cli"
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    stages: list[StageConfig] = field(default_factory=list)


def validate_pipeline_config(cfg: PipelineConfig) -> PipelineConfig:
    """Cross-field checks with errors that name the key; fills out_dir and stage defaults."""
    if not cfg.model:
        raise ConfigError("model must be set to the HF directory the first stage starts from")
    if not cfg.stages:
        raise ConfigError("stages is empty: list at least one {name, kind: sft|rl|opsd, config}")
    if cfg.nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {cfg.nproc}")
    cfg.out_dir = cfg.out_dir or str(Path("runs") / cfg.name)
    seen: list[str] = []
    for i, stage in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if not stage.name or "/" in stage.name:
            raise ConfigError(f"{key}.name must be a non-empty folder name, got {stage.name!r}")
        if stage.name in seen:
            raise ConfigError(f"{key}.name {stage.name!r} is used twice; stage names must be unique")
        if not stage.config or not Path(stage.config).is_file():
            raise ConfigError(f"{key}.config {stage.config!r} is not a file; give the stage's YAML config")
        if stage.init_from is not None and stage.init_from not in seen:
            raise ConfigError(f"{key}.init_from {stage.init_from!r} must name an earlier stage, one of {seen}")
        if stage.nproc is not None and stage.nproc < 1:
            raise ConfigError(f"{key}.nproc must be >= 1, got {stage.nproc}")
        bad = [o for o in stage.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"{key}.overrides {bad} are not of the form section.key=value")
        seen.append(stage.name)
    if cfg.eval.path is not None and not Path(cfg.eval.path).is_file():
        raise ConfigError(f"eval.path {cfg.eval.path!r} is not a file; give a JSONL with problem/answer fields "
                          "(or null to skip evaluation)")
    return cfg


def load_pipeline_config(path: Optional[str], overrides: Sequence[str] = ()) -> PipelineConfig:
    """Defaults <- YAML <- ``key=value`` overrides (top-level and ``eval.*`` keys), validated."""
    data = {}
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"pipeline config {path!r} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
    stages = data.pop("stages", []) if isinstance(data, dict) else []
    if not isinstance(stages, list):
        raise ConfigError("stages must be a list of {name, kind, config, overrides, init_from}")
    cfg = from_dict(PipelineConfig, data)
    cfg.stages = [from_dict(StageConfig, s, prefix=f"stages[{i}]") for i, s in enumerate(stages)]
    apply_overrides(cfg, list(overrides))
    return validate_pipeline_config(validate_values(cfg))
