"""`eval.calibrate`'s statistics against numbers worked out by hand.

The fixture is a handful of rho values per layer, chosen so that every percentile but p25/p50/p75 falls between
two samples: a percentile rule other than numpy's default linear interpolation (nearest, lower, midpoint, ...) or
a sample standard deviation instead of the population one gives other numbers. Each expected value is written
out below with its derivation; nothing is computed through numpy.
"""

from __future__ import annotations

import math
import re

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


# ------------------------------------------------------------------------------- end to end on a tiny model

QUESTION = "what colour is the circle ?"
LAYERS = (0, 2)  # of 3
REGION = 3  # 84 px images -> 6x6 grid -> 4 regions


def linear_percentile(values: list[float], q: float) -> float:
    """numpy's default percentile, the slow way: position q/100 (n - 1) in the sorted values, interpolated."""
    v = sorted(values)
    position = q / 100 * (len(v) - 1)
    low = math.floor(position)
    high = min(low + 1, len(v) - 1)
    return v[low] + (position - low) * (v[high] - v[low])


def by_hand(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    return {"count": n, "mean": mean, "std": math.sqrt(sum((x - mean) ** 2 for x in values) / n),
            "min": min(values), **{f"p{q}": linear_percentile(values, q) for q in (10, 25, 50, 75, 90)},
            "max": max(values)}


def transformers_rho(hf, ids, pixels, layers, region_size: int) -> list[float]:
    """rho per layer from transformers' own attention probabilities (BLINK.md §2): the last token's head-mean
    attention on the grid's visual tokens, summed over r x r regions, largest region sum over the total."""
    import torch

    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), output_attentions=True)
    grid = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
    visual = [i for i, t in enumerate(ids[0]) if t == hf.config.image_token_id][-grid * grid:]
    rhos = []
    for layer in layers:
        s_v = out.attentions[layer][0, :, -1, visual].mean(0).reshape(grid, grid).numpy()
        sums = [float(s_v[i:i + region_size, j:j + region_size].sum())
                for i in range(0, grid, region_size) for j in range(0, grid, region_size)]
        rhos.append(max(sums) / sum(sums))
    return rhos


def test_calibrate_cli_reports_the_statistics_of_transformers_rho(tmp_path, capsys):
    import json

    import tiny_llava as tl
    from blink_jax.processing import Processor, build_prompt

    hf, _ = tl.save_hf_model(tmp_path / "model", seed=5, vision_image_size=84, text_num_hidden_layers=3,
                             vision_num_hidden_layers=2, text_vocab_size=64)
    (tmp_path / "images").mkdir()
    for seed, (w, h) in enumerate([(120, 90), (70, 100), (84, 84)]):
        tl.photo(w, h, seed=seed).save(tmp_path / "images" / f"{seed}.png")
    out = tmp_path / "rho.json"
    # batch 2 of 3 images: the second batch has a padding row; bucket 16 left-pads every prompt
    assert calibrate.main([str(a) for a in ["--model", tmp_path / "model", "--data", tmp_path / "images",
                                            "--question", QUESTION, "--layers", "0,2", "--region-size", REGION,
                                            "--batch-size", 2, "--bucket", 16, "--out", out, "--no-progress"]]) == 0
    report = json.loads(out.read_text())

    processor = Processor.from_pretrained(tmp_path / "model")
    rhos: dict[int, list[float]] = {layer: [] for layer in LAYERS}
    for example in report["examples"]:
        inputs = processor([build_prompt(QUESTION)], [example["image"]])
        want = transformers_rho(hf, inputs["input_ids"], inputs["pixel_values"], LAYERS, REGION)
        got = [example["rho"][str(layer)] for layer in LAYERS]
        assert got == pytest.approx(want, abs=2e-5), example["image"]
        for layer, rho in zip(LAYERS, want):
            rhos[layer].append(rho)
    assert len(rhos[0]) == 3

    stats = report["statistics"]
    for layer in LAYERS:
        for name, value in by_hand(rhos[layer]).items():
            assert stats["layers"][str(layer)][name] == pytest.approx(value, abs=2e-5), (layer, name)
    pooled = by_hand(rhos[0] + rhos[2])
    for name, value in pooled.items():
        assert stats["all"][name] == pytest.approx(value, abs=2e-5), name
    assert stats["suggested"]["tau_exp"] == pytest.approx(pooled["p75"], abs=2e-5)
    assert stats["suggested"]["tau_drop"] == pytest.approx(pooled["p25"], abs=2e-5)
    printed = re.search(r"--tau-exp (\S+)\s.*--tau-drop (\S+)\s", capsys.readouterr().out, re.S)
    assert [float(x) for x in printed.groups()] == pytest.approx([pooled["p75"], pooled["p25"]], abs=1e-4)
