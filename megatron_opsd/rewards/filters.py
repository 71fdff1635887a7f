"""Which rollouts of each prompt's group are distilled on, by verified correctness.

Kim & Lee (2605.06188): distilling on correct rollouts only compresses without losing accuracy; on
incorrect ones accuracy drops. The statistics are computed over *all* rollouts, whatever the filter, so
the logs show accuracy and length even for rollouts that were not trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Optional, Sequence


@dataclass
class FilterResult:
    kept: list[list[Any]]  # per group, the kept rollouts (groups may become empty)
    kept_indices: list[list[int]]  # per group, indices of the kept rollouts
    stats: dict[str, float]
    group_accuracy: list[float] = field(default_factory=list)
    group_mean_length: list[float] = field(default_factory=list)


def _is_correct(value: Any) -> bool:
    return float(value) > 0.5


def group_filter(rollout_groups: Sequence[Sequence[Any]], correctness: Sequence[Sequence[Any]], mode: str,
                 lengths: Optional[Sequence[Sequence[int]]] = None) -> FilterResult:
    """Keep all, correct-only or incorrect-only rollouts of each group (rollout.filter).

    ``correctness[g][i]`` is a bool or a reward (> 0.5 counts as correct). ``lengths[g][i]`` is the
    response length in tokens; by default ``len(rollout)`` (rollouts given as token lists).
    """
    if mode not in ("all", "correct", "incorrect"):
        raise ValueError(f"rollout.filter={mode!r} is not one of ['all', 'correct', 'incorrect']")
    if len(rollout_groups) != len(correctness):
        raise ValueError(f"{len(rollout_groups)} rollout groups but {len(correctness)} correctness groups")
    kept, kept_idx, accs, mean_lens = [], [], [], []
    all_len, correct_len, incorrect_len = [], [], []
    n_total = n_kept = n_correct = 0
    all_correct = all_wrong = mixed = 0
    for g, (group, corr) in enumerate(zip(rollout_groups, correctness)):
        if len(group) != len(corr):
            raise ValueError(f"group {g}: {len(group)} rollouts but {len(corr)} correctness values")
        lens = list(lengths[g]) if lengths is not None else [len(r) for r in group]
        ok = [_is_correct(c) for c in corr]
        idx = [i for i, c in enumerate(ok) if mode == "all" or (c if mode == "correct" else not c)]
        kept.append([group[i] for i in idx])
        kept_idx.append(idx)
        accs.append(fmean(ok) if ok else 0.0)
        mean_lens.append(fmean(lens) if lens else 0.0)
        all_len += lens
        correct_len += [n for n, c in zip(lens, ok) if c]
        incorrect_len += [n for n, c in zip(lens, ok) if not c]
        n_total += len(group)
        n_kept += len(idx)
        n_correct += sum(ok)
        all_correct += bool(ok) and all(ok)
        all_wrong += bool(ok) and not any(ok)
        mixed += any(ok) and not all(ok)
    n_groups = max(len(rollout_groups), 1)
    stats = {
        "accuracy": n_correct / n_total if n_total else 0.0,
        "mean_length": fmean(all_len) if all_len else 0.0,
        "mean_length_correct": fmean(correct_len) if correct_len else 0.0,
        "mean_length_incorrect": fmean(incorrect_len) if incorrect_len else 0.0,
        "fraction_filtered": 1.0 - n_kept / n_total if n_total else 0.0,
        "num_kept": float(n_kept),
        "num_rollouts": float(n_total),
        "groups_all_correct": all_correct / n_groups,
        "groups_all_incorrect": all_wrong / n_groups,
        "groups_empty_after_filter": sum(1 for k in kept if not k) / n_groups,
        # groups holding both correct and incorrect rollouts (n > 1): there correctness is not only difficulty
        "groups_mixed": mixed / n_groups,
    }
    return FilterResult(kept=kept, kept_indices=kept_idx, stats=stats, group_accuracy=accs, group_mean_length=mean_lens)


def correct_demonstrations(correctness: Sequence[Sequence[Any]]) -> list[list[Optional[int]]]:
    """DemoPSD: for each rollout, the index of *another* correct rollout of the same group to show the teacher
    (the next one, cyclically), or None when there is none: the group's only correct rollout and groups without
    a correct rollout get no demonstration (the trainer leaves them out of the step). A rollout is never its own
    demonstration: a teacher shown the very tokens it scores copies them (probability ~1 on each), which is a
    self-imitation target, not the demonstration-conditioned teacher DemoPSD describes.
    """
    out = []
    for corr in correctness:
        ok = [i for i, c in enumerate(corr) if _is_correct(c)]
        row: list[Optional[int]] = []
        for i in range(len(corr)):
            others = [j for j in ok if j != i]
            row.append(min(others, key=lambda j: (j - i) % len(corr)) if others else None)
        out.append(row)
    return out
