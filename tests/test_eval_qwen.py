"""`python -m eval.run` (and eval.predict, eval.calibrate) on a tiny random Qwen2.5-VL (BLINK.md §10): the chat-template
prompt with LLaVA's answer suffix, images resized to grid buckets and batched per (grid shape, length bucket), all
three modes, metrics equal to `eval.score` on the samples, kill-and-resume, the crop mode refused in a sentence."""

from __future__ import annotations

import json
import types

import pytest
from flax import nnx

import tiny_benchmarks as tb
from blink_jax.blink import BlinkConfig, TokenSRBank
from blink_jax.blink.checkpoint import save_tokensr
from eval import run as eval_run
from eval import score as eval_score
from eval.harness import runner as harness_runner
from eval.harness.io import read_jsonl
from test_eval_run import Killed, kill_after
from test_qwen2_5_vl import save_model_dir
from tiny_llava import photo

MODES = ("vanilla", "interp", "blink")
MAX_PIXELS = 28 * 28 * 24  # with r = 2: buckets (6, 4), (4, 4), (4, 6), (2, 4); the POPE photos get (4, 6) or (6, 4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_qwen")
    save_model_dir(root / "model", "window", seed=7)  # 3 decoder layers, D = 60
    cfg = BlinkConfig(layers=(1, 2), region_size=2, tokensr_kind="conv", tokensr_channels=7)
    save_tokensr(root / "tokensr", TokenSRBank(cfg, 60, rngs=nnx.Rngs(0)), cfg, dim=60)
    ids = tb.make_pope(root / "pope")
    # one portrait photo, asked by popular/1 and adversarial/2: a second grid shape, (6, 4)
    photo(30, 50, seed=5).save(root / "pope" / "val2014" / "COCO_val2014_000000000002.jpg")
    return types.SimpleNamespace(root=root, model=root / "model", tokensr=root / "tokensr", pope=root / "pope",
                                 tfds=root / "tfds", pope_ids=ids)


def cli_args(env, out, *extra, modes=",".join(MODES)) -> list[str]:
    # tau_exp 0: every participating layer expands (rho >= 1/R always), so Blink really runs
    return ["--bench", "pope", "--model", str(env.model), "--data-dir", str(env.pope), "--tokensr", str(env.tokensr),
            "--modes", modes, "--out", str(out), "--tfds-dir", str(env.tfds), "--batch-size", "2", "--bucket", "32",
            "--max-new-tokens", "3", "--dtype", "float32", "--tau-exp", "0", "--tau-drop", "0", "--limit", "2",
            "--max-pixels", str(MAX_PIXELS), "--no-progress", *extra]


@pytest.fixture(scope="module")
def pope_run(env):
    out = env.root / "pope_out"
    assert eval_run.main(cli_args(env, out, "--save-traces")) == 0
    return types.SimpleNamespace(out=out, results=json.loads((out / "results.json").read_text()))


def samples(out, mode):
    return list(read_jsonl(out / f"samples_pope_{mode}.jsonl"))


def test_prompt_is_the_chat_template_with_the_llava_suffix(env):
    from blink_jax.model_inputs import inputs_for
    from transformers import AutoTokenizer

    family = inputs_for(env.model, region_size=2, max_pixels=MAX_PIXELS)
    assert family.grids == ((6, 4), (4, 4), (4, 6), (2, 4))
    assert family.grid_of_size(47, 35) == (4, 6)
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * 24 + "<|vision_end|>is there a cat in the image ?\nAnswer the question using a single "
            "word or phrase.<|im_end|>\n<|im_start|>assistant\n")
    tokenizer = AutoTokenizer.from_pretrained(str(env.model))
    got = family.prompt_ids("is there a cat in the image ?\nAnswer the question using a single word or phrase.", (4, 6))
    assert got == tokenizer(want).input_ids


def test_pope_all_modes_equal_rescoring(env, pope_run, capsys):
    results = pope_run.results
    assert list(results["modes"]) == list(MODES)
    for mode in MODES:
        entry = results["modes"][mode]
        assert entry["counts"] == {"questions": 6, "answered": 6, "errors": 0, "missing": 0, "unknown_ids": 0}
        rows = samples(pope_run.out, mode)
        assert sorted(r["question_id"] for r in rows) == sorted(q for ids in env.pope_ids.values() for q in ids[:2])
        assert all(r["prompt"].endswith("\nAnswer the question using a single word or phrase.") for r in rows)
        assert all((r["trace"] is None) == (mode == "vanilla") for r in rows)
        capsys.readouterr()
        assert eval_score.main(["--bench", "pope", "--samples", str(pope_run.out / f"samples_pope_{mode}.jsonl"),
                                "--data-dir", str(env.pope), "--tfds-dir", str(env.tfds)]) == 0
        scores = json.loads(capsys.readouterr().out)
        assert scores["metrics"] == entry["metrics"]
    assert any(r["trace"]["expansions"] for r in samples(pope_run.out, "blink"))
    config = results["config"]
    # one program per (grid shape, length bucket): [batch, bucket, new tokens, Gh, Gw]
    assert config["programs"] == {mode: [[2, 64, 3, 4, 6], [2, 64, 3, 6, 4]] for mode in MODES}
    assert config["model_config"]["grid_shapes"] == [[6, 4], [4, 4], [4, 6], [2, 4]]
    assert config["conv_mode"] == "chat_template"


