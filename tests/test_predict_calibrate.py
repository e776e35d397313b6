"""`eval.predict` (answer + Blink trace + plot) and `eval.calibrate` (rho statistics) on a tiny saved model."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import tiny_llava as tl
from blink_jax import ConfigError, load_pretrained
from blink_jax.blink import BlinkConfig, TokenSRBank
from blink_jax.blink.checkpoint import save_tokensr
from blink_jax.blink.dtr import DROP, EXPAND, KEEP, NO_REGION, NONE
from blink_jax.blink.probe import probe_layers
from blink_jax.blink.runner import HostTrace
from blink_jax.processing import Processor, build_prompt
from eval import calibrate, predict

QUESTION = "what colour is the circle ?"
LAYERS = (0, 1, 2)  # of 3
CAL_LAYERS = (0, 2)
REGION = 3  # 84px images -> 6x6 grid -> 4 regions
ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+(\d+)\s+(none|expand|keep|drop)\s+(\S+)\s*$")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    # vocab 64 = the tokenizer's, so every generated id decodes to a word.
    tl.save_hf_model(root / "model", seed=3, vision_image_size=84, text_num_hidden_layers=3,
                     vision_num_hidden_layers=2, text_vocab_size=64)
    images = root / "images"
    images.mkdir()
    tl.photo(120, 90, seed=1).save(images / "a.png")
    tl.photo(70, 100, seed=2).save(images / "b.jpg")
    (images / "c.jpg").write_bytes(b"not a jpeg at all")
    (images / "notes.txt").write_text("not an image and not image-named: ignored")
    return root


@pytest.fixture(scope="module")
def processor(files):
    return Processor.from_pretrained(files / "model")


@pytest.fixture
def cli_models(monkeypatch):
    """The models the CLIs load, so a reference runs on exactly the CLI's model (and its compiled programs)."""
    models = []

    def spy(path, **kwargs):
        models.append(load_pretrained(path, **kwargs))
        return models[-1]

    monkeypatch.setattr(predict, "load_pretrained", spy)
    monkeypatch.setattr(calibrate, "load_pretrained", spy)
    return models


def run_cli(module, argv, capsys):
    assert module.main([str(a) for a in argv]) == 0
    return capsys.readouterr()


def trace_rows(stdout: str) -> list[tuple]:
    return [m.groups() for m in map(ROW.match, stdout.splitlines()) if m]


def test_predict_cli_answer_trace_and_plot(files, processor, cli_models, capsys):
    out_png = files / "plots" / "trace.png"
    out = run_cli(predict, ["--model", files / "model", "--image", files / "images" / "a.png", "--question", QUESTION,
                            "--mode", "interp", "--layers", "0-2", "--region-size", REGION, "--tau-exp", 0,
                            "--tau-drop", 0, "--max-new-tokens", 5, "--plot", out_png], capsys).out

    # Reference: the model's own generate, decoded by hand up to EOS.
    llava, = cli_models
    blink = BlinkConfig(layers=LAYERS, region_size=REGION, tau_exp=0.0, tau_drop=0.0, return_attention=True)
    inputs = processor([build_prompt(QUESTION)], [files / "images" / "a.png"])
    tokens, trace = llava.generate(**inputs, max_new_tokens=5, blink=blink, return_trace=True)
    ids = list(tokens[0])
    ids = ids[:ids.index(llava.config.text.eos_token_id)] if llava.config.text.eos_token_id in ids else ids
    expected = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert expected, "the tiny model should answer with at least one word"
    assert f"answer: {expected}\n" in out

    rows = trace_rows(out)
    assert [int(r[0]) for r in rows] == list(LAYERS)
    np.testing.assert_allclose([float(r[1]) for r in rows], trace.rho[:, 0], atol=6e-5)
    assert [int(r[2]) for r in rows] == trace.region[:, 0].tolist()
    assert [r[3] for r in rows] == ["expand"] * 3  # tau_exp = 0 expands everywhere (refocus)
    assert [int(r[4]) for r in rows] == trace.region[:, 0].tolist()

    with Image.open(out_png) as png:
        assert png.format == "PNG"
        png.verify()
    with Image.open(out_png) as png:  # three panels side by side: 3 x 3.2 in at 110 dpi
        assert png.size[0] == round(3 * 3.2 * 110)
    assert not list(out_png.parent.glob(".*tmp*")), "the temporary PNG was left behind"


