"""Paired comparison of two modes on the same questions: is a difference in accuracy more than noise?

Every mode answers the same questions, so the comparison is paired: only the questions one mode gets right
and the other wrong (the discordant pairs) carry information. Reported for each mode against vanilla (or,
without vanilla, the run's first mode):

- the counts: questions both got right, only this mode, only the reference, neither;
- the accuracy difference (points) with a 95% bootstrap interval (questions resampled with replacement,
  a fixed seed, so a results file is reproducible);
- McNemar's exact test: two-sided binomial p-value of the discordant pairs under "either mode is as likely
  to win a discordant question".

A scoring unit is what the benchmark's own metric counts as one answer (`Benchmark.correctness`): a question,
or for MMBench's circular evaluation, a question with all its rotations. Units one mode errored on are left
out of that pair.
"""

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


def against(correct_by_mode: Mapping[str, Mapping[str, bool] | None], reference: str, *, seed: int = 0) -> dict:
    """Each other mode against `reference` (modes whose benchmark has no per-unit correctness are skipped);
    {} when `reference` is not among them or nothing else is."""
    names = [n for n, c in correct_by_mode.items() if c is not None]
    if reference not in names or len(names) < 2:
        return {}
    return {"reference": reference,
            "modes": {n: compare(correct_by_mode[n], correct_by_mode[reference], seed=seed)
                      for n in names if n != reference}}


def against_first(correct_by_mode: Mapping[str, Mapping[str, bool] | None], *, seed: int = 0,
                  prefer: str = "vanilla", also: tuple[str, ...] = ("crop",)) -> dict:
    """Each other mode against `prefer` (vanilla) when it is there, else against the first mode; then, under
    "also", against each mode of `also` the run has (the crop baseline: what Blink claims to replace)."""
    names = [n for n, c in correct_by_mode.items() if c is not None]
    if len(names) < 2:
        return {}
    reference = prefer if prefer in names else names[0]
    doc = against(correct_by_mode, reference, seed=seed)
    more = [against(correct_by_mode, r, seed=seed) for r in also if r != reference and r in names]
    if more:
        doc["also"] = more
    return doc
