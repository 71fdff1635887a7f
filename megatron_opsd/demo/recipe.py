"""What the demo runs: task size and difficulty, the tiny model's shape, and how long each stage trains.

The stages' own hyperparameters (learning rates, batch sizes, teacher, loss, rollout settings) live in the
stage configs ``megatron_opsd/demo/configs/sft.yaml`` and ``opsdc.yaml`` (package data, so an installed wheel
runs the demo; ``examples/demo/`` links to them), which are ordinary
``megatron-opsd sft`` / ``megatron-opsd train`` configs; the demo only fills in paths, seeds and step counts
from a :class:`DemoRecipe`. ``FULL`` is ``megatron-opsd demo``; ``QUICK`` (``--quick``, CI) trains less and
evaluates fewer problems.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megatron_opsd.demo.task import TaskConfig, TraceConfig

FILTERS = ("all", "correct", "incorrect")


@dataclass(frozen=True)
class DemoRecipe:
    # task: 3 single-digit steps, every intermediate value in [0, 12] (docs/demo_design.md: harder settings left
    # the 0.5M-parameter model's verbose mode at ~20% after 300 SFT steps)
    n_train: int = 4000
    n_test: int = 200  # the held-out split of the before/after table
    curve_prompts: int = 100  # held-out problems evaluated every eval_every OPSDC steps (the curves)
    task_steps: int = 3
    max_value: int = 12
    concise_fraction: float = 0.5  # share of SFT records that are (concise prompt, concise trace)
    # model: Qwen3, 0.53M parameters with the 512-token BPE vocabulary trained on the task
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention needs head_dim >= 32
    intermediate_size: int = 384
    max_position_embeddings: int = 512  # the model's context: every sidecar's max_model_len stays within it
    # stages
    sft_steps: int = 450  # at 300 steps the student prompt reached 87% (seed 0) but 23% (seed 1); 450: 91%
    opsdc_steps: int = 40
    eval_every: int = 10  # OPSDC curve points
    filters: tuple = FILTERS
    eval_max_tokens: int = 256  # greedy held-out evaluation budget (verbose traces: max ~180 tokens)
    nproc: int = 1  # processes per training stage (TP = nproc; the stage configs use TP=1)
    opsdc_overrides: tuple = ()  # extra overrides of every OPSDC stage (--lora: LORA_OVERRIDES)

    def task_config(self, seed: int) -> TaskConfig:
        return TaskConfig(n_train=self.n_train, n_test=self.n_test, min_steps=self.task_steps,
                          max_steps=self.task_steps, max_value=self.max_value, seed=seed)

    def trace_config(self) -> TraceConfig:
        return TraceConfig(concise_fraction=self.concise_fraction)

    def model_kwargs(self) -> dict:
        return dict(hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                    max_position_embeddings=self.max_position_embeddings)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["filters"] = list(self.filters)
        d["opsdc_overrides"] = list(self.opsdc_overrides)
        return d


FULL = DemoRecipe()
# --quick keeps the SFT stage whole (fewer steps leave the student prompt's greedy accuracy at 10-30%:
# docs/demo_design.md) and shortens the rest: one OPSDC run (filter all) of 20 steps, 100 held-out problems.
QUICK = replace(FULL, n_test=100, curve_prompts=50, opsdc_steps=20, eval_every=10, filters=("all",))

# --lora (docs/demo_design.md, "LoRA variant"): the OPSDC stages train rank-16 adapters on all four projections
# of the frozen SFT model (the teacher is that model with the adapters off, and each step pushes only the
# adapters to the sidecar). LoRA needs a larger lr than full fine-tuning (2e-4 vs 1e-4 in the papers at r=64);
# on this 0.5M-parameter model 1e-3 was measured to compress as fast as full fine-tuning at 1e-4.
LORA_OVERRIDES = ("model.lora.rank=16", "model.lora.alpha=32", "model.lora.sync=adapter", "optim.lr=1e-3")
LORA_FILTERS = ("all",)  # the filter ablation is the full fine-tuning demo's; --filters still chooses


def stage_config_dir() -> Path:
    """The demo's stage configs shipped inside the package (``megatron_opsd/demo/configs``)."""
    return Path(str(importlib.resources.files("megatron_opsd.demo") / "configs"))
