"""Evaluation outputs: the results JSON, a Markdown table, an accuracy-vs-tokens plot, baseline comparison.

The baseline comparison pairs prompts by id (the same benchmark evaluated twice, e.g. before and after
OPSD) and reports, per benchmark and per MATH level, the compression ratio 1 - tokens / baseline tokens
and the accuracy delta, each with a paired bootstrap confidence interval over prompts. Per-level numbers
make the OPSDC claim "easy problems are compressed more" checkable.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional, Union

from megatron_opsd.evaluation import metrics


def benchmark_summary(bench: dict) -> dict:
    """The headline numbers of one benchmark's results (``results["benchmarks"][name]``), as the demo and the
    pipeline tables report them."""
    tokens = bench["tokens"]
    return {"accuracy": bench["accuracy"], "mean_tokens": tokens["mean"], "median_tokens": tokens["median"],
            "p90_tokens": tokens["p90"], "truncated_share": tokens["truncated_share"], "prompts": bench["num_prompts"]}


def save_results(results: dict, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def load_results(path: Union[str, Path]) -> dict:
    """A results JSON written by ``save_results`` (e.g. the --baseline file), checked for its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--baseline {str(path)!r} does not exist; give the results.json of an earlier "
                                "`megatron-opsd eval` run")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--baseline {str(path)!r} is not valid JSON ({err.msg})") from err
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), dict):
        raise ValueError(f"--baseline {str(path)!r} has no 'benchmarks' object; is it a `megatron-opsd eval` "
                         "results.json?")
    return results


def _per_prompt(bench: dict) -> dict[str, dict]:
    """prompt id -> {accuracy, tokens (mean over samples), level}."""
    out = {}
    for p in bench["prompts"]:
        s = p["samples"]
        out[str(p["id"])] = {"accuracy": sum(x["correct"] for x in s) / len(s),
                             "tokens": sum(x["tokens"] for x in s) / len(s), "level": p.get("level")}
    return out


def _compare(model: list[dict], base: list[dict], n_boot: int, alpha: float, seed: int) -> dict:
    """Paired statistics over prompts: each list holds the same prompts in the same order."""
    tok_m, tok_b = [m["tokens"] for m in model], [b["tokens"] for b in base]
    acc_m, acc_b = [m["accuracy"] for m in model], [b["accuracy"] for b in base]
    comp = metrics.bootstrap_ci(tok_m, tok_b, paired=True, n_boot=n_boot, alpha=alpha, seed=seed,
                                statistic="compression")
    delta = metrics.bootstrap_ci(acc_m, acc_b, paired=True, n_boot=n_boot, alpha=alpha, seed=seed)
    return {
        "num_prompts": len(model),
        "tokens": sum(tok_m) / len(tok_m), "baseline_tokens": sum(tok_b) / len(tok_b),
        "accuracy": sum(acc_m) / len(acc_m), "baseline_accuracy": sum(acc_b) / len(acc_b),
        "compression": {"value": comp[0], "ci": [comp[1], comp[2]]},
        "accuracy_delta": {"value": delta[0], "ci": [delta[1], delta[2]]},
    }


