"""Evaluation metrics: pass@k against brute force, bootstrap interval coverage, length and grouped stats."""
import itertools
import math

import numpy as np
import pytest

from megatron_opsd.evaluation import metrics
from megatron_opsd.evaluation.grading import grade_samples, group_counts, summarize_grades


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_over_all_k_subsets(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert metrics.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable_and_validated():
    # the combinatorial form overflows floats here; the product form does not
    value = metrics.pass_at_k(2000, 3, 100)
    exact = 1 - math.comb(1997, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-10)
    assert metrics.mean_pass_at_k([(4, 0), (4, 4), (4, 1)], 1) == pytest.approx((0 + 1 + 0.25) / 3)
    with pytest.raises(ValueError, match="1 <= k <= samples"):
        metrics.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= correct <= samples"):
        metrics.pass_at_k(4, 5, 1)


def test_length_stats_and_compression():
    lengths = list(range(1, 11))  # 1..10
    stats = metrics.length_stats(lengths, [n == 10 for n in lengths])
    assert stats["mean"] == 5.5 and stats["median"] == 5.5 and stats["p90"] == pytest.approx(9.1)
    assert stats["min"] == 1 and stats["max"] == 10 and stats["truncated_share"] == pytest.approx(0.1)
    assert metrics.compression_ratio([43, 43], [100, 100]) == pytest.approx(0.57)
    with pytest.raises(ValueError, match="10 lengths but 2 truncated flags"):
        metrics.length_stats(lengths, [True, False])


def test_accuracy_by_key():
    correct = [1, 0, 1, 1, 0, 0]
    levels = [2, 2, 10, 1, 1, 1]
    out = metrics.accuracy_by(correct, levels)
    assert list(out) == ["1", "2", "10"]  # numeric keys in numeric order
    assert out["1"] == {"accuracy": pytest.approx(1 / 3), "count": 3.0}
    assert out["2"]["accuracy"] == 0.5 and out["10"]["accuracy"] == 1.0


def _coverage(draw, truth, statistic, paired, reps=100, n_boot=1000):
    hits, widths = 0, []
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        a, b = draw(rng)
        point, lo, hi = metrics.bootstrap_ci(a, b, paired=paired, n_boot=n_boot, alpha=0.05, seed=rep,
                                             statistic=statistic)
        assert lo <= point <= hi
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    return hits / reps, float(np.mean(widths))


def test_bootstrap_accuracy_delta_covers_the_true_difference():
    # paired prompts of varying difficulty; the model solves each with probability +0.1: true delta = 0.1
    def draw(rng):
        d = rng.uniform(0.1, 0.8, size=150)
        return (rng.random(150) < d + 0.1).astype(float), (rng.random(150) < d).astype(float)

    cover, width = _coverage(draw, 0.1, "mean_diff", paired=True)
    assert 0.88 <= cover, cover
    assert width < 0.3  # an informative interval, not a trivially wide one

    def draw_unpaired(rng):
        return (rng.random(120) < 0.6).astype(float), (rng.random(90) < 0.45).astype(float)

    cover, _ = _coverage(draw_unpaired, 0.15, "mean_diff", paired=False)
    assert 0.88 <= cover, cover


def test_bootstrap_compression_covers_the_true_ratio():
    # model tokens = baseline tokens x U(0.3, 0.7): true compression 1 - E[a]/E[b] = 0.5
    def draw(rng):
        base = rng.uniform(100, 1000, size=150)
        return base * rng.uniform(0.3, 0.7, size=150), base

    cover, width = _coverage(draw, 0.5, "compression", paired=True)
    assert 0.88 <= cover, cover
    assert width < 0.1
    with pytest.raises(ValueError, match="paired bootstrap needs equal sizes"):
        metrics.bootstrap_ci([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="statistic='ratio'"):
        metrics.bootstrap_ci([1, 2], [1, 2], statistic="ratio")


def test_grading_summary():
    texts = ["\\boxed{1/2}", "\\boxed{0.5}", "no box", "\\boxed{3}", "\\boxed{7}"]
    golds = ["\\frac{1}{2}"] * 3 + ["3", "4"]
    correct = grade_samples(texts, golds)
    assert correct == [True, True, False, True, False]
    assert grade_samples(["\\boxed{3}"], ["3"], verifier="exact") == [True]
    assert group_counts(correct, [3, 2]) == [(3, 2), (2, 1)]
    out = summarize_grades(correct, [3, 2], [10, 20, 30, 40, 50], [False] * 4 + [True],
                           group_keys={"level": [1, 2]}, ks=(1, 2))
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["pass_at_k"] == {"1": pytest.approx((2 / 3 + 1 / 2) / 2), "2": pytest.approx((1 + 1) / 2)}
    assert out["tokens"]["truncated_share"] == pytest.approx(0.2)
    assert out["by"]["level"] == {"1": {"accuracy": pytest.approx(2 / 3), "count": 3.0},
                                  "2": {"accuracy": 0.5, "count": 2.0}}
