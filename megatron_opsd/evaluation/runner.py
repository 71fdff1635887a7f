"""Benchmark evaluation: prompts through the model's chat template, generation on a rollout sidecar, grading.

``evaluate(client, tokenizer, benchmarks, settings)`` is the reusable core: the ``megatron-opsd eval``
command calls it against a sidecar it starts (or one given by URL), and the trainer's ``eval_every`` can
call it against its own sidecar after a weight push. It returns a plain results dict (JSON-serialisable):
per benchmark the summary metrics, the per-prompt records and every sample, so a later baseline
comparison (``report.compare_to_baseline``) can pair prompts by id.
"""
from __future__ import annotations

import functools
import importlib.resources
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from megatron_opsd.config import SAMPLING_RANGES, DataConfig, SamplingConfig
from megatron_opsd.data.contexts import student_messages
from megatron_opsd.data.datasets import PromptExample, load_prompt_dataset
from megatron_opsd.evaluation.grading import grade_samples, summarize_grades
from megatron_opsd.evaluation.report import save_results
from megatron_opsd.models.tokenizer import load_tokenizer
from megatron_opsd.rewards.boxed import extract_boxed_answer
from megatron_opsd.rollout.client import SidecarClient, start_sidecar_process

# Built-in benchmarks: name -> file under the data directory (shipped in the package, see data/README.md).
BENCHMARKS: dict[str, str] = {
    "math500": "math500/test.jsonl",
    "aime24": "aime24/test.jsonl",
    "amc23": "amc23/test.jsonl",
}
# Their stable prompt ids (used to pair prompts with a baseline run); other files use data.id_field or the row.
BENCHMARK_ID_FIELDS: dict[str, str] = {"math500": "unique_id", "aime24": "id", "amc23": "id"}
GROUP_KEYS = ("level", "subject")  # MATH-500 columns reported as accuracy-by-group when present


DATA_DIR_ENV = "OPSD_DATA_DIR"  # another copy of the benchmark files (same layout as the packaged one)


def packaged_data_dir() -> Path:
    """The benchmark files shipped inside the package (``megatron_opsd/evaluation/data``), found through
    importlib.resources so a wheel install, an editable install and a source checkout all read the same copy."""
    return Path(str(importlib.resources.files("megatron_opsd.evaluation") / "data"))


def default_data_dir() -> Path:
    """``$OPSD_DATA_DIR`` when set, else the packaged copy."""
    return Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else packaged_data_dir()


DEFAULT_MAX_TOKENS = 1024  # eval's response budget, lowered to fit the model's context (fitting_max_tokens)


@dataclass
class EvalSettings(SamplingConfig):
    """One evaluation: the sampling (``config.SamplingConfig``'s fields; here by default temperature 0.6, top_p
    0.95), the prompts and the grading."""

    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0  # prompt i of a benchmark samples with seed + i (independent of batching)
    enable_thinking: Optional[bool] = None  # chat template switch; None = the template's default
    boxed_only: bool = True  # only the last \boxed{} of a response is graded
    limit: Optional[int] = None  # first N prompts of each benchmark
    prompts_per_request: int = 8  # generation batch (the progress bar advances per batch)
    save_text: bool = False  # keep every response's text in the results (large for real runs)
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)  # prompt template, system prompt, field names

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n: {self.n} samples per prompt; must be >= 1")
        for name, (ok, text) in SAMPLING_RANGES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{name}: {value}; must be {text}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: {self.limit}; must be >= 1 (or None for every prompt)")
        if self.prompts_per_request < 1:
            raise ValueError(f"prompts_per_request: {self.prompts_per_request}; must be >= 1")


