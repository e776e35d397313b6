"""Paired statistics of two answerers on the same questions (pure numpy): McNemar's exact test, a bootstrap
interval of the accuracy difference, and `compare`, which reports both. `eval.harness.paired` builds its
comparisons of modes on it; so does the demo's zoom measurement (`train.demo.zoom`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
CONFIDENCE = 0.95


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: P(a Binomial(wins + losses, 1/2) count is at least as far from the
    middle as min(wins, losses)), i.e. min(1, 2 * P(X <= min))."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative, got wins={wins}, losses={losses}")
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    # log-space terms: exact for the n of any benchmark (math.comb is exact; the division is what could overflow)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
               for i in range(k + 1))
    return min(1.0, 2.0 * tail)


def bootstrap_interval(diff: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `diff` (per-unit correctness differences in {-1, 0, 1}) over
    bootstrap resamples of the units."""
    n = len(diff)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # Resampling n values of {-1, 0, 1} is a multinomial draw of their counts: exact, and O(samples) memory.
    values = np.array([-1.0, 0.0, 1.0])
    counts = np.array([(diff == v).sum() for v in values])
    means = rng.multinomial(n, counts / n, size=samples) @ values / n
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def compare(mode: Mapping[str, bool], reference: Mapping[str, bool], *, seed: int = 0) -> dict:
    """`mode` vs `reference` (unit -> correct) over the units both answered."""
    units = sorted(set(mode) & set(reference))
    a = np.array([bool(mode[u]) for u in units], dtype=bool)
    b = np.array([bool(reference[u]) for u in units], dtype=bool)
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    diff = a.astype(np.int8) - b.astype(np.int8)
    low, high = bootstrap_interval(diff, seed=seed)
    n = len(units)
    return {
        "units": n,
        "both_right": int((a & b).sum()), "only_this": wins, "only_reference": losses, "both_wrong": int((~a & ~b).sum()),
        "accuracy": float(a.mean()) if n else None, "reference_accuracy": float(b.mean()) if n else None,
        "difference": float(diff.mean()) if n else None,
        "ci95": [low, high] if n else None,
        "mcnemar_p": mcnemar_exact_p(wins, losses),
    }