def test_traces_hold_each_question_grid_and_the_report_draws_them(pope_run, tmp_path):
    from eval import report as eval_report

    records = list(read_jsonl(pope_run.out / "traces_pope_blink.jsonl"))
    grids = {r["question_id"]: (tuple(r["grid"]), tuple(r["image_size"])) for r in records}
    assert grids["popular/1"] == ((6, 4), (168, 112)) and grids["random/1"] == ((4, 6), (112, 168))
    out = eval_report.make_report(pope_run.out, report_dir=tmp_path, examples=4)
    assert set(out) == {"interp", "blink"}
    for entry in out.values():
        assert all(stats["n"] == 6 for stats in entry["layers"].values())
        assert all((tmp_path / name).stat().st_size > 0 for name in entry["files"])


def test_kill_and_resume_ends_with_the_same_results(env, pope_run, monkeypatch):
    out = env.root / "pope_resumed"
    real_run_eval = harness_runner.run_eval
    monkeypatch.setattr(harness_runner, "run_eval", lambda cfg: real_run_eval(cfg, on_written=kill_after(3)))
    with pytest.raises(Killed):
        eval_run.main(cli_args(env, out))
    monkeypatch.setattr(harness_runner, "run_eval", real_run_eval)
    assert 3 <= len(samples(out, "vanilla")) < 6
    assert eval_run.main(cli_args(env, out)) == 0
    resumed = json.loads((out / "results.json").read_text())
    for mode in MODES:
        assert resumed["modes"][mode]["metrics"] == pope_run.results["modes"][mode]["metrics"]
        old = {r["question_id"]: r["prediction"] for r in samples(pope_run.out, mode)}
        assert {r["question_id"]: r["prediction"] for r in samples(out, mode)} == old


def test_crop_mode_is_refused_in_a_sentence(env, tmp_path, capsys):
    assert eval_run.main(cli_args(env, tmp_path / "crop", modes="vanilla,crop")) == 2
    assert "mode 'crop' is not available for Qwen2.5-VL" in capsys.readouterr().err


def test_predict_plot_and_calibrate(env, tmp_path, capsys):
    """eval.predict --plot draws the 4 x 6 grid's trace; eval.calibrate probes a folder of images of two grid shapes,
    and its rho at the first participating layer is the one Blink's trace reports for the same question (Blink's
    first layer sees the vanilla stream)."""
    from eval import calibrate, predict

    images = tmp_path / "images"
    images.mkdir()
    photo(170, 110, seed=1).save(images / "a.png")  # landscape: (4, 6)
    photo(150, 100, seed=2).save(images / "b.png")  # landscape: (4, 6)
    photo(80, 146, seed=3).save(images / "c.png")  # portrait: (6, 4)
    question = "is there a cat in the image ?"
    png = tmp_path / "trace.png"
    common = ["--model", str(env.model), "--layers", "1,2", "--region-size", "2", "--max-pixels", str(MAX_PIXELS)]
    assert predict.main([*common, "--image", str(images / "a.png"), "--question", question, "--mode", "interp",
                         "--tau-exp", "0", "--tau-drop", "0", "--max-new-tokens", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "region_size=2 -> 6 regions" in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--mode crop is not available for Qwen2.5-VL"):
        predict.main([*common, "--image", str(images / "a.png"), "--question", question, "--mode", "crop"])

    stats = tmp_path / "stats.json"
    assert calibrate.main([*common, "--data", str(images), "--question", question, "--batch-size", "2",
                           "--out", str(stats), "--no-progress"]) == 0
    assert "3 examples probed, 0 skipped" in capsys.readouterr().out
    payload = json.loads(stats.read_text())
    rho = {e["image"].rsplit("/", 1)[-1]: e["rho"] for e in payload["examples"]}
    assert all(1 / 6 - 1e-6 <= r <= 1 for e in rho.values() for r in e.values())

    from blink_jax.model_inputs import QwenInputs
    from blink_jax import load_pretrained

    family = QwenInputs(env.model, region_size=2, max_pixels=MAX_PIXELS)
    model = load_pretrained(env.model)
    blink, _ = predict.blink_settings("interp", layers=(1, 2), region_size=2, tau_exp=0.0, tau_drop=0.0)  # the CLI's
    for name in ("a.png", "c.png"):
        result = predict.predict(model, family.processor, images / name, question, blink, max_new_tokens=3)
        assert float(result.trace.rho[0, 0]) == pytest.approx(rho[name]["1"], rel=1e-4)