def resolve_benchmarks(spec: Union[str, Sequence[str]], data_dir: Optional[Union[str, Path]] = None
                       ) -> dict[str, Path]:
    """``"math500,aime24,my.jsonl"`` -> {name: file}. A name is a built-in benchmark; anything ending in
    .jsonl/.parquet (or an existing file) is a user dataset named after its file stem."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if not items:
        raise ValueError("benchmarks: empty; give e.g. --benchmarks math500,aime24,amc23 or a JSONL path")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    out: dict[str, Path] = {}
    for item in items:
        if item in BENCHMARKS:
            name, path = item, root / BENCHMARKS[item]
            if not path.is_file():
                where = (f"--data-dir {data_dir}" if data_dir is not None else
                         f"{DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]}" if os.environ.get(DATA_DIR_ENV) else
                         "the packaged copy (reinstall megatron-opsd)")
                raise FileNotFoundError(f"benchmark {item!r}: {path} does not exist (data directory from {where}); "
                                        f"point --data-dir or {DATA_DIR_ENV} at a folder holding {BENCHMARKS[item]}, "
                                        "or unset both to use the copy shipped with the package")
        elif item.endswith((".jsonl", ".json", ".ndjson", ".parquet", ".pq")) or Path(item).is_file():
            name, path = Path(item).stem, Path(item)
            if path.name == "test.jsonl" or name in out:  # e.g. other/math500/test.jsonl
                name = f"{path.parent.name}_{name}"
            if not path.is_file():
                raise FileNotFoundError(f"benchmark file {item!r} does not exist (looked at {path.resolve()})")
        else:
            raise ValueError(f"unknown benchmark {item!r}; choose from {sorted(BENCHMARKS)} or give a path to a JSONL "
                             "file with 'problem' and 'answer' fields")
        if name in out:
            raise ValueError(f"benchmark {name!r} given twice")
        out[name] = path
    return out


def load_benchmark(path: Union[str, Path], data_cfg: DataConfig, limit: Optional[int] = None
                   ) -> list[PromptExample]:
    """Rows with a prompt (``data.prompt_field``) and a gold answer (``data.answer_field``), both required."""
    examples = load_prompt_dataset(path, data_cfg)
    missing = [ex.id for ex in examples if ex.answer is None or not ex.answer.strip()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} row(s) have no {data_cfg.answer_field!r} field (data.answer_field), "
                         f"e.g. row {missing[0]}; evaluation grades against it")
    return examples[:limit] if limit is not None else examples


def pass_at_k_values(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n (and n itself)."""
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)]
    return ks if ks[-1] == n else ks + [n]


def default_grader(boxed_only: bool) -> Callable[[Sequence[str], Sequence[str]], list[bool]]:
    """math-verify on the last \\boxed{} (``boxed_only``), in this process's main thread (see rewards.math)."""
    return functools.partial(grade_samples, verifier="math", boxed_only=boxed_only)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, disable=not enabled)


def chat_prompts(tokenizer, examples: list[PromptExample], settings: EvalSettings) -> list[list[int]]:
    """The chat-formatted prompt ids the sidecar is sent."""
    return [tokenizer.apply_chat_template(student_messages(ex, settings.data), add_generation_prompt=True,
                                          enable_thinking=settings.enable_thinking) for ex in examples]


def fitting_max_tokens(context: int, tokenizer, benchmarks: dict, settings: EvalSettings,
                       cap: int = DEFAULT_MAX_TOKENS) -> int:
    """The response budget that fits every prompt of ``benchmarks`` ({name: path}) into ``context`` tokens (vLLM
    refuses a request whose prompt + max_tokens exceeds its max_model_len: HTTP 422), at most ``cap``."""
    longest = max(len(p) for path in benchmarks.values()
                  for p in chat_prompts(tokenizer, load_benchmark(path, settings.data, settings.limit), settings))
    if context - longest < 1:
        raise ValueError(f"--max-model-len: the model's context of {context} tokens holds no response after the "
                         f"longest prompt ({longest} tokens); raise --max-model-len or shorten the prompts")
    return min(cap, context - longest)


def generate_benchmark(client, tokenizer, examples: list[PromptExample], settings: EvalSettings,
                       desc: str = "eval") -> tuple[list[list[int]], list[list[Any]]]:
    """Chat-formatted prompt ids and the sidecar's samples (n per prompt), in batches with a progress bar."""
    prompts = chat_prompts(tokenizer, examples, settings)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    samples: list[list[Any]] = []
    step = settings.prompts_per_request
    with _progress(len(prompts), desc, settings.progress) as bar:
        for lo in range(0, len(prompts), step):
            samples += client.generate(prompts[lo:lo + step], sampling=settings, stop_token_ids=stop,
                                       seed=settings.seed + lo)
            bar.update(min(step, len(prompts) - lo))
    return prompts, samples


def evaluate_examples(client, tokenizer, examples: list[PromptExample], settings: EvalSettings,
                      grader: Optional[Callable] = None, name: str = "eval") -> dict:
    """Generate, grade and summarise one benchmark; see ``summarize`` for the keys."""
    grader = grader or default_grader(settings.boxed_only)
    start = time.perf_counter()
    prompts, samples = generate_benchmark(client, tokenizer, examples, settings, desc=name)
    gen_s = time.perf_counter() - start
    texts = [s.text if s.text else tokenizer.decode(s.token_ids, skip_special_tokens=True)
             for group in samples for s in group]
    golds = [ex.answer for ex, group in zip(examples, samples) for _ in group]
    correct = grader(texts, golds)
    records, flat = [], iter(zip(texts, correct))
    for ex, prompt, group in zip(examples, prompts, samples):
        prompt_rec = {"id": ex.id, "gold": ex.answer, "prompt_tokens": len(prompt), "samples": []}
        prompt_rec.update({k: ex.extra[k] for k in GROUP_KEYS if ex.extra.get(k) is not None})
        for j, s in enumerate(group):
            text, ok = next(flat)
            rec = {"index": j, "tokens": len(s.token_ids), "finish_reason": s.finish_reason,
                   "truncated": s.finish_reason == "length", "answer": extract_boxed_answer(text),
                   "correct": bool(ok)}
            if settings.save_text:
                rec["text"] = text
            prompt_rec["samples"].append(rec)
        records.append(prompt_rec)
    result = summarize(records, settings.n)
    result["generation_s"] = gen_s
    result["grading_s"] = time.perf_counter() - start - gen_s
    return result