def test_plot_trace_panels(tmp_path):
    """Synthetic trace: one panel per layer, expanded region drawn only for expand/keep."""
    rng = np.random.default_rng(0)
    layers = (3, 5, 7, 9, 11)
    actions = np.array([[NONE], [EXPAND], [KEEP], [DROP], [EXPAND]])
    expanded = np.array([[NO_REGION], [2], [2], [NO_REGION], [7]])
    trace = HostTrace(layers=layers, rho=rng.uniform(0.1, 0.5, (5, 1)), region=np.array([[0], [2], [5], [8], [7]]),
                      action=actions, expanded_region=expanded, attention=rng.random((5, 1, 9, 9)))
    image = np.asarray(tl.photo(45, 45, seed=4))
    fig = predict.plot_trace(image, trace, tmp_path / "t.png", region_size=3, title="q -> a")
    assert len(fig.axes) == 5
    for ax, layer, action in zip(fig.axes, layers, ["none", "expand", "keep", "drop", "expand"]):
        assert ax.get_title().startswith(f"layer {layer}:") and action in ax.get_title()
    assert [len(ax.patches) for ax in fig.axes] == [1, 2, 2, 1, 2]  # r* always, expansion for expand/keep
    with Image.open(tmp_path / "t.png") as png:  # 4 columns, 2 rows
        assert png.size == (round(4 * 3.2 * 110), round((2 * 3.7 + 0.4 + 0.3) * 110))
    with pytest.raises(ValueError, match="return_attention"):
        predict.plot_trace(image, HostTrace(layers, trace.rho, trace.region, actions, expanded), tmp_path / "u.png",
                           region_size=3)


def test_predict_errors(files, capsys):
    base = ["--model", files / "model", "--question", QUESTION, "--layers", "0-2", "--region-size", REGION]
    cases = [
        (["--image", files / "images" / "a.png", "--mode", "blink"], "--tokensr"),
        (["--image", files / "images" / "missing.png"], "missing.png"),
        (["--image", files / "images" / "c.jpg"], "c.jpg"),
        (["--image", files / "images" / "a.png", "--layers", "2-6"], "has layer index 3"),
        (["--image", files / "images" / "a.png", "--region-size", 4], "does not divide"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            predict.main([str(a) for a in base + extra])
        assert message in str(e.value), (extra, str(e.value))
    with pytest.raises(SystemExit) as e:
        predict.main(["--model", str(files / "nope"), "--image", str(files / "images" / "a.png"), "--question", "q"])
    assert "nope" in str(e.value)
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--model", "--image", "--question", "--mode", "--tokensr", "--layers", "--region-size", "--tau-exp",
                   "--tau-drop", "--max-new-tokens", "--plot", "--no-pad-to-square"):
        assert option in help_text


def test_blink_settings_from_tokensr(tmp_path):
    """--mode blink takes layers/region size from the TokenSR directory and thresholds from the CLI."""
    trained = BlinkConfig(layers=LAYERS, region_size=REGION, tokensr_kind="conv", tokensr_channels=5, tau_exp=0.4,
                          tau_drop=0.2)
    save_tokensr(tmp_path / "tsr", TokenSRBank(trained, 48, rngs=nnx.Rngs(0)), trained, dim=48)
    blink, bank = predict.blink_settings("blink", tokensr_dir=tmp_path / "tsr", tau_exp=0.35)
    assert (blink.layers, blink.region_size, blink.tokensr_kind) == (LAYERS, REGION, "conv")
    assert (blink.tau_exp, blink.tau_drop, blink.return_attention) == (0.35, 0.2, True)
    assert tuple(bank.layers) == LAYERS
    with pytest.raises(ConfigError, match="trained for layers"):
        predict.blink_settings("blink", tokensr_dir=tmp_path / "tsr", layers=(1, 2))
    with pytest.raises(ConfigError, match="only used by --mode blink"):
        predict.blink_settings("interp", tokensr_dir=tmp_path / "tsr")
    interp, none = predict.blink_settings("interp", layers=(2,), tau_drop=0.1)
    assert (interp.layers, interp.tau_exp, interp.tau_drop, interp.tokensr_kind, none) == ((2,), 0.3, 0.1, "interp",
                                                                                           None)


def test_rho_statistics_equal_numpy():
    rhos = {4: [0.3, 0.1, 0.7, 0.25, 0.5], 2: [0.9, 0.26, 0.4], 9: []}
    stats = calibrate.rho_statistics(rhos)
    assert list(stats["layers"]) == [2, 4, 9]
    for layer in (2, 4):
        v = np.asarray(rhos[layer])
        s = stats["layers"][layer]
        assert s["count"] == v.size
        np.testing.assert_allclose([s["mean"], s["std"], s["min"], s["max"]], [v.mean(), v.std(), v.min(), v.max()])
        np.testing.assert_allclose([s[f"p{q}"] for q in (10, 25, 50, 75, 90)], np.percentile(v, [10, 25, 50, 75, 90]))
    assert stats["layers"][9]["count"] == 0 and stats["layers"][9]["mean"] is None
    pooled = np.asarray(rhos[4] + rhos[2])
    assert stats["all"]["count"] == 8
    np.testing.assert_allclose([stats["suggested"]["tau_exp"], stats["suggested"]["tau_drop"]],
                               np.percentile(pooled, [75, 25]))
    json.dumps(stats)
    with pytest.raises(ValueError, match="no rho"):
        calibrate.rho_statistics({1: []})


def test_read_examples(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "image": "x/a.jpg", "text": "is there a cat?"}\n\n'
                                      '{"image": "b.png", "question": "how many?"}\n')
    examples = calibrate.read_examples(tmp_path / "q.jsonl")
    assert examples == [calibrate.Example(tmp_path / "x/a.jpg", "is there a cat?"),
                        calibrate.Example(tmp_path / "b.png", "how many?")]
    assert calibrate.read_examples(tmp_path / "q.jsonl", image_folder="/imgs")[1].image.as_posix() == "/imgs/b.png"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "text": "q"}\n{"image": "a.jpg"}\n')
    with pytest.raises(calibrate.DataError, match=r"bad.jsonl:2"):
        calibrate.read_examples(tmp_path / "bad.jsonl")


