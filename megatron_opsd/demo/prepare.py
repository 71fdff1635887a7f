"""The demo's inputs: task splits, the SFT mixture, the tokenizer and the
random tiny Qwen3 checkpoint the SFT stage starts from.

Layout under ``<run>/``::

    data/train.jsonl  data/test.jsonl  data/curve.jsonl  data/sft.jsonl
    init/             (config.json, model.safetensors, tokenizer files with the chat template)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_opsd.demo import task
from megatron_opsd.demo.recipe import DemoRecipe
from megatron_opsd.models.tiny import make_tiny_hf_checkpoint


@dataclass
class DemoInputs:
    train: Path  # prompts for OPSDC rollouts (problem, answer, solution)
    test: Path  # the held-out split of the before/after table
    curve: Path  # the first curve_prompts held-out problems, evaluated during OPSDC
    sft: Path  # the SFT mixture (chat records)
    init_model: Path  # random tiny Qwen3 + the task's BPE tokenizer

    @classmethod
    def under(cls, run_dir: Path) -> "DemoInputs":
        data = Path(run_dir) / "data"
        return cls(data / "train.jsonl", data / "test.jsonl", data / "curve.jsonl", data / "sft.jsonl",
                   Path(run_dir) / "init")


def prepare(run_dir: Path, recipe: DemoRecipe, seed: int) -> DemoInputs:
    """Write the demo's inputs (all derived from ``seed``)."""
    inputs = DemoInputs.under(run_dir)
    train, test = task.generate_splits(recipe.task_config(seed))
    task.write_jsonl(inputs.train, train)
    task.write_jsonl(inputs.test, test)
    task.write_jsonl(inputs.curve, test[:recipe.curve_prompts])
    task.write_jsonl(inputs.sft, task.build_sft_mixture(train, seed=seed, cfg=recipe.trace_config()))
    make_tiny_hf_checkpoint(inputs.init_model, "qwen3", seed=seed,
                            tokenizer_texts=task.tokenizer_corpus(train, seed, recipe.trace_config()),
                            tokenizer_vocab_size=recipe.vocab_size, **recipe.model_kwargs())
    return inputs
