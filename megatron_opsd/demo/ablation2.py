"""`megatron-opsd demo --ablation hindsight`: the compression ablation's second protocol (issue 28, docs/ablation2.md).

Per chain (independent seeds): prepare (``demo/path_task.py``: an early choice between two valid paths, a
reference with the method and the answer only, a teacher not taught to be concise) -> ``sft`` -> ``rlvr`` -> one
OPSD arm per loss (JSD beta = 0.5 token mean: OPSD's; reverse KL token mean) x filter (all / correct /
incorrect), every arm on the same budget (``rollout.max_kept`` rollouts per step, prompts oversampled by the
chain's RLVR accuracy: :func:`prompts_per_step`). Then every model on one sidecar, the mechanism check
(``demo/hindsight_check.py``), hierarchical bootstrap CIs (chains, then problems) with per-chain values, and the
verdict (:func:`verdict`, fixed before any run). Writes ``results.json``, ``table.md``, ``curves.png`` and per chain
``chain-<c>/stages/<stage>/metrics.jsonl`` under the run directory.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_opsd.demo import ablation, hindsight_check, path_task, report
from megatron_opsd.demo.evaluate import demo_sidecar
from megatron_opsd.demo.prepare import DemoInputs
from megatron_opsd.demo.run import DemoArgumentError, StageClock, clear_run_dir, resolve_run, stage_config_objects
from megatron_opsd.demo.task import read_jsonl
from megatron_opsd.evaluation.runner import OneSidecarEvaluator
from megatron_opsd.pipeline import run_pipeline

LOSSES = ("jsd", "reverse_kl")  # OPSD's generalized JSD (beta 0.5): the primary arms; reverse KL: secondary
FILTERS = ("all", "correct", "incorrect")
_OWNED = ("chains", "eval", "results.json", "table.md", "curves.png")


@dataclass(frozen=True)
class HindsightRecipe:
    n_train: int = 4000
    n_test: int = 200
    curve_prompts: int = 100
    task_steps: int = 5
    max_value: int = 12
    chains: tuple = (0, 1, 2)  # independent SFT -> RLVR chains (init, SFT mixture, data order, rollouts)
    sft_steps: int = 450
    rlvr_steps: int = 20
    rlvr_lr: float = 1e-4
    opsd_steps: int = 30
    eval_every: int = 10
    losses: tuple = LOSSES
    filters: tuple = FILTERS
    kept_per_step: int = 16  # K: rollouts trained on per step, every arm
    group_size: int = 4  # rollouts per prompt (groups can hold both correct and incorrect ones)
    oversample: float = 1.25  # prompts per step = ceil(oversample * K / (n * expected keep rate)) ...
    max_prompts: int = 16  # ... at most this many
    sampled_n: int = 2  # samples per held-out problem at T = 1
    max_tokens: int = 384
    n_boot: int = 2000
    nproc: int = 1

    # the model's context: the reference prompt (data.max_prompt_tokens 192) + a 384-token rollout, and the
    # evaluation's max_tokens + 256, exceed the demo model's 512 positions (the first full run stopped there)
    max_position_embeddings: int = 1024

    def demo_recipe(self):
        """The demo recipe with this task size (as the first protocol's) and this protocol's model context."""
        return replace(ablation.AblationRecipe.demo_recipe(self), max_position_embeddings=self.max_position_embeddings)

    # the JSON form: as the first protocol's recipe
    to_dict = ablation.AblationRecipe.to_dict


FULL = HindsightRecipe()
# CI (tests/test_demo_ablation2.py): the machinery on one chain with every stage a few steps long; no effect.
QUICK = replace(FULL, n_train=400, n_test=24, curve_prompts=8, chains=(0,), sft_steps=30, rlvr_steps=1,
                opsd_steps=2, eval_every=2, losses=("jsd",), filters=("correct", "incorrect"), kept_per_step=4,
                max_prompts=4, sampled_n=1, max_tokens=160, n_boot=200)


# ------------------------------------------------------------------------------------------------ statistics

def hierarchical_ci(chains: Sequence[np.ndarray], statistic: Callable[[np.ndarray], float], n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the mean over chains of ``statistic`` (of a chain's problems x columns array): each
    replicate draws chains with replacement, then within each drawn chain its problems with replacement."""
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        drawn = [chains[c] for c in rng.integers(0, len(chains), len(chains))]
        stats[b] = np.mean([statistic(v[rng.integers(0, len(v), len(v))]) for v in drawn])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(lo), float(hi)


def chain_metric(chains: Sequence[np.ndarray], statistic: Callable[[np.ndarray], float], n_boot: int) -> dict:
    """``{"value": mean over chains, "ci": hierarchical CI, "per_chain": [...]}``."""
    per_chain = [float(statistic(v)) for v in chains]
    return {"value": float(np.mean(per_chain)), "ci": hierarchical_ci(chains, statistic, n_boot),
            "per_chain": per_chain}


def change(after: Sequence[tuple], before: Sequence[tuple], n_boot: int) -> dict:
    """Per chain paired (same problems) change from ``before`` to ``after`` ((correct, tokens) per chain):
    accuracy difference and relative change of mean tokens, each with a hierarchical CI and per-chain values."""
    cols = [ablation.paired_columns(a, b) for a, b in zip(after, before)]
    both = [c[0] for c in cols]
    _, d_acc, d_tok = cols[0]
    return {"accuracy": chain_metric(both, d_acc, n_boot), "tokens_relative": chain_metric(both, d_tok, n_boot)}


# ------------------------------------------------------------------------------------------------ verdict

def _in(ci, lo, hi) -> bool:
    return lo < ci[0] and ci[1] < hi


def verdict(evidence: dict) -> dict:
    """The protocol's verdict rules (docs/ablation2.md, fixed before any run): ``evidence`` holds
    ``rlvr_accuracy`` (mean over chains, sampled), ``budget_share`` per filter (the lowest kept / (K x steps) over
    the chains), ``peak_at_first_wrong`` (share of incorrect RLVR rollouts whose JSD peaks at the first wrong
    token, or None), ``change`` per filter (sampled accuracy and tokens_relative vs RLVR, each value and CI) and
    ``ordering`` (correct-only minus incorrect-only accuracy, value and CI). Returns per claim
    ``{"claim", "outcome": reproduced | refuted | inconclusive, "reason"}``."""
    out = {}
    regime = 0.30 <= evidence["rlvr_accuracy"] <= 0.90
    regime_reason = (f"RLVR sampled accuracy {evidence['rlvr_accuracy']:.2f} is outside [0.30, 0.90]: not the "
                     "regime the claim is about")

    def budget(*filters) -> Optional[str]:
        short = [f for f in filters if evidence["budget_share"].get(f, 0.0) < 0.9]
        return f"budget not matched: {', '.join(short)} kept < 90% of K x steps" if short else None

    def decide(claim, filters, reproduced, refuted, why, extra_block=None):
        block = (None if regime else regime_reason) or budget(*filters) or extra_block
        if block:
            return {"claim": claim, "outcome": "inconclusive", "reason": block}
        outcome = "reproduced" if reproduced else "refuted" if refuted else "inconclusive"
        return {"claim": claim, "outcome": outcome, "reason": why}

    c = evidence["change"].get("correct")
    if c is not None:
        acc, tok = c["accuracy"], c["tokens_relative"]
        out["correct_only"] = decide(
            "correct-only keeps accuracy (change >= -2 pts, CI low >= -5 pts) and shortens (<= -10%, CI < 0)",
            ("correct",),
            acc["value"] >= -0.02 and acc["ci"][0] >= -0.05 and tok["value"] <= -0.10 and tok["ci"][1] < 0,
            acc["ci"][1] < -0.02 or tok["ci"][0] > -0.05,
            f"accuracy {100 * acc['value']:+.1f} pts [{100 * acc['ci'][0]:+.1f}, {100 * acc['ci'][1]:+.1f}], tokens "
            f"{100 * tok['value']:+.1f}% [{100 * tok['ci'][0]:+.1f}, {100 * tok['ci'][1]:+.1f}]")
    i = evidence["change"].get("incorrect")
    if i is not None:
        acc, tok = i["accuracy"], i["tokens_relative"]
        peak = evidence.get("peak_at_first_wrong")
        attributable = (f"the errors are attributable at one token ({100 * peak:.0f}% of incorrect RLVR rollouts peak "
                        "at the first wrong token, >= 50%): the regime where OPSD corrects"
                        if peak is not None and peak >= 0.5 else None)
        out["incorrect_only"] = decide(
            "incorrect-only lowers accuracy (CI < 0) with little change in length (CI inside +-10%)",
            ("incorrect",),
            acc["ci"][1] < 0 and _in(tok["ci"], -0.10, 0.10),
            acc["ci"][0] > 0 or tok["ci"][1] < -0.10 or tok["ci"][0] > 0.10,
            f"accuracy {100 * acc['value']:+.1f} pts [{100 * acc['ci'][0]:+.1f}, {100 * acc['ci'][1]:+.1f}], tokens "
            f"{100 * tok['value']:+.1f}% [{100 * tok['ci'][0]:+.1f}, {100 * tok['ci'][1]:+.1f}]", attributable)
    o = evidence.get("ordering")
    if o is not None:
        out["ordering"] = decide(
            "correct-only ends more accurate than incorrect-only (paired CI > 0)", ("correct", "incorrect"),
            o["ci"][0] > 0, o["ci"][1] < 0,
            f"difference {100 * o['value']:+.1f} pts [{100 * o['ci'][0]:+.1f}, {100 * o['ci'][1]:+.1f}]")
    return out


# ----------------------------------------------------------------------------------------------- pipeline

def resolve_hindsight(args):
    """(recipe, run_dir, config_dir) of ``megatron-opsd demo --ablation hindsight [--quick] [--name | --out]
    [--filters] [--nproc] [--config-dir]``; bad values raise DemoArgumentError naming the flag."""
    if args.seed != 0:
        raise DemoArgumentError("--seed does not apply to --ablation hindsight: its chains' seeds are part of the "
                                f"protocol ({list(FULL.chains)}); omit --seed")
    name = args.name or ("demo-hindsight-quick" if args.quick else "demo-hindsight")
    return resolve_run(args, QUICK if args.quick else FULL, name, FILTERS, ("sft", "grpo", "opsd_reference"))


def chain_dir(run_dir: Path, chain: int) -> Path:
    return Path(run_dir) / "chains" / f"chain-{chain}"


def arm_name(loss: str, filt: str) -> str:
    return f"opsd-{loss}-{filt}"


def prompts_per_step(filt: str, rlvr_accuracy: float, recipe: HindsightRecipe) -> int:
    """Prompts per step that give about ``oversample`` x K rollouts the filter keeps, from the RLVR model's
    rollout accuracy p: rate 1 (all), p (correct), 1 - p (incorrect); at most ``max_prompts``."""
    rate = {"all": 1.0, "correct": rlvr_accuracy, "incorrect": 1.0 - rlvr_accuracy}[filt]
    want = math.ceil(recipe.oversample * recipe.kept_per_step / (recipe.group_size * max(rate, 1e-6)))
    return max(math.ceil(recipe.kept_per_step / recipe.group_size), min(recipe.max_prompts, want))


def rlvr_accuracy(metrics_path: Path, last: int = 5) -> float:
    """The RLVR run's rollout accuracy, mean of its last ``last`` steps."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    acc = [r["rollout/accuracy"] for r in rows if "rollout/accuracy" in r][-last:]
    return float(np.mean(acc)) if acc else 0.5


def hindsight_pipeline(recipe: HindsightRecipe, run_dir: Path, config_dir: Path, chain: int,
                       accuracy: float = 0.5):
    """One chain's stages; the arms' prompts per step follow the RLVR model's rollout accuracy ``accuracy``."""
    cdir = chain_dir(run_dir, chain)
    arms = [ablation.reference_opsd_stage(
        arm_name(loss, f), recipe, cdir, config_dir, chain, f,
        [f"loss.divergence={loss}", "loss.beta=0.5", "loss.reduction=token_mean", f"rollout.n={recipe.group_size}",
         f"rollout.prompts_per_step={prompts_per_step(f, accuracy, recipe)}",
         f"rollout.max_kept={recipe.kept_per_step}"])
        for loss in recipe.losses for f in recipe.filters]
    return ablation.chain_pipeline(f"{Path(run_dir).name}-chain-{chain}", recipe, cdir, config_dir, chain, arms)


def prepare_chain(run_dir: Path, recipe: HindsightRecipe, chain: int) -> DemoInputs:
    """The chain's inputs: the shared problems (seed 0) and tokenizer corpus (seed 0: one tokenizer for every
    chain, so one sidecar evaluates them all), the chain's own SFT mixture and random init (seed ``chain``)."""
    train, test = path_task.generate_splits(recipe.demo_recipe().task_config(0))
    return ablation.write_inputs(chain_dir(run_dir, chain), recipe, train, test,
                                 path_task.build_sft_mixture(train, seed=chain), path_task.tokenizer_corpus(train, 0),
                                 chain)


def budget_counts(metrics_path: Path, kept_per_step: int) -> dict:
    """Over an arm's run: rollouts generated, correct, kept by the filter and trained on (after the cap),
    steps, steps short of K, empty steps (nothing trained), the mean share of mixed groups, and what was trained
    on as a share of K x steps."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    trained = [r.get("rollout/num_trained", 0.0) for r in rows]
    out = {"steps": len(rows), "generated": sum(r.get("rollout/num_rollouts", 0.0) for r in rows),
           "correct": sum(round(r.get("rollout/accuracy", 0.0) * r.get("rollout/num_rollouts", 0.0)) for r in rows),
           "kept_by_filter": sum(r.get("rollout/num_kept", 0.0) for r in rows), "trained": sum(trained),
           "trained_per_step": trained, "short_steps": sum(t < kept_per_step for t in trained),
           "empty_steps": sum(t == 0 for t in trained),
           "groups_mixed": float(np.mean([r.get("rollout/groups_mixed", 0.0) for r in rows])) if rows else 0.0}
    out["budget_share"] = out["trained"] / (kept_per_step * len(rows)) if rows else 0.0
    return out


# --------------------------------------------------------------------------------------------- evaluation

def _models(recipe: HindsightRecipe, run_dir: Path) -> tuple[dict, dict]:
    models, refs = {}, {}
    for c in recipe.chains:
        stages = chain_dir(run_dir, c) / "stages"
        models.update({f"c{c}-sft": stages / "sft" / "hf", f"c{c}-rlvr": stages / "rlvr" / "hf"})
        models.update({f"c{c}-{arm_name(loss, f)}": stages / arm_name(loss, f) / "hf"
                       for loss in recipe.losses for f in recipe.filters})
        refs[f"c{c}-rlvr_reference_prompt"] = stages / "rlvr" / "hf"
    return models, refs


def mechanism(recipe: HindsightRecipe, run_dir: Path) -> dict:
    """Per chain: the check on the RLVR model's sampled held-out rollouts (before; every sampled pass) and on
    each arm's (after; the first sampled pass, one rollout per problem, to fit the CPU budget), the teacher always
    the chain's RLVR model shown the reference."""
    models, _ = _models(recipe, run_dir)
    eval_dir = run_dir / "eval"
    out = {}
    for c in recipe.chains:
        examples = read_jsonl(DemoInputs.under(chain_dir(run_dir, c)).test)
        teacher = models[f"c{c}-rlvr"]
        out[f"c{c}"] = {}
        for name in ["rlvr"] + [arm_name(loss, f) for loss in recipe.losses for f in recipe.filters]:
            passes = range(recipe.sampled_n) if name == "rlvr" else range(1)
            files = [eval_dir / f"c{c}-{name}_sampled{k}.json" for k in passes]
            out[f"c{c}"][name] = hindsight_check.analyse(models[f"c{c}-{name}"], teacher,
                                                         hindsight_check.rollout_records(files, examples))
    return out


# ------------------------------------------------------------------------------------------------ summary

def summarize(recipe: HindsightRecipe, arrays: dict, budgets: dict, mech: dict, rlvr_p: dict) -> dict:
    """Rows with hierarchical CIs and per-chain values, the arms' changes vs RLVR, the budget, the mechanism
    check and the verdict per loss."""
    chains = [f"c{c}" for c in recipe.chains]
    names = ["sft", "rlvr", "rlvr_reference_prompt"] + [arm_name(loss, f) for loss in recipe.losses
                                                          for f in recipe.filters]
    rows = {}
    for name in names:
        rows[name] = {}
        for mode in arrays[f"{chains[0]}-{name}"]:
            per = [arrays[f"{c}-{name}"][mode] for c in chains]
            rows[name][mode] = {"accuracy": chain_metric([p[0] for p in per], ablation.sample_mean, recipe.n_boot),
                                "mean_tokens": chain_metric([p[1] for p in per], ablation.sample_mean, recipe.n_boot)}
    rlvr = [arrays[f"{c}-rlvr"]["sampled"] for c in chains]
    verdicts = {}
    for loss in recipe.losses:
        changes = {}
        for f in recipe.filters:
            after = [arrays[f"{c}-{arm_name(loss, f)}"]["sampled"] for c in chains]
            changes[f] = rows[arm_name(loss, f)]["change_vs_rlvr"] = change(after, rlvr, recipe.n_boot)
        ordering = None
        if {"correct", "incorrect"} <= set(recipe.filters):
            ordering = change([arrays[f"{c}-{arm_name(loss, 'correct')}"]["sampled"] for c in chains],
                              [arrays[f"{c}-{arm_name(loss, 'incorrect')}"]["sampled"] for c in chains],
                              recipe.n_boot)["accuracy"]
        peaks = [mech[c]["rlvr"]["peak_at_first_wrong"] for c in chains if mech[c]["rlvr"]["peak_at_first_wrong"]
                 is not None]
        evidence = {"rlvr_accuracy": rows["rlvr"]["sampled"]["accuracy"]["value"],
                    "budget_share": {f: min(budgets[c][arm_name(loss, f)]["budget_share"] for c in chains)
                                     for f in recipe.filters},
                    "peak_at_first_wrong": float(np.mean(peaks)) if peaks else None,
                    "change": {f: {k: {"value": v["value"], "ci": v["ci"]} for k, v in ch.items()}
                               for f, ch in changes.items()},
                    "ordering": ordering and {"value": ordering["value"], "ci": ordering["ci"]}}
        verdicts[loss] = {"evidence": evidence, "claims": verdict(evidence)}
    return {"rows": rows, "budgets": budgets, "rlvr_rollout_accuracy": rlvr_p, "mechanism": mech,
            "verdict": verdicts, "primary_loss": recipe.losses[0]}


def _cell(m: dict, pct: bool, unit: str = "%") -> str:
    scale, unit = (100.0, unit) if pct else (1.0, "")
    v, (lo, hi) = m["value"], m["ci"]
    chains = ", ".join(f"{scale * x:.1f}" for x in m["per_chain"])
    return f"{scale * v:.1f}{unit} [{scale * lo:.1f}, {scale * hi:.1f}] (chains {chains})"


def results_table(summary: dict) -> str:
    """Markdown: the models (hierarchical CIs, per-chain values), the arms' budgets, the mechanism check and the
    verdicts."""
    lines = ["| model | greedy accuracy | sampled accuracy | sampled mean tokens | sampled change vs RLVR: accuracy, "
             "tokens |", "|---|---|---|---|---|"]
    for name, row in summary["rows"].items():
        s = row.get("sampled")
        cells = [_cell(row["greedy"]["accuracy"], True), _cell(s["accuracy"], True) if s else "n/a",
                 _cell(s["mean_tokens"], False) if s else "n/a"]
        ch = row.get("change_vs_rlvr")
        cells.append(f"{_cell(ch['accuracy'], True, ' pts')}, {_cell(ch['tokens_relative'], True)}" if ch else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| chain / arm | prompts per step | trained / K x steps | steps short of K | empty steps | mixed "
                  "groups | kept by filter / generated |", "|---|---|---|---|---|---|---|"]
    for c, arms in summary["budgets"].items():
        for arm, b in arms.items():
            lines.append(f"| {c} {arm} | {b.get('prompts_per_step', '')} | {b['trained']:.0f} "
                         f"({100 * b['budget_share']:.0f}%) | {b['short_steps']} | {b['empty_steps']} | "
                         f"{100 * b['groups_mixed']:.0f}% | {b['kept_by_filter']:.0f} / {b['generated']:.0f} |")
    lines += ["", "| chain / model | incorrect rollouts (located) | JSD peak at first wrong token (chance) | peak in "
                  "answer | JSD detour / value / answer / other: correct | ... incorrect |",
              "|---|---|---|---|---|---|"]

    def fmt(x):
        return "n/a" if x is None else f"{x:.3g}"

    for c, models in summary["mechanism"].items():
        for name, m in models.items():
            j = m["mean_by_type"]["jsd"]
            pk, ch, ans = m["peak_at_first_wrong"], m["peak_at_first_wrong_chance"], m["peak_in_answer"]
            lines.append(f"| {c} {name} | {m['incorrect']} ({m['incorrect_located']}) | "
                         f"{'n/a' if pk is None else f'{100 * pk:.0f}% ({100 * ch:.0f}%)'} | "
                         f"{'n/a' if ans is None else f'{100 * ans:.0f}%'} | "
                         + " / ".join(fmt(j["correct"][t]) for t in path_task.TOKEN_TYPES) + " | "
                         + " / ".join(fmt(j["incorrect"][t]) for t in path_task.TOKEN_TYPES) + " |")
    lines.append("")
    for loss, v in summary["verdict"].items():
        role = "primary" if loss == summary["primary_loss"] else "secondary"
        for key, claim in v["claims"].items():
            lines.append(f"- {loss} ({role}) {key}: **{claim['outcome']}**: {claim['claim']}; {claim['reason']}")
    return "\n".join(lines)


def write_report(recipe: HindsightRecipe, run_dir: Path, summary: dict, runtime: dict, quick: bool) -> dict:
    curves = {f"{f}/{loss}/c{c}": report.read_curves(chain_dir(run_dir, c) / "stages" / arm_name(loss, f) /
                                                       "metrics.jsonl")
              for c in recipe.chains for loss in recipe.losses for f in recipe.filters}
    table = results_table(summary)
    results = {"name": run_dir.name, "quick": quick, "recipe": recipe.to_dict(), "summary": summary,
               "curves": curves, "runtime": runtime,
               "evaluation": "held-out chains/chain-<c>/data/test.jsonl (the same problems in every chain); greedy "
                             "and sampled (T=1, top_p=1, sampled_n per problem); 95% hierarchical bootstrap CIs "
                             "(chains, then problems); change_vs_rlvr paired over the same problems per chain"}
    png = report.plot_curves(curves, run_dir / "curves.png", "OPSD arms (filter/loss/chain) from RLVR, reference "
                             "teacher, matched budgets", teacher="reference teacher", xlabel="OPSD step")
    results["curves_png"] = str(png) if png else None
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (run_dir / "table.md").write_text(table + "\n")
    print("\n" + table + "\n", flush=True)
    return results


def run_hindsight(recipe: HindsightRecipe, run_dir: Path, config_dir: Path, quick: bool = False,
                  fresh: bool = True) -> dict:
    """The whole protocol; ``fresh=False`` keeps finished stages of an earlier run of the same name."""
    for c in recipe.chains:
        stage_config_objects(hindsight_pipeline(recipe, run_dir, config_dir, c))  # a bad key fails first
    if fresh:
        clear_run_dir(run_dir, _OWNED)
    run_dir.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    budgets, rlvr_p = {}, {}
    # one sidecar for every chain's stages and the evaluations (the chains share the architecture and tokenizer)
    shared = demo_sidecar(hindsight_pipeline(recipe, run_dir, config_dir, recipe.chains[0]),
                          max_model_len=recipe.max_tokens + 256, log_path=run_dir / "eval" / "sidecar.log")
    with shared:
        arrays = _train_and_evaluate(recipe, run_dir, config_dir, clock, shared, budgets, rlvr_p)
    mech = clock.run("mechanism", mechanism, recipe, run_dir)
    summary = summarize(recipe, arrays, budgets, mech, rlvr_p)
    return write_report(recipe, run_dir, summary, clock.total(), quick)


def _train_and_evaluate(recipe: HindsightRecipe, run_dir: Path, config_dir: Path, clock: StageClock,
                        shared: OneSidecarEvaluator, budgets: dict, rlvr_p: dict) -> dict:
    """Every chain's stages, then the evaluation arrays, on the ``shared`` sidecar; fills ``budgets`` and
    ``rlvr_p`` (per chain)."""
    for c in recipe.chains:
        if not (chain_dir(run_dir, c) / "init" / "config.json").is_file():
            clock.run(f"c{c}-prepare", prepare_chain, run_dir, recipe, c)
        pipeline_cfg = hindsight_pipeline(recipe, run_dir, config_dir, c)
        for i in range(2):  # sft, rlvr: then the arms' prompts per step follow the RLVR model's accuracy
            clock.run(f"c{c}-{pipeline_cfg.stages[i].name}", run_pipeline,
                      replace(pipeline_cfg, stages=pipeline_cfg.stages[:i + 1]), shared)
        stages = chain_dir(run_dir, c) / "stages"
        rlvr_p[f"c{c}"] = rlvr_accuracy(stages / "rlvr" / "metrics.jsonl")
        pipeline_cfg = hindsight_pipeline(recipe, run_dir, config_dir, c, rlvr_p[f"c{c}"])
        for i in range(2, len(pipeline_cfg.stages)):
            clock.run(f"c{c}-{pipeline_cfg.stages[i].name}", run_pipeline,
                      replace(pipeline_cfg, stages=pipeline_cfg.stages[:i + 1]), shared)
        budgets[f"c{c}"] = {}
        for loss in recipe.losses:
            for f in recipe.filters:
                b = budget_counts(stages / arm_name(loss, f) / "metrics.jsonl", recipe.kept_per_step)
                budgets[f"c{c}"][arm_name(loss, f)] = {**b, "prompts_per_step": prompts_per_step(f, rlvr_p[f"c{c}"],
                                                                                                   recipe)}
    models, refs = _models(recipe, run_dir)
    return clock.run("evaluate", ablation.evaluate_rows, models, refs,
                     DemoInputs.under(chain_dir(run_dir, recipe.chains[0])).test, run_dir / "eval",
                     recipe.max_tokens, recipe.sampled_n, shared)
