"""Evaluation statistics: unbiased pass@k, response-length summaries, grouped accuracy, bootstrap CIs.

Pure Python + numpy, so reports can be recomputed from saved per-sample records without a model.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for c correct out of n samples.

    Numerically stable product form: 1 - prod_{i=n-c+1}^{n} (1 - k / i).
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass@k needs 0 <= correct <= samples, got correct={c}, samples={n}")
    if not (1 <= k <= n):
        raise ValueError(f"pass@k needs 1 <= k <= samples, got k={k}, samples={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over prompts given (samples, correct) per prompt."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one prompt")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def length_stats(lengths: Sequence[float], truncated: Optional[Sequence[bool]] = None) -> dict[str, float]:
    """mean / median / p90 / min / max of response lengths (tokens) and the share truncated at max tokens."""
    if len(lengths) == 0:
        raise ValueError("length_stats needs at least one length")
    x = np.asarray(lengths, dtype=np.float64)
    out = {"count": float(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
           "p90": float(np.percentile(x, 90)), "min": float(x.min()), "max": float(x.max())}
    if truncated is not None:
        if len(truncated) != len(lengths):
            raise ValueError(f"{len(lengths)} lengths but {len(truncated)} truncated flags")
        out["truncated_share"] = float(np.mean(np.asarray(truncated, dtype=np.float64)))
    return out


def compression_ratio(tokens: Sequence[float], baseline_tokens: Sequence[float]) -> float:
    """1 - mean(tokens) / mean(baseline tokens): 0.57 means 57% fewer tokens than the baseline."""
    base = float(np.mean(baseline_tokens))
    if base <= 0:
        raise ValueError("compression_ratio needs a positive baseline mean length")
    return 1.0 - float(np.mean(tokens)) / base


def accuracy_by(correct: Sequence[Any], keys: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Accuracy (mean of correct) and count per grouping key (e.g. MATH level or subject), keys sorted."""
    if len(correct) != len(keys):
        raise ValueError(f"{len(correct)} values but {len(keys)} keys")
    groups: dict[str, list[float]] = defaultdict(list)
    for value, key in zip(correct, keys):
        groups[str(key)].append(float(value))
    return {k: {"accuracy": float(np.mean(v)), "count": float(len(v))}
            for k, v in sorted(groups.items(), key=lambda kv: _natural(kv[0]))}


def _natural(key: str):
    return (0, float(key), "") if key.lstrip("-").replace(".", "", 1).isdigit() else (1, 0.0, key)


def _statistic(a: np.ndarray, b: np.ndarray, statistic: str) -> np.ndarray:
    """Along the last axis: mean(a) - mean(b), or the compression 1 - mean(a) / mean(b)."""
    if statistic == "mean_diff":
        return a.mean(-1) - b.mean(-1)
    if statistic == "compression":
        return 1.0 - a.mean(-1) / b.mean(-1)
    raise ValueError(f"statistic={statistic!r}: choose 'mean_diff' or 'compression'")


def bootstrap_ci(values_a: Sequence[float], values_b: Sequence[float], paired: bool = True, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0, statistic: str = "mean_diff") -> tuple[float, float, float]:
    """(point estimate, low, high) percentile-bootstrap interval at level 1 - alpha.

    ``statistic='mean_diff'``: mean(a) - mean(b) (e.g. an accuracy delta, a = model, b = baseline);
    ``'compression'``: 1 - mean(a) / mean(b) (a = model tokens, b = baseline tokens). ``paired=True``
    resamples the same items for both (the same prompts evaluated twice), which is tighter and correct
    for per-prompt comparisons; ``paired=False`` resamples each side independently.
    """
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap_ci needs non-empty samples")
    if paired and a.size != b.size:
        raise ValueError(f"paired bootstrap needs equal sizes, got {a.size} and {b.size}")
    if not (0 < alpha < 1) or n_boot < 1:
        raise ValueError("bootstrap_ci needs 0 < alpha < 1 and n_boot >= 1")
    rng = np.random.default_rng(seed)
    point = float(_statistic(a, b, statistic))
    idx_a = rng.integers(0, a.size, size=(n_boot, a.size))
    idx_b = idx_a if paired else rng.integers(0, b.size, size=(n_boot, b.size))
    stats = _statistic(a[idx_a], b[idx_b], statistic)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)
