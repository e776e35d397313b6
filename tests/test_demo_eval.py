"""The bundled demo: `python -m eval.run --bench pope` with no --model runs the shipped model, TokenSR and data.

Checks that the demo runs all three modes through the normal POPE path, that what it reports is what the
official rules (`eval.score`) give on its saved predictions, and that the shipped TokenSR loads with the
geometry the demo's interp mode uses.
"""

from __future__ import annotations

import json

import pytest

from eval import run as eval_run
from eval import score as eval_score
from eval.demo import DEMO

pytestmark = pytest.mark.skipif(bool(DEMO.missing()), reason="the demo/ folder is not bundled in this checkout")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert eval_run.main(["--bench", "pope", "--limit", "6", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_demo_runs_three_modes_on_the_bundled_files(demo_run):
    _, results = demo_run
    assert list(results["modes"]) == ["vanilla", "interp", "blink"]
    for entry in results["modes"].values():
        assert entry["counts"]["questions"] == 18 and entry["counts"]["errors"] == 0  # 6 per split
    settings = results["config"]["mode_settings"]
    assert settings["blink"]["blink"]["tokensr_kind"] == "conv"
    assert settings["interp"]["blink"]["layers"] == settings["blink"]["blink"]["layers"]
    for kind in ("interp", "blink"):
        assert settings[kind]["blink"]["tau_exp"] == DEMO.tau_exp
        assert settings[kind]["blink"]["tau_drop"] == DEMO.tau_drop


def test_demo_metrics_are_the_official_rules_on_its_predictions(demo_run, tmp_path):
    out, results = demo_run
    for mode, entry in results["modes"].items():
        scores = tmp_path / f"{mode}.json"
        assert eval_score.main(["--bench", "pope", "--samples", str(out / f"samples_pope_{mode}.jsonl"),
                                "--data-dir", str(DEMO.data_dir("pope")), "--out", str(scores)]) == 0
        assert json.loads(scores.read_text())["metrics"] == entry["metrics"]


def test_demo_tokensr_matches_the_demo_model():
    from blink_jax.blink.checkpoint import load_tokensr
    from blink_jax.config import LlavaConfig

    bank, blink = load_tokensr(DEMO.tokensr)
    cfg = LlavaConfig.from_json(DEMO.model)
    blink.validate_for(cfg.text.num_hidden_layers, cfg.vision.grid)  # layers exist, regions tile the grid
    assert bank.layers == blink.layers and blink.tokensr_kind == "conv"