def summarize(prompts: list[dict], n: int) -> dict:
    """Metrics of per-prompt records (each with ``samples``: tokens, truncated, correct): accuracy (mean over
    samples), unbiased pass@k, response-token mean/median/p90, the share truncated at max tokens, and per
    MATH level / subject (where the rows carry them) accuracy, prompt count and mean tokens."""
    samples = [s for p in prompts for s in p["samples"]]
    sizes = [len(p["samples"]) for p in prompts]
    keys = {k: [p.get(k) for p in prompts] for k in GROUP_KEYS if all(k in p for p in prompts)}
    out = {"num_prompts": len(prompts), "num_samples": len(samples), "n": n}
    out.update(summarize_grades([s["correct"] for s in samples], sizes, [s["tokens"] for s in samples],
                                [s["truncated"] for s in samples], group_keys=keys, ks=pass_at_k_values(n)))
    for key, groups in out["by"].items():
        for group, entry in groups.items():
            members = [p for p in prompts if str(p[key]) == group]
            tokens = [s["tokens"] for p in members for s in p["samples"]]
            entry.update(num_prompts=len(members), mean_tokens=sum(tokens) / len(tokens))
    out["prompts"] = prompts
    return out


def evaluate(client, tokenizer, benchmarks: Union[str, Sequence[str], dict], settings: EvalSettings,
             data_dir: Optional[Union[str, Path]] = None, grader: Optional[Callable] = None,
             model: Optional[str] = None) -> dict:
    """Evaluate on each benchmark: a spec (``"math500,aime24"``), names/paths, or {name: [PromptExample]}.

    Returns ``{"model", "settings", "benchmarks": {name: summary}}``, JSON-serialisable.
    """
    if isinstance(benchmarks, dict) and all(isinstance(v, list) for v in benchmarks.values()):
        loaded = {name: (None, exs[:settings.limit] if settings.limit else exs) for name, exs in benchmarks.items()}
    else:
        loaded = {}
        for name, path in resolve_benchmarks(benchmarks, data_dir).items():
            data_cfg = settings.data
            if name in BENCHMARK_ID_FIELDS and data_cfg.id_field is None:
                data_cfg = replace(data_cfg, id_field=BENCHMARK_ID_FIELDS[name])
            loaded[name] = (path, load_benchmark(path, data_cfg, settings.limit))
    grader = grader or default_grader(settings.boxed_only)
    results = {"model": model, "settings": _settings_dict(settings), "benchmarks": {}}
    for name, (path, examples) in loaded.items():
        try:
            res = evaluate_examples(client, tokenizer, examples, settings, grader=grader, name=name)
        except Exception as err:
            err.partial_results = results  # the benchmarks finished before this one: the caller keeps them
            raise
        res["path"] = None if path is None else str(path)
        results["benchmarks"][name] = res
    return results


