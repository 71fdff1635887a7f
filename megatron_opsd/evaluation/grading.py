"""Grading evaluation samples: correctness per sample with the configured verifier, and the per-prompt counts
that pass@k and grouped accuracy are computed from."""
from __future__ import annotations

from typing import Any, Sequence

from megatron_opsd.evaluation import metrics
from megatron_opsd.rewards.exact import ExactVerifier
from megatron_opsd.rewards.math import MathVerifier


def grade_samples(texts: Sequence[str], golds: Sequence[str], verifier: str = "math", boxed_only: bool = True,
                  num_workers: int = 0) -> list[bool]:
    """Correctness of each response against its gold answer with ``verifier`` (``math``: math-verify, see
    rewards.math; ``exact``: string match after normalisation)."""
    if verifier == "math":
        math_verifier = MathVerifier(boxed_only=boxed_only, num_workers=num_workers)
        try:
            return math_verifier.grade_batch(list(texts), list(golds))
        finally:
            math_verifier.close()
    if verifier == "exact":
        return ExactVerifier(boxed_only=boxed_only).grade_batch(list(texts), list(golds))
    raise ValueError(f"grading verifier={verifier!r} is not one of ['math', 'exact']")


def group_counts(correct: Sequence[bool], group_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Flat per-sample correctness -> (samples, correct) per prompt, for pass@k."""
    if sum(group_sizes) != len(correct):
        raise ValueError(f"group sizes sum to {sum(group_sizes)} but there are {len(correct)} samples")
    out, pos = [], 0
    for n in group_sizes:
        out.append((n, int(sum(bool(c) for c in correct[pos:pos + n]))))
        pos += n
    return out


def summarize_grades(correct: Sequence[bool], group_sizes: Sequence[int], lengths: Sequence[int],
                     truncated: Sequence[bool], group_keys: dict[str, Sequence[Any]] | None = None,
                     ks: Sequence[int] = (1,)) -> dict:
    """Accuracy, pass@k, length stats and accuracy by each grouping key (keys given per prompt)."""
    counts = group_counts(correct, group_sizes)
    out = {"accuracy": float(sum(map(bool, correct)) / len(correct)),
           "pass_at_k": {str(k): metrics.mean_pass_at_k(counts, k) for k in ks if k <= min(group_sizes)},
           "tokens": metrics.length_stats(lengths, truncated), "by": {}}
    for name, keys in (group_keys or {}).items():
        per_sample = [key for key, n in zip(keys, group_sizes) for _ in range(n)]
        out["by"][name] = metrics.accuracy_by(correct, per_sample)
    return out
