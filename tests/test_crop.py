"""The two-pass crop baseline (BLINK.md §9): the box geometry by hand, two-image prompts against transformers,
the crop mode end to end in eval.run (pass 2 rebuilt by hand, kill and resume, report, predict) and the four-way
demo run rescored by eval.score."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from PIL import Image

import tiny_benchmarks as tb
import tiny_llava as tl
from blink_jax import InputError
from blink_jax.blink import BlinkConfig, CropConfig, crop_box
from blink_jax.config import ConfigError
from blink_jax.processing import build_prompt, preprocess_image, preprocess_uint8, tokenize_with_image
from eval import predict as eval_predict
from eval import report as eval_report
from eval import run as eval_run
from eval import score as eval_score
from eval.harness import runner as harness_runner
from eval.harness.io import read_jsonl

# 84 px preprocessed images, 14 px patches -> a 6 x 6 grid; regions of 3 x 3 tokens (42 x 42 px), 2 per side.
GRID, SIZE, R = 6, 84, 3


# ------------------------------------------------------------------------------------- box geometry by hand


@pytest.mark.parametrize("case", [
    # Padded: 45 x 31 is pasted at (0, (45 - 31) // 2 = 7) on a 45 x 45 square, resized to 84 (x 45/84).
    # Region 3 = row 1, col 1: (42, 42, 84, 84); x2 about (63, 63): (21, 21, 105, 105), clamped (21, 21, 84, 84);
    # original: (21 * 45/84, 21 * 45/84 - 7, 84 * 45/84, 84 * 45/84 - 7) = (11.25, 4.25, 45, 38) -> clamp to 31.
    dict(size=(45, 31), region=3, context=2.0, pad=True, box=(11, 4, 45, 31)),
    # Padded portrait 31 x 45: pasted at (7, 0). Region 0 (0, 0, 42, 42), context 1: x 45/84 -> (0, 0, 22.5, 22.5),
    # minus (7, 0) -> (-7, 0, 15.5, 22.5), clamped, whole pixels -> (0, 0, 16, 23).
    dict(size=(31, 45), region=0, context=1.0, pad=True, box=(0, 0, 16, 23)),
    # Plain: 45 x 31 resized to 121 x 84 (short side 84, long int(84 * 45 / 31) = 121), centre crop from x = 18.
    # Region 0 x2 about (21, 21): (-21, -21, 63, 63) -> (0, 0, 63, 63); original: ((0 + 18) * 45/121, 0,
    # (63 + 18) * 45/121, 63 * 31/84) = (6.69, 0, 30.12, 23.25) -> (6, 0, 31, 24).
    dict(size=(45, 31), region=0, context=2.0, pad=False, box=(6, 0, 31, 24)),
    # Plain portrait 31 x 45: 84 x 121, centre crop from y = 18. Region 3 x1.5 about (63, 63): (31.5, 31.5, 94.5,
    # 94.5) -> (31.5, 31.5, 84, 84); original: (31.5 * 31/84, (31.5 + 18) * 45/121, 84 * 31/84, (84 + 18) * 45/121)
    # = (11.63, 18.41, 31, 37.93) -> (11, 18, 31, 38).
    dict(size=(31, 45), region=3, context=1.5, pad=False, box=(11, 18, 31, 38)),
])
def test_crop_box_by_hand(case):
    crop = CropConfig(crop_layer=0, region_size=R, crop_context=case["context"])
    got = crop_box(case["region"], *case["size"], grid=GRID, image_size=SIZE, crop=crop,
                   pad_to_square=case["pad"])
    assert got == case["box"]


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("size", [(45, 31), (31, 45), (57, 57)])
@pytest.mark.parametrize("region", [0, 1, 2, 3])
def test_crop_box_is_the_grown_region_in_the_original_pixels(pad, size, region):
    """Independent of the mapping's arithmetic: paint the box white on a black original, preprocess it as the model
    does, and the grown region (where it shows the image, not the padding) is white, what lies well outside it is
    not."""
    crop = CropConfig(crop_layer=0, region_size=R, crop_context=1.5)
    box = crop_box(region, *size, grid=GRID, image_size=SIZE, crop=crop, pad_to_square=pad)
    original = np.zeros((size[1], size[0], 3), np.uint8)
    original[box[1]:box[3], box[0]:box[2]] = 255
    seen = preprocess_uint8(Image.fromarray(original), image_size=SIZE, pad_to_square=pad)[..., 0].astype(int)
    real = preprocess_uint8(Image.fromarray(np.full_like(original, 255)), image_size=SIZE, pad_to_square=pad)[..., 0]
    row, col = divmod(region, GRID // R)
    side = R * SIZE // GRID
    cx, cy = (col + 0.5) * side, (row + 0.5) * side
    half = 1.5 * side / 2
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    # Whole-pixel rounding (< 1 original pixel) and bicubic ringing (2 original pixels) blur the edges.
    scale = SIZE / (max(size) if pad else min(size))  # preprocessed pixels per original pixel
    margin = 3 * scale + 1
    x0, x1, y0, y1 = max(0, cx - half), min(SIZE, cx + half), max(0, cy - half), min(SIZE, cy + half)  # clamped
    inside = (xx > x0 + margin) & (xx < x1 - margin) & (yy > y0 + margin) & (yy < y1 - margin) & (real > 250)
    outside = (xx < x0 - margin) | (xx > x1 + margin) | (yy < y0 - margin) | (yy > y1 + margin)
    assert inside.any() and (seen[inside] > 240).all()
    assert (outside & (real > 250)).any() and (seen[outside & (real > 250)] < 15).all()


def test_crop_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="crop_input='zoom'"):
        CropConfig(crop_input="zoom")
    with pytest.raises(ConfigError, match="crop_context=0"):
        CropConfig(crop_context=0)
    with pytest.raises(ConfigError, match="crop_layer=15 but the language model has 3 layers"):
        CropConfig().validate_for(3, 24)
    assert CropConfig.like(BlinkConfig()) == CropConfig(crop_layer=15, region_size=6)  # the middle of 12-18
    assert CropConfig.like(BlinkConfig(layers=(1, 2, 3), region_size=3), crop_input="crop").crop_layer == 2


# ------------------------------------------------------------------------------------ two images per prompt


def test_two_image_prompt_logits_equal_transformers():
    """[B, 2, C, H, W] with two image runs per prompt: transformers splices a flat [B * 2, C, H, W] in order."""
    import torch

    from test_model_parity import from_hf, hf_logits

    hf = tl.make_hf_model(seed=3)
    ours = from_hf(hf)
    cfg = ours.config
    p = cfg.num_image_tokens
    rng = np.random.default_rng(0)
    rows = []
    for extra in (5, 2):  # prompts of two lengths: [BOS, text, image 1, text, image 2, text]
        text = lambda n: list(rng.integers(5, cfg.text.vocab_size, n))
        rows.append([1] + text(extra) + [cfg.image_token_index] * p + text(2) + [cfg.image_token_index] * p + text(3))
    t = max(map(len, rows))
    ids = np.full((2, t), 3, np.int64)
    mask = np.zeros((2, t), np.int64)
    for i, row in enumerate(rows):
        ids[i, t - len(row):], mask[i, t - len(row):] = row, 1
    pixels = tl.random_pixels(4, cfg.vision.image_size, seed=1).reshape(2, 2, 3, cfg.vision.image_size, -1)
    expected = hf_logits(hf, ids, pixels.reshape(4, *pixels.shape[2:]), mask)
    got = np.asarray(ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
    np.testing.assert_allclose(got[mask > 0], expected[mask > 0], atol=1e-4, rtol=0)
    # the images' order matters: swapped, the logits after the first image differ
    swapped = np.asarray(ours(input_ids=ids, pixel_values=pixels[:, ::-1], attention_mask=mask).logits)
    assert not np.allclose(swapped[mask > 0], got[mask > 0], atol=1e-3)
    with pytest.raises(InputError, match="expected 2 x|holds .* image tokens"):
        ours(input_ids=ids, pixel_values=np.concatenate([pixels, pixels[:, :1]], axis=1), attention_mask=mask)
    with pytest.raises(InputError, match="Blink runs on one image per prompt"):
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask,
             blink=BlinkConfig(layers=(1,), region_size=2, tokensr_kind="interp"))
    del torch


def test_two_image_prompt_tokenizes_each_image_run(tmp_path):
    tok = tl.make_tokenizer(tmp_path)
    prompt = build_prompt("Is there a cat?", images=2)
    assert prompt.count("<image>") == 2 and "<image>\n<image>\nIs there a cat?" in prompt
    ids = tokenize_with_image(tok, prompt, 4, 7, images=2)
    one = tokenize_with_image(tok, build_prompt("Is there a cat?"), 4, 7)
    assert ids.count(4) == 14 and ids[:one.index(4) + 7] == one[:one.index(4) + 7]
    with pytest.raises(ValueError, match="has 2 '<image>' placeholder"):
        tokenize_with_image(tok, prompt, 4, 7)


# --------------------------------------------------------------------------------- the crop mode in eval.run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop")
    tl.save_hf_model(root / "model", seed=0, vision_image_size=84, text_num_hidden_layers=3, vision_num_hidden_layers=2)
    ids = tb.make_pope(root / "pope")
    return types.SimpleNamespace(root=root, model=root / "model", data=root / "pope", tfds=root / "tfds", ids=ids)


def cli(env, out, *extra, modes="vanilla,crop"):
    return ["--bench", "pope", "--model", str(env.model), "--data-dir", str(env.data), "--modes", modes, "--out",
            str(out), "--tfds-dir", str(env.tfds), "--batch-size", "4", "--bucket", "32", "--max-new-tokens", "3",
            "--dtype", "float32", "--layers", "1,2", "--region-size", "3", "--no-progress", *extra]


@pytest.fixture(scope="module")
def crop_run(env):
    out = env.root / "run"
    assert eval_run.main(cli(env, out, "--save-traces")) == 0
    return types.SimpleNamespace(out=out, results=json.loads((out / "results.json").read_text()))


def test_crop_answer_is_pass_2_on_the_image_and_its_crop(env, crop_run):
    """A question's recorded answer, rebuilt alone (batch of one, no padding rows): the region from eval.calibrate's
    scan at the crop layer, the crop cut by hand from the original file, then a two-image generate."""
    from blink_jax import load_pretrained
    from blink_jax.processing import Processor, load_image
    from eval.calibrate import scan

    settings = crop_run.results["config"]["mode_settings"]["crop"]["crop"]
    assert settings == {"crop_layer": 2, "region_size": 3, "crop_context": 2.0, "crop_input": "both"}
    llava = load_pretrained(env.model)
    processor = Processor.from_pretrained(env.model)
    cfg = llava.config
    rows = {r["question_id"]: r for r in read_jsonl(crop_run.out / "samples_pope_crop.jsonl")}
    for qid, image_name, question in (("popular/2", "COCO_val2014_000000000003.jpg", "Is there a dog in the image?"),):
        row = rows[qid]
        image = load_image(env.data / "val2014" / image_name)
        assert row["prompt"].startswith(question)
        inputs = processor([build_prompt(row["prompt"], suffix=None)], [image])
        rho, region, _ = scan(llava, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                              layers=(2,), region_size=3)
        assert row["trace"]["region"] == int(region[0, 0])
        assert row["trace"]["rho"] == pytest.approx(float(rho[0, 0]), abs=1e-5)
        box = crop_box(int(region[0, 0]), image.width, image.height, grid=cfg.vision.grid, image_size=84,
                       crop=CropConfig(crop_layer=2, region_size=3), pad_to_square=True)
        assert row["trace"]["box"] == list(box) and row["trace"]["original_size"] == [image.width, image.height]
        crop = preprocess_image(image.crop(box), image_size=84)
        ids = tokenize_with_image(processor.tokenizer, build_prompt(row["prompt"], suffix=None, images=2),
                                  cfg.image_token_index, cfg.num_image_tokens, images=2)
        tokens = llava.generate(input_ids=[ids], pixel_values=np.stack([inputs["pixel_values"], crop[None]], axis=1),
                                max_new_tokens=3)
        assert row["prediction"] == eval_predict.answer_text(processor, tokens[0], cfg.text.eos_token_id)
        assert row["cost"]["flops"] > 0 and row["cost"]["seconds"] > 0


def test_crop_run_reports_cost_and_rescores(env, crop_run, capsys):
    results = crop_run.results
    assert list(results["modes"]) == ["vanilla", "crop"]
    vanilla, crop = results["modes"]["vanilla"]["cost"], results["modes"]["crop"]["cost"]
    assert vanilla["questions"] == crop["questions"] == 9  # the corrupt image is an error, not a cost
    assert crop["flops"] > vanilla["flops"]  # two images and a partial first pass
    text = (crop_run.out / "results.md").read_text()
    assert "## Cost per question" in text and "| Crop (two-pass) |" in text
    for mode in ("vanilla", "crop"):
        capsys.readouterr()
        assert eval_score.main(["--bench", "pope", "--samples", str(crop_run.out / f"samples_pope_{mode}.jsonl"),
                                "--data-dir", str(env.data), "--tfds-dir", str(env.tfds)]) == 0
        assert json.loads(capsys.readouterr().out)["metrics"] == results["modes"][mode]["metrics"]


class Killed(BaseException):
    pass


def test_killed_crop_run_resumes_to_the_same_results(env, crop_run, monkeypatch):
    out = env.root / "resumed"
    written = 0

    def kill(n: int) -> None:
        nonlocal written
        written += n
        if written >= 5:
            raise Killed

    real = harness_runner.run_eval
    monkeypatch.setattr(harness_runner, "run_eval", lambda cfg: real(cfg, on_written=kill))
    with pytest.raises(Killed):
        eval_run.main(cli(env, out, "--save-traces", modes="crop"))
    monkeypatch.setattr(harness_runner, "run_eval", real)
    assert 5 <= len(list(read_jsonl(out / "samples_pope_crop.jsonl"))) < 10
    assert eval_run.main(cli(env, out, "--save-traces", modes="crop")) == 0
    resumed = json.loads((out / "results.json").read_text())["modes"]["crop"]
    expected = crop_run.results["modes"]["crop"]
    assert resumed["metrics"] == expected["metrics"] and resumed["counts"] == expected["counts"]
    keep = lambda path: {r["question_id"]: (r["prediction"], r["trace"]) for r in read_jsonl(path)}
    got, want = keep(out / "samples_pope_crop.jsonl"), keep(crop_run.out / "samples_pope_crop.jsonl")
    assert got == want and len(list(read_jsonl(out / "samples_pope_crop.jsonl"))) == 10
    boxes = lambda path: {r["question_id"]: r["box"] for r in read_jsonl(path)}
    assert boxes(out / "traces_pope_crop.jsonl") == boxes(crop_run.out / "traces_pope_crop.jsonl")


def test_crop_alone_and_bad_flags(env, tmp_path, capsys):
    out = tmp_path / "alone"
    assert eval_run.main(cli(env, out, "--crop-input", "crop", "--crop-layer", "0", "--crop-context", "1.5",
                             modes="crop")) == 0
    settings = json.loads((out / "results.json").read_text())["config"]["mode_settings"]["crop"]["crop"]
    assert settings == {"crop_layer": 0, "region_size": 3, "crop_context": 1.5, "crop_input": "crop"}
    assert eval_run.main(cli(env, tmp_path / "bad", "--crop-layer", "7", modes="crop")) == 2
    assert "crop_layer=7 but the language model has 3 layers" in capsys.readouterr().err


def test_report_and_predict_draw_the_crop(env, crop_run, tmp_path, capsys):
    out = eval_report.make_report(crop_run.out, report_dir=tmp_path / "report", examples=4)
    assert set(out) == {"crop"} and out["crop"]["crop"]["n"] == 9 and out["crop"]["crop"]["crop_layer"] == 2
    assert (tmp_path / "report" / out["crop"]["files"][0]).stat().st_size > 0
    plot = tmp_path / "crop.png"
    assert eval_predict.main(["--model", str(env.model), "--image", str(env.data / "val2014" /
                                                                        "COCO_val2014_000000000002.jpg"),
                              "--question", "Is there a dog?", "--mode", "crop", "--layers", "1,2", "--region-size",
                              "3", "--max-new-tokens", "3", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "crop (both; layer 2, region_size=3, context 2.0): box (" in text and plot.stat().st_size > 0


# ----------------------------------------------------------------------------------------- the demo, four ways


def test_demo_four_modes_match_eval_score(tmp_path):
    from eval.demo import DEMO

    if DEMO.missing():
        pytest.skip("the demo/ folder is not bundled in this checkout")
    out = tmp_path / "demo"
    assert eval_run.main(["--bench", "pope", "--limit", "1", "--modes", "vanilla,crop,interp,blink", "--out",
                          str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["modes"]) == ["vanilla", "crop", "interp", "blink"]
    blink_layers = results["config"]["mode_settings"]["blink"]["blink"]["layers"]
    assert results["config"]["mode_settings"]["crop"]["crop"]["crop_layer"] == blink_layers[len(blink_layers) // 2]
    for mode, entry in results["modes"].items():
        assert entry["counts"]["questions"] == 3 and entry["counts"]["errors"] == 0
        assert entry["cost"]["questions"] == 3 and entry["cost"]["flops"] > 0
        scores = tmp_path / f"{mode}.json"
        assert eval_score.main(["--bench", "pope", "--samples", str(out / f"samples_pope_{mode}.jsonl"),
                                "--data-dir", str(DEMO.data_dir("pope")), "--out", str(scores)]) == 0
        assert json.loads(scores.read_text())["metrics"] == entry["metrics"]
    text = (out / "results.md").read_text()
    assert all(f"| {label} |" in text.split("## Cost per question")[1]
               for label in ("Vanilla", "Crop (two-pass)", "Blink-interp", "Blink"))


# --------------------------------------------------------------------------------------- the FLOPs it reports


def test_pass_flops_match_xla_cost_analysis():
    """The analytic counts behind the cost table agree with XLA's own count of the compiled programs (which also
    counts the elementwise work): pass 1 stopping after its layer, and a two-image prefill with last logits only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from blink_jax import flops
    from blink_jax.blink import crop as crop_lib
    from blink_jax.config import LlavaConfig
    from blink_jax.model import forward
    from blink_jax.weights.params import abstract_model

    cfg = LlavaConfig.from_hf_config(tl.tiny_hf_config(
        text_hidden_size=256, text_intermediate_size=704, text_num_hidden_layers=5, text_num_attention_heads=4,
        text_num_key_value_heads=2, text_vocab_size=1000, vision_hidden_size=128, vision_intermediate_size=512,
        vision_num_hidden_layers=3, vision_num_attention_heads=4, vision_image_size=112))
    dims = flops.Dims.from_config(cfg)
    graphdef, state = nnx.split(abstract_model(cfg))
    batch, length = 2, 3 * cfg.num_image_tokens
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    xla = lambda lowered: (lambda c: (c[0] if isinstance(c, list) else c)["flops"])(lowered.compile().cost_analysis())

    def pixels(*n):
        return jax.ShapeDtypeStruct((batch, *n, 3, 112, 112), jnp.float32)

    pass1 = xla(crop_lib._locate.lower(graphdef, state, ids, pixels(), ids, layer=2, region_size=2))
    ours = batch * flops.probe_flops(dims, length, 2, feature_layer=cfg.vision_layers_needed)
    assert 0.9 < ours / pass1 <= 1.0, (ours, pass1)
    prefill = jax.jit(lambda p, i, x, m: forward.prefill(nnx.merge(graphdef, p), i, x, m, all_logits=False)[0])
    pass2 = xla(prefill.lower(state, ids, pixels(2), ids))
    ours = batch * flops.generate_flops(dims, length, 1, images=2, feature_layer=cfg.vision_layers_needed)
    assert 0.9 < ours / pass2 <= 1.0, (ours, pass2)


def test_sr_layers_follow_the_decisions():
    from blink_jax.flops import sr_layers_of

    # decisions after layers 12..18 of 32: expanded after 12 and 13 (layers 13, 14 carry SR tokens), dropped after
    # 14, expanded after 18 (layers 19..31 carry them)
    assert sr_layers_of((12, 13, 14, 15, 16, 17, 18), (True, True, False, False, False, False, True), 32) == 2 + 13
    assert sr_layers_of((1, 2), (False, False), 3) == 0