class OneSidecarEvaluator:
    """Several HF directories of one architecture on one local sidecar: it starts on the first directory served,
    and each further directory's weights are pushed to it (the trainer's weight-update path, as a restore to version
    0: what a sidecar started on that directory serves) instead of starting vLLM again (20-45 s on CPU; minutes
    for a large model on GPUs). Evaluations use it, and a pipeline lends it to its training stages (``lend``).
    ``sidecar_options`` become the sidecar's flags (e.g. ``dtype="float32", max_model_len=512``); use as a context
    manager."""

    def __init__(self, *, log_path: Optional[Union[str, Path]] = None, **sidecar_options: Any):
        self.log_path, self.sidecar_options = log_path, sidecar_options
        self.sidecar = self.client = None
        self.loaded: Optional[Path] = None  # the directory whose weights it serves (None: a borrower's)

    def __enter__(self) -> "OneSidecarEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self.sidecar is not None:
            self.sidecar.stop()

    def serve(self, model_dir: Union[str, Path]) -> SidecarClient:
        """The client of the sidecar, now serving ``model_dir``'s weights as version 0."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        if self.sidecar is None:
            self.sidecar = start_sidecar_process(model_dir, log_path=self.log_path, **self.sidecar_options)
            self.client = SidecarClient(self.sidecar.url, timeout_s=3600.0)
        elif self.loaded != model_dir:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{model_dir}: no *.safetensors weights to evaluate")
            tensors = (item for f in files for item in load_file(str(f)).items())
            self.client.push_weights_from_iterator(tensors, version=0, restore=True)
        self.loaded = model_dir
        return self.client

    def offers(self, options: dict) -> bool:
        """Whether its flags are ``options`` (what a stage's own sidecar would get), with at least their model
        length."""
        mine = self.sidecar_options
        return all(mine.get(k) == v for k, v in options.items() if k != "max_model_len") and \
            (mine.get("max_model_len") or 0) >= options.get("max_model_len", 0)

    def lend(self, model_dir: Union[str, Path]) -> str:
        """The sidecar's URL, serving ``model_dir``'s weights at version 0, for a training stage started on that
        directory: it pushes its own versions from 1 on, so the next ``serve`` pushes again."""
        self.serve(model_dir)
        self.loaded = None
        return self.sidecar.url

    def results(self, model_dir: Union[str, Path], benchmarks: Union[str, Sequence[str], dict],
                settings: EvalSettings, *, data_dir: Optional[Union[str, Path]] = None) -> dict:
        """``evaluate`` (full results) of ``model_dir`` on ``benchmarks`` with ``settings``."""
        client = self.serve(model_dir)
        return evaluate(client, load_tokenizer(str(model_dir)), benchmarks, settings, data_dir=data_dir,
                        model=str(model_dir))


def evaluate_model_dir(model_dir: Union[str, Path], benchmarks: Union[str, Sequence[str], dict],
                       settings: EvalSettings, *, data_dir: Optional[Union[str, Path]] = None,
                       sidecar_urls: Optional[Sequence[str]] = None, log_path: Optional[Union[str, Path]] = None,
                       **sidecar_options: Any) -> dict:
    """``evaluate`` an HF directory on running sidecar(s) serving it, or on a local sidecar started for it
    (``sidecar_options`` become its flags, e.g. ``dtype="float32", max_model_len=512``) and stopped after."""
    if not sidecar_urls:
        with OneSidecarEvaluator(log_path=log_path, **sidecar_options) as local:
            return local.results(model_dir, benchmarks, settings, data_dir=data_dir)
    with SidecarClient(list(sidecar_urls), timeout_s=3600.0) as client:
        return evaluate(client, load_tokenizer(str(model_dir)), benchmarks, settings, data_dir=data_dir,
                        model=str(model_dir))


def _settings_dict(settings: EvalSettings) -> dict:
    d = asdict(settings)
    d["data"] = {k: v for k, v in d["data"].items()
                 if k in ("prompt_field", "answer_field", "id_field", "system_prompt", "prompt_template")}
    return d


def training_eval_settings(cfg) -> EvalSettings:
    """Evaluation settings inside training (``train.eval_every``): one sample per held-out prompt with the
    rollout's sampling and token budget, a fixed seed (every evaluation sees the same draws, so steps are
    comparable), the training prompt template and thinking switch; grading as ``reward.boxed_only``."""
    return EvalSettings(**{**cfg.rollout.request_fields(), "n": 1}, seed=cfg.rollout.seed,
                        enable_thinking=cfg.model.enable_thinking, boxed_only=cfg.reward.boxed_only,
                        progress=False, data=cfg.data)  # data.limit, if set, already cuts the file


def evaluate_for_training(client, tokenizer, cfg, step: int, out_dir: Optional[Union[str, Path]] = None
                          ) -> dict[str, float]:
    """The trainer's ``eval_every`` hook (call on rank 0, main thread, after the step's weight push):
    evaluate ``data.eval_path`` on the sidecar's current weights and return scalars to log, prefixed
    ``eval/``; with ``out_dir`` the full results go to ``out_dir/step-<step>.json`` as well."""
    if not cfg.data.eval_path:
        raise ValueError("train.eval_every > 0 needs data.eval_path (a held-out JSONL with problem/answer fields)")
    settings = training_eval_settings(cfg)
    results = evaluate(client, tokenizer, [cfg.data.eval_path], settings, model=f"step {step}")
    bench = next(iter(results["benchmarks"].values()))
    if out_dir is not None:
        save_results(results, Path(out_dir) / f"step-{step}.json")
    scalars = {"eval/accuracy": bench["accuracy"], "eval/truncated_share": bench["tokens"]["truncated_share"],
               "eval/response_length/mean": bench["tokens"]["mean"],
               "eval/response_length/median": bench["tokens"]["median"],
               "eval/response_length/p90": bench["tokens"]["p90"]}
    for level, entry in bench["by"].get("level", {}).items():
        scalars[f"eval/accuracy/level_{level}"] = entry["accuracy"]
        scalars[f"eval/response_length/level_{level}"] = entry["mean_tokens"]
    return scalars
