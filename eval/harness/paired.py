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

from collections.abc import Mapping

from blink_jax.stats import compare


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
