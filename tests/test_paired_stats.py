"""Paired comparison statistics (`blink_jax.stats`, `eval.harness.paired`) against slow, obvious references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from blink_jax import stats
from eval.harness import paired


def _mcnemar_by_enumeration(wins: int, losses: int) -> float:
    """Every way the wins + losses discordant units could have split under H0 (each side 1/2): the share at
    least as far from an even split as the one observed."""
    n = wins + losses
    if n == 0:
        return 1.0
    far = abs(wins - n / 2)
    outcomes = list(itertools.product((0, 1), repeat=n))
    return sum(abs(sum(o) - n / 2) >= far for o in outcomes) / len(outcomes)


@pytest.mark.parametrize("wins,losses", [(w, l) for w in range(8) for l in range(8) if w + l <= 12])
def test_mcnemar_exact_matches_enumeration(wins, losses):
    assert stats.mcnemar_exact_p(wins, losses) == pytest.approx(_mcnemar_by_enumeration(wins, losses), abs=1e-12)


def test_mcnemar_large_counts_are_finite_and_ordered():
    assert stats.mcnemar_exact_p(600, 600) == 1.0
    assert 0 < stats.mcnemar_exact_p(560, 640) < 0.05 < stats.mcnemar_exact_p(590, 610)
    with pytest.raises(ValueError, match="non-negative"):
        stats.mcnemar_exact_p(-1, 3)


def test_bootstrap_interval_matches_resampling_units():
    rng = np.random.default_rng(3)
    diff = rng.choice([-1, 0, 0, 0, 1, 1], size=400).astype(np.int8)
    low, high = stats.bootstrap_interval(diff, samples=20_000, seed=1)
    # The obvious bootstrap: resample the units themselves.
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(4000)])
    ref_low, ref_high = np.quantile(means, [0.025, 0.975])
    assert low == pytest.approx(ref_low, abs=0.006) and high == pytest.approx(ref_high, abs=0.006)
    assert low < diff.mean() < high
    assert stats.bootstrap_interval(diff, seed=1) == stats.bootstrap_interval(diff, seed=1)  # reproducible


def test_compare_counts_and_skips_units_one_side_lacks():
    mode = {"a": True, "b": True, "c": False, "d": False, "e": True}
    reference = {"a": True, "b": False, "c": True, "d": False, "z": True}
    c = paired.compare(mode, reference)
    assert (c["units"], c["both_right"], c["only_this"], c["only_reference"], c["both_wrong"]) == (4, 1, 1, 1, 1)
    assert c["difference"] == 0.0 and c["mcnemar_p"] == 1.0


def test_against_first_prefers_vanilla_then_the_first_mode_with_correctness():
    correct = {"interp": {"q1": False, "q2": False}, "judge_only": None, "vanilla": {"q1": True, "q2": False},
               "blink": {"q1": True, "q2": True}}
    out = paired.against_first(correct)
    assert out["reference"] == "vanilla" and list(out["modes"]) == ["interp", "blink"]
    assert out["modes"]["blink"]["only_this"] == 1
    no_vanilla = paired.against_first({"judge_only": None, "interp": {"q1": True}, "blink": {"q1": False}})
    assert no_vanilla["reference"] == "interp" and list(no_vanilla["modes"]) == ["blink"]
    assert paired.against_first({"vanilla": {"q1": True}}) == {}


def test_the_crop_baseline_is_a_second_reference_and_results_md_draws_both_tables():
    from eval.harness.results import paired_lines

    correct = {"vanilla": {"q1": True, "q2": False, "q3": False}, "crop": {"q1": True, "q2": True, "q3": True},
               "blink": {"q1": False, "q2": True, "q3": False}}
    out = paired.against_first(correct)
    assert out["reference"] == "vanilla" and list(out["modes"]) == ["crop", "blink"]
    [vs_crop] = out["also"]
    assert vs_crop["reference"] == "crop" and list(vs_crop["modes"]) == ["vanilla", "blink"]
    # blink vs crop by hand: q1 crop only, q2 both, q3 crop only -> 0 wins, 2 losses, difference -2/3
    b = vs_crop["modes"]["blink"]
    assert (b["only_this"], b["only_reference"], b["both_right"], b["both_wrong"]) == (0, 2, 1, 0)
    assert b["difference"] == pytest.approx(-2 / 3) and b["mcnemar_p"] == pytest.approx(0.5)
    assert "also" not in paired.against_first({"vanilla": {"q1": True}, "blink": {"q1": True}})
    labels = {"vanilla": {"label": "Vanilla"}, "crop": {"label": "Crop (two passes)"}, "blink": {"label": "Blink"}}
    lines = paired_lines({"modes": labels, "paired": out})
    titles = [l for l in lines if l.startswith("## ")]
    assert titles == ["## Paired comparison against Vanilla", "## Paired comparison against Crop (two passes)"]
    assert "| Blink | 3 | 0 | 2 | -66.67 |" in "\n".join(lines)