def compare_to_baseline(results: dict, baseline: dict, n_boot: int = 2000, alpha: float = 0.05,
                        seed: int = 0) -> dict:
    """Per benchmark both runs share: overall and per-level compression and accuracy delta with CIs.

    Only prompts present in both runs count (their number is reported); a benchmark with none in common
    is an error, since it means the two runs used different data.
    """
    out = {}
    for name, bench in results["benchmarks"].items():
        if name not in baseline["benchmarks"]:
            continue
        mine, theirs = _per_prompt(bench), _per_prompt(baseline["benchmarks"][name])
        ids = [i for i in mine if i in theirs]
        if not ids:
            raise ValueError(f"benchmark {name!r}: no prompt id in common with the baseline; were both runs made on "
                             "the same data file?")
        entry = _compare([mine[i] for i in ids], [theirs[i] for i in ids], n_boot, alpha, seed)
        entry["unpaired_prompts"] = len(mine) + len(theirs) - 2 * len(ids)
        levels = sorted({mine[i]["level"] for i in ids if mine[i]["level"] is not None}, key=str)
        entry["by_level"] = {}
        for level in levels:
            lid = [i for i in ids if mine[i]["level"] == level]
            entry["by_level"][str(level)] = _compare([mine[i] for i in lid], [theirs[i] for i in lid], n_boot,
                                                     alpha, seed)
        out[name] = entry
    if not out:
        raise ValueError(f"the baseline has none of the benchmarks {sorted(results['benchmarks'])} (it has "
                         f"{sorted(baseline['benchmarks'])})")
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_report(results: dict, comparison: Optional[dict] = None) -> str:
    """Markdown tables: one row per benchmark, then per-level and per-subject accuracy, then the comparison."""
    bench = results["benchmarks"]
    ks = sorted({k for b in bench.values() for k in b["pass_at_k"]}, key=int)
    lines = [f"# Evaluation: {results.get('model') or 'model'}", ""]
    s = results.get("settings", {})
    lines += [f"n={s.get('n')}, temperature={s.get('temperature')}, top_p={s.get('top_p')}, "
              f"max_tokens={s.get('max_tokens')}, enable_thinking={s.get('enable_thinking')}", ""]
    head = ["benchmark", "prompts", "accuracy %"] + [f"pass@{k} %" for k in ks] + \
        ["mean tokens", "median", "p90", "truncated %"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in bench.items():
        t = b["tokens"]
        row = [name, str(b["num_prompts"]), _pct(b["accuracy"])] + \
            [_pct(b["pass_at_k"][k]) if k in b["pass_at_k"] else "" for k in ks] + \
            [f"{t['mean']:.1f}", f"{t['median']:.1f}", f"{t['p90']:.1f}", _pct(t["truncated_share"])]
        lines.append("| " + " | ".join(row) + " |")
    for key in ("level", "subject"):
        rows = [(name, g, v) for name, b in bench.items() for g, v in b.get("by", {}).get(key, {}).items()]
        if rows:
            lines += ["", f"## Accuracy by {key}", "", f"| benchmark | {key} | prompts | accuracy % | mean tokens |",
                      "|---|---|---|---|---|"]
            lines += [f"| {n} | {g} | {v['num_prompts']} | {_pct(v['accuracy'])} | {v['mean_tokens']:.1f} |"
                      for n, g, v in rows]
    if comparison:
        lines += ["", "## Against the baseline", "",
                  "compression = 1 - tokens / baseline tokens; delta = accuracy - baseline accuracy (points); "
                  "95% paired bootstrap intervals over prompts.", "",
                  "| benchmark | level | prompts | tokens | baseline tokens | compression % [CI] | accuracy % | "
                  "baseline % | delta [CI] |", "|---|---|---|---|---|---|---|---|---|"]
        for name, c in comparison.items():
            for level, e in [("all", c)] + list(c["by_level"].items()):
                cc, dd = e["compression"], e["accuracy_delta"]
                lines.append(f"| {name} | {level} | {e['num_prompts']} | {e['tokens']:.1f} | {e['baseline_tokens']:.1f} "
                             f"| {_pct(cc['value'])} [{_pct(cc['ci'][0])}, {_pct(cc['ci'][1])}] "
                             f"| {_pct(e['accuracy'])} | {_pct(e['baseline_accuracy'])} "
                             f"| {_pct(dd['value'])} [{_pct(dd['ci'][0])}, {_pct(dd['ci'][1])}] |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_tokens(results: dict, path: Union[str, Path], baseline: Optional[dict] = None
                            ) -> Optional[Path]:
    """One point per benchmark (and small ones per MATH level): mean response tokens vs accuracy; the
    baseline's points are hollow, joined to the model's by an arrow. None without matplotlib (an optional
    dependency: the `logging` extra), with a note: the numbers are in results.json and report.md."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed (pip install matplotlib): no accuracy_vs_tokens.png")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, b) in enumerate(results["benchmarks"].items()):
        color = colors[i % len(colors)]
        point = (b["tokens"]["mean"], 100 * b["accuracy"])
        ax.scatter(*point, color=color, s=60, label=name, zorder=3)
        for level, v in b.get("by", {}).get("level", {}).items():
            ax.scatter(v["mean_tokens"], 100 * v["accuracy"], color=color, s=14, marker="s", alpha=0.6)
            ax.annotate(f"L{level}", (v["mean_tokens"], 100 * v["accuracy"]), fontsize=7, color=color)
        base = (baseline or {}).get("benchmarks", {}).get(name)
        if base:
            bpoint = (base["tokens"]["mean"], 100 * base["accuracy"])
            ax.scatter(*bpoint, facecolors="none", edgecolors=color, s=60, zorder=3)
            ax.annotate("", xy=point, xytext=bpoint, arrowprops=dict(arrowstyle="->", color=color))
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("accuracy vs response length" + (" (hollow: baseline)" if baseline else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: Union[str, Path], baseline: Optional[dict] = None,
                 n_boot: int = 2000, seed: int = 0) -> dict[str, Path]:
    """results.json (with the comparison under "baseline_comparison"), report.md and accuracy_vs_tokens.png (when
    matplotlib is installed; else ``paths["png"]`` is None)."""
    out_dir = Path(out_dir)
    if baseline is not None:
        results["baseline_comparison"] = compare_to_baseline(results, baseline, n_boot=n_boot, seed=seed)
    paths = {"json": save_results(results, out_dir / "results.json"),
             "markdown": out_dir / "report.md",
             "png": plot_accuracy_vs_tokens(results, out_dir / "accuracy_vs_tokens.png", baseline)}
    paths["markdown"].write_text(markdown_report(results, results.get("baseline_comparison")))
    return paths
