"""`eval.calibrate`'s statistics against numbers worked out by hand.

The fixture is a handful of rho values per layer, chosen so that every percentile but p25/p50/p75 falls between
two samples: a percentile rule other than numpy's default linear interpolation (nearest, lower, midpoint, ...) or
a sample standard deviation instead of the population one gives other numbers. Each expected value is written
out below with its derivation; nothing is computed through numpy.
"""

from __future__ import annotations

import math

import pytest

from eval import calibrate

RHOS = {14: [0.90, 0.26, 0.40], 12: [0.30, 0.10, 0.70, 0.25, 0.50], 13: [0.5]}

# Linear percentile of n sorted values: position q/100 * (n - 1), interpolated between its two neighbours.
EXPECTED = {
    # sorted 0.10 0.25 0.30 0.50 0.70; positions 0.4, 1, 2, 3, 3.6
    12: {"count": 5, "mean": 1.85 / 5, "std": math.sqrt((0.27**2 + 0.12**2 + 0.07**2 + 0.13**2 + 0.33**2) / 5),
         "min": 0.10, "p10": 0.10 + 0.4 * 0.15, "p25": 0.25, "p50": 0.30, "p75": 0.50, "p90": 0.50 + 0.6 * 0.20,
         "max": 0.70},
    # one value: every statistic is that value, spread 0
    13: {"count": 1, "mean": 0.5, "std": 0.0, "min": 0.5, "p10": 0.5, "p25": 0.5, "p50": 0.5, "p75": 0.5,
         "p90": 0.5, "max": 0.5},
    # sorted 0.26 0.40 0.90; positions 0.2, 0.5, 1, 1.5, 1.8
    14: {"count": 3, "mean": 1.56 / 3, "std": math.sqrt((0.26**2 + 0.12**2 + 0.38**2) / 3), "min": 0.26,
         "p10": 0.26 + 0.2 * 0.14, "p25": 0.26 + 0.5 * 0.14, "p50": 0.40, "p75": 0.40 + 0.5 * 0.50,
         "p90": 0.40 + 0.8 * 0.50, "max": 0.90},
}
# All nine pooled, sorted 0.10 0.25 0.26 0.30 0.40 0.50 0.50 0.70 0.90 (sum 3.91, sum of squares 2.1901);
# positions 0.8, 2, 4, 6, 7.2.
POOLED = {"count": 9, "mean": 3.91 / 9, "std": math.sqrt((2.1901 - 3.91**2 / 9) / 9), "min": 0.10,
          "p10": 0.10 + 0.8 * 0.15, "p25": 0.26, "p50": 0.40, "p75": 0.50, "p90": 0.70 + 0.2 * 0.20, "max": 0.90}


def assert_stats(got: dict, want: dict) -> None:
    assert set(got) == set(want) == set(calibrate.STAT_NAMES)
    assert got["count"] == want["count"]
    for name in calibrate.STAT_NAMES[1:]:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def test_per_layer_and_pooled_statistics_match_the_hand_computation():
    stats = calibrate.rho_statistics(RHOS)
    assert list(stats["layers"]) == [12, 13, 14]  # sorted by layer, whatever the input order
    for layer, want in EXPECTED.items():
        assert_stats(stats["layers"][layer], want)
    assert_stats(stats["all"], POOLED)
    # tau_exp is pooled p75 and tau_drop pooled p25: sample values here (positions 6 and 2).
    assert stats["suggested"] == {"tau_exp": pytest.approx(0.50, abs=1e-12), "tau_drop": pytest.approx(0.26, abs=1e-12)}


def test_an_empty_layer_reports_a_count_of_zero_and_no_numbers():
    stats = calibrate.rho_statistics({12: RHOS[12], 15: []})
    assert stats["layers"][15] == {"count": 0, **{name: None for name in calibrate.STAT_NAMES[1:]}}
    assert_stats(stats["all"], EXPECTED[12])  # the empty layer adds nothing to the pool
    with pytest.raises(ValueError, match="no rho values"):
        calibrate.rho_statistics({12: [], 15: []})


def test_printed_table_shows_the_hand_numbers():
    text = calibrate.format_statistics(calibrate.rho_statistics(RHOS), num_regions=16)
    assert "1/R = 0.0625" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()
            if line.split() and line.split()[0] in ("12", "13", "14", "all")}
    for label, want in [*((str(layer), s) for layer, s in EXPECTED.items()), ("all", POOLED)]:
        assert int(rows[label][0]) == want["count"]
        cells = [float(cell) for cell in rows[label][1:]]
        assert cells == pytest.approx([want[name] for name in calibrate.STAT_NAMES[1:]], abs=5e-5), label
    assert "--tau-exp 0.5000" in text and "--tau-drop 0.2600" in text
