"""The demo's outputs: the results table (markdown, printed), ``results.json`` and the curves PNG.

Rows: the SFT model from the student prompt ("before"), the SFT model shown the concise instruction (the OPSDC
teacher's behaviour, for reference), and each OPSDC run from the student prompt ("after", one per filter).
Curves per OPSDC run from its ``metrics.jsonl``: rollout length and accuracy, reverse KL and student entropy
per step, and the held-out curve points of ``train.eval_every`` (sampled at the rollout settings).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

CURVE_KEYS = {  # curve name -> metrics.jsonl key
    "rollout_length": "rollout/mean_length",
    "rollout_accuracy": "rollout/accuracy",
    "kl": "divergence",
    "entropy_student": "entropy/student",
    "entropy_teacher": "entropy/teacher",
    "heldout_accuracy": "eval/accuracy",
    "heldout_length": "eval/response_length/mean",
}
_TRAINED_ONLY = ("divergence", "entropy/student", "entropy/teacher")


def read_curves(metrics_path: Path, step0: Optional[dict] = None) -> dict:
    """``{curve: {"steps": [...], "values": [...]}}`` from a trainer's metrics.jsonl; ``step0`` (held-out
    accuracy and length of the starting model) prepends step 0 to the held-out curves. KL and entropy are
    points only of steps that trained on at least one rollout."""
    curves = {name: {"steps": [], "values": []} for name in CURVE_KEYS}
    if step0 is not None:
        for name, key in (("heldout_accuracy", "accuracy"), ("heldout_length", "mean_tokens")):
            curves[name]["steps"].append(0)
            curves[name]["values"].append(step0[key])
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        m = json.loads(line)
        trained = m.get("tokens", 0) > 0  # a step whose filter kept no rollout logs 0 for KL and entropy
        for name, key in CURVE_KEYS.items():
            if key in m and (trained or key not in _TRAINED_ONLY):
                curves[name]["steps"].append(m["step"])
                curves[name]["values"].append(m[key])
    return curves


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def results_table(rows: list[dict]) -> str:
    """Markdown table; token and accuracy changes are relative to the first row (the SFT model), greedy."""
    base = rows[0]
    lines = ["| model | prompt | accuracy (greedy) | mean response tokens (greedy) | tokens vs SFT | accuracy vs SFT "
             "| accuracy (sampled) | mean tokens (sampled) | truncated (greedy) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tokens = f"{100.0 * (r['mean_tokens'] / base['mean_tokens'] - 1.0):+.1f}%"
        acc = f"{100.0 * (r['accuracy'] - base['accuracy']):+.1f} pts"
        sampled = r.get("sampled")
        s_acc, s_tok = (_pct(sampled["accuracy"]), f"{sampled['mean_tokens']:.1f}") if sampled else ("n/a", "n/a")
        lines.append(f"| {r['label']} | {r['prompt']} | {_pct(r['accuracy'])} | {r['mean_tokens']:.1f} | {tokens} "
                     f"| {acc} | {s_acc} | {s_tok} | {_pct(r['truncated_share'])} |")
    return "\n".join(lines)


def verdict(before: dict, after: dict, min_token_drop: float = 0.40, max_accuracy_drop: float = 0.02) -> dict:
    """Did OPSDC meet the issue's goal (>= 40% fewer tokens, accuracy within 2 points or better)?"""
    drop = 1.0 - after["mean_tokens"] / before["mean_tokens"]
    delta = after["accuracy"] - before["accuracy"]
    return {"token_reduction": drop, "accuracy_change": delta,
            "goal": f">= {100 * min_token_drop:.0f}% fewer tokens, accuracy within {100 * max_accuracy_drop:.0f} "
                    "points of before or better",
            "met": bool(drop >= min_token_drop and delta >= -max_accuracy_drop)}


def _moving_mean(values: list, window: int = 5) -> list:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_curves(runs: dict[str, dict], out_path: Path, title: str, teacher: str = "concise teacher",
                xlabel: str = "OPSDC step") -> Optional[Path]:
    """2 x 2 panels over OPSDC steps, one line per run (named by its filter, optionally ``filter/...``):
    held-out length, held-out accuracy, reverse KL, student entropy (rollout length/accuracy dotted). Returns
    None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no curves PNG, the curves are in results.json")
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (axes[0, 0], "heldout_length", "rollout_length", "mean response tokens",
         "held-out (solid, sampled) and rollouts (dotted, 5-step mean)"),
        (axes[0, 1], "heldout_accuracy", "rollout_accuracy", "accuracy",
         "held-out (solid, sampled) and rollouts (dotted, 5-step mean)"),
        (axes[1, 0], "kl", None, f"reverse KL(student || {teacher}) per token", "trained rollouts"),
        (axes[1, 1], "entropy_student", None, "student entropy per token (nats)", "trained rollouts"),
    ]
    colors = {"all": "tab:blue", "correct": "tab:green", "incorrect": "tab:red"}
    for ax, key, dotted, ylabel, subtitle in panels:
        for name, curves in runs.items():
            color = colors.get(name.split("/")[0], None)
            c = curves[key]
            if c["steps"]:
                ax.plot(c["steps"], c["values"], marker="o" if key.startswith("heldout") else None, ms=4,
                        color=color, label=f"filter={name}")
            if dotted is not None and curves[dotted]["steps"]:
                ax.plot(curves[dotted]["steps"], _moving_mean(curves[dotted]["values"]), ls=":", alpha=0.7,
                        color=color)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 1].set_ylim(-0.02, 1.02)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