def test_calibrate_cli_skips_bad_image_and_matches_probe(files, processor, cli_models, capsys):
    out_json = files / "stats" / "rho.json"
    out = run_cli(calibrate, ["--model", files / "model", "--data", files / "images", "--question", QUESTION,
                              "--layers", "0,2", "--region-size", REGION, "--batch-size", 2, "--bucket", 16,
                              "--out", out_json], capsys)
    assert "c.jpg" in out.err and "skipped" in out.err
    assert "notes.txt" not in out.err
    assert "2 examples probed, 1 skipped" in out.out
    assert "--tau-exp" in out.out and "--tau-drop" in out.out

    report = json.loads(out_json.read_text())
    assert report["examples_used"] == 2 and [s["image"].endswith("c.jpg") for s in report["skipped"]] == [True]
    assert [e["image"].rsplit("/", 1)[1] for e in report["examples"]] == ["a.png", "b.jpg"]
    llava, = cli_models
    probe_fn = jax.jit(lambda m, *a: probe_layers(m, *a, layers=CAL_LAYERS, region_size=REGION))
    for example in report["examples"]:  # the reference: probe_layers on each image alone, unpadded
        inputs = processor([build_prompt(QUESTION)], [example["image"]])
        probe = probe_fn(llava.module, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["pixel_values"]),
                         jnp.asarray(inputs["attention_mask"]))
        np.testing.assert_allclose([example["rho"][str(l)] for l in CAL_LAYERS], np.asarray(probe.rho)[:, 0],
                                   rtol=1e-5, atol=1e-6)
        assert [example["region"][str(l)] for l in CAL_LAYERS] == np.asarray(probe.region)[:, 0].tolist()
    rhos = {layer: [e["rho"][str(layer)] for e in report["examples"]] for layer in CAL_LAYERS}
    assert report["statistics"] == json.loads(json.dumps(calibrate.rho_statistics(rhos)))
    table = {int(line.split()[0]): line.split() for line in out.out.splitlines() if re.match(r"^\s+\d+\s+2\s", line)}
    assert sorted(table) == list(CAL_LAYERS)
    for layer in CAL_LAYERS:
        np.testing.assert_allclose(float(table[layer][2]), np.mean(rhos[layer]), atol=6e-5)


def test_calibrate_jsonl_with_images_elsewhere_points_to_image_folder(files, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"image": "a.png", "text": QUESTION}) + "\n")  # a.png lives in files/images
    with pytest.raises(SystemExit, match="pass --image-folder DIR"):
        calibrate.main([str(a) for a in ["--model", files / "model", "--data", data, "--layers", "0,2",
                                         "--region-size", REGION, "--no-progress"]])
