"""Held-out evaluation of the demo's models: greedy decoding on ``test.jsonl`` through the evaluation runner
(``evaluation.runner.evaluate``, what ``megatron-opsd eval`` runs) on one vLLM sidecar.

One sidecar serves every model: it starts on the first model directory and each further model's HF weights
are pushed to it (the trainer's weight-update path), which saves a vLLM start per model. ``demo_sidecar`` makes
that sidecar serve the demo's training stages too (``pipeline.run_pipeline``'s ``sidecar``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from megatron_opsd.config import DEFAULT_PROMPT_TEMPLATE, DataConfig
from megatron_opsd.demo.task import CONCISE_INSTRUCTION
from megatron_opsd.evaluation.report import benchmark_summary, save_results
from megatron_opsd.evaluation.runner import EvalSettings, OneSidecarEvaluator
from megatron_opsd.pipeline.runner import shared_sidecar_options

# The concise-instruction prompt (the OPSDC teacher's context) as a student prompt template: the evaluation
# builds exactly the text of ``task.concise_messages`` (checked in tests/test_demo.py).
CONCISE_PROMPT_TEMPLATE = CONCISE_INSTRUCTION + "\n\n" + DEFAULT_PROMPT_TEMPLATE


class DemoEvaluator:
    """``with DemoEvaluator(first_model_dir, ...) as ev: ev.evaluate(model_dir)`` -> summary dict."""

    def __init__(self, first_model: Path, test_path: Path, *, max_tokens: int, log_path: Path,
                 max_model_len: int = 512, models: Optional[OneSidecarEvaluator] = None):
        self.first_model, self.test_path = Path(first_model), Path(test_path)
        self.max_tokens = max_tokens
        self.owned = models is None  # else the caller's (``demo_sidecar``), stopped by the caller
        self.models = models or OneSidecarEvaluator(log_path=log_path, dtype="float32", max_model_len=max_model_len)

    def __enter__(self) -> "DemoEvaluator":
        self.models.serve(self.first_model)
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.models.__exit__(*exc)

    def evaluate(self, model_dir: Path, *, concise_prompt: bool = False, settings=None,
                 save_to: Optional[Path] = None) -> dict:
        """Accuracy and response tokens of ``model_dir`` on the held-out split, greedy unless ``settings`` (an
        ``EvalSettings``) say otherwise, from the student prompt or the concise-instruction prompt
        (``concise_prompt``); full results (texts included) to ``save_to`` if given."""
        if settings is None:
            settings = EvalSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=self.max_tokens, seed=0,
                                    progress=False, data=DataConfig())
        data = settings.data
        if concise_prompt:
            data = replace(data, prompt_template=CONCISE_PROMPT_TEMPLATE)
        settings = replace(settings, data=data, prompts_per_request=64, save_text=True, progress=False)
        return self.evaluate_settings(model_dir, self.test_path, settings, save_to=save_to)

    def evaluate_settings(self, model_dir: Path, path: Path, settings, save_to: Optional[Path] = None) -> dict:
        """``model_dir`` on the JSONL ``path`` with the evaluation runner's ``EvalSettings``; summary dict."""
        results = self.results(model_dir, [str(path)], settings)
        if save_to is not None:
            save_results(results, save_to)
        return benchmark_summary(next(iter(results["benchmarks"].values())))

    def results(self, model_dir: Path, benchmarks, settings) -> dict:
        """The evaluation runner's full results (per-problem records) of ``model_dir`` on ``benchmarks`` (JSONL
        paths, or ``{name: [PromptExample]}``) with ``settings`` (an ``EvalSettings``)."""
        return self.models.results(model_dir, benchmarks, settings)


def demo_sidecar(pipeline_cfg, *, max_model_len: int, log_path: Path) -> OneSidecarEvaluator:
    """One float32 sidecar for a demo run: its training stages (where ``shared_sidecar_options`` allows) and its
    evaluations (``max_model_len`` at least), so vLLM starts once per run instead of once per stage."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    options = shared_sidecar_options(pipeline_cfg)
    if options is None or options["dtype"] != "float32":
        options = {"dtype": "float32", "max_model_len": 0}
    return OneSidecarEvaluator(log_path=log_path, **{**options, "max_model_len": max(options["max_model_len"],
                                                                                      max_model_len)})
