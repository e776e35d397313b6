"""Checkpoint conversion HF <-> orbax for Qwen2.5-VL, through the same converter and exporter as LLaVA, on tiny
random models saved by transformers: bit-exact round trips, a converted directory that loads (weights, tokenizer,
processor, chat template) and gives transformers' logits, and bad checkpoints refused by name with nothing
written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import blink_jax
from blink_jax.families import QWEN2_5_VL
from blink_jax.model.qwen2_5_vl import QwenProcessor
from blink_jax.model.qwen2_5_vl.runtime import Qwen
from blink_jax.weights import orbax_io
from blink_jax.weights.hf_writer import export
from blink_jax.weights.params import CheckpointError
from checkpoints_conversion import hf_to_orbax, orbax_to_hf
from test_qwen2_5_vl import QUESTIONS, hf_inputs, save_model_dir

# What travels besides the weights (config.json is rewritten with the stored dtype, so compared apart).
AUX = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja")
KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny Qwen2.5-VL (window attention, GQA, untied head), its torch model, a batch and its logits."""
    path = tmp_path_factory.mktemp("qwen") / "hf"
    model = save_model_dir(path, "window", seed=4)
    batch, images = hf_inputs(path)
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    return dict(dir=path, model=model, batch=batch, images=images, logits=logits)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    return hf_to_orbax.convert(tiny["dir"], tmp_path_factory.mktemp("conv") / "jax", progress=False)


def stored(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def copy_with(tiny, dst, tensors):
    """An HF directory holding `tensors` and the tiny model's config, tokenizer and processor files."""
    dst.mkdir(parents=True)
    for f in tiny["dir"].iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def nothing_written(out) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# -------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tiny, tmp_path, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    src = copy_with(tiny, tmp_path / "hf", {k: v.to(dtype) for k, v in stored(tiny["dir"]).items()})
    conv = hf_to_orbax.convert(src, tmp_path / "jax", progress=False)
    assert orbax_io.read_marker(conv)["model_type"] == "qwen2_5_vl"
    assert orbax_to_hf.main(["--converted", str(conv), "--out", str(tmp_path / "back")]) == 0
    a, b = stored(src), stored(tmp_path / "back")
    assert set(a) == set(b) and len(a) > 40
    as_bits = (lambda t: t.view(torch.int16)) if dtype == torch.bfloat16 else (lambda t: t)
    for key in a:  # every tensor, bit for bit
        assert a[key].dtype == b[key].dtype == dtype, key
        assert torch.equal(as_bits(a[key]), as_bits(b[key])), key
    for name in AUX:
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == str(dtype).split(".")[-1]
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_tied_head_round_trip(tmp_path):
    """A tied model stores no head: none is converted, none exported, and transformers loads the export."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    save_model_dir(tmp_path / "hf", "tied", seed=5)
    src = stored(tmp_path / "hf")
    src.pop("lm_head.weight", None)
    conv = hf_to_orbax.convert(tmp_path / "hf", tmp_path / "jax", progress=False)
    back = stored(export(conv, tmp_path / "back", family=QWEN2_5_VL))
    assert set(back) == set(src) and "lm_head.weight" not in back
    for key in src:
        assert torch.equal(back[key], src[key]), key
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# ------------------------------------------------------------------------------------------ loading it


def test_converted_dir_loads_with_its_processor_and_gives_transformers_logits(tiny, converted):
    model = blink_jax.load_pretrained(converted)
    assert isinstance(model, Qwen)
    # the processor reads the tokenizer, image processor and chat template that travelled with the weights
    ours = QwenProcessor.from_pretrained(converted)(QUESTIONS, tiny["images"])
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        np.testing.assert_array_equal(ours[key], tiny["batch"][key].numpy(), err_msg=key)
    got = np.asarray(model(**{k: ours[k] for k in KEYS}).logits)
    valid = tiny["batch"]["attention_mask"].numpy() > 0
    np.testing.assert_allclose(got[valid], tiny["logits"][valid], atol=1e-4, rtol=0)
    assert np.abs(tiny["logits"][valid]).max() > 0.1


def test_converted_and_hf_dirs_load_the_same_parameters(tiny, converted):
    from flax import nnx

    a = nnx.to_flat_state(blink_jax.load_pretrained(tiny["dir"]).params)
    b = dict(nnx.to_flat_state(blink_jax.load_pretrained(converted).params))
    assert len(a) == len(b)
    for path, var in a:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(b[path][...]), err_msg=str(path))


def test_cli_verify_against_transformers(tiny, tmp_path, capsys):
    out = tmp_path / "jax"
    argv = ["--hf-dir", str(tiny["dir"]), "--out", str(out), "--dtype", "bfloat16", "--verify", "--no-progress"]
    assert hf_to_orbax.main(argv) == 0
    printed = capsys.readouterr().out
    diff = float(printed.split("max |logit difference| vs transformers = ")[1].split()[0])
    assert diff < 1e-4, printed


def test_verify_catches_a_wrong_conversion(tiny, tmp_path, monkeypatch):
    real = hf_to_orbax.hf_reader.iter_plan

    def scaled(steps, dtype=None):
        for path, x in real(steps, dtype):
            yield path, (x * 1.5 if path == ("language_model", "layers", 1, "mlp", "up_proj", "kernel") else x)

    monkeypatch.setattr(hf_to_orbax.hf_reader, "iter_plan", scaled)
    argv = ["--hf-dir", str(tiny["dir"]), "--out", str(tmp_path / "jax"), "--verify", "--no-progress"]
    assert hf_to_orbax.main(argv) == 1


def test_a_converted_qwen_dir_is_not_read_as_llava(converted, tmp_path):
    with pytest.raises(CheckpointError, match="holds a 'qwen2_5_vl' model, not LLaVA"):
        orbax_io.read_params(converted)
    with pytest.raises(CheckpointError, match="holds a 'qwen2_5_vl' model, not LLaVA"):
        export(converted, tmp_path / "back")
    assert nothing_written(tmp_path / "back")


# ------------------------------------------------------------------------------------------- bad input

MISSING = "missing key 'model.layers.1.self_attn.k_proj.bias'"
EXTRA = "unexpected key 'visual.blocks.0.attn.qkv.scale'"
SHAPE = "checkpoint key 'visual.merger.mlp.0.weight' has shape (240, 239), expected (240, 240)"


def test_key_and_shape_errors_are_named_together_and_nothing_is_written(tiny, tmp_path, capsys):
    tensors = stored(tiny["dir"])
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["visual.blocks.0.attn.qkv.scale"] = torch.ones(3)
    tensors["visual.merger.mlp.0.weight"] = tensors["visual.merger.mlp.0.weight"][:, :-1].contiguous()
    src = copy_with(tiny, tmp_path / "hf", tensors)
    out = tmp_path / "jax"
    assert hf_to_orbax.main(["--hf-dir", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in (MISSING, EXTRA, SHAPE)), err
    assert "Qwen2.5-VL config.json" in err
    assert nothing_written(out)


def test_non_finite_weights_are_refused_by_name(tiny, tmp_path):
    tensors = stored(tiny["dir"])
    tensors["model.layers.2.mlp.up_proj.weight"][0, :3] = float("nan")
    src = copy_with(tiny, tmp_path / "hf", tensors)
    with pytest.raises(CheckpointError, match=r"'language_model\.layers\.2\.mlp\.up_proj\.kernel' holds 3 NaN"):
        hf_to_orbax.convert(src, tmp_path / "jax", progress=False)
    assert nothing_written(tmp_path / "jax")
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.up_proj\.kernel' holds 3 NaN"):
        blink_jax.load_pretrained(src)


def test_a_killed_conversions_leftovers_are_removed_by_the_next(tiny, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stranded = tmp_path / f".jax.tmp-{dead.pid}"
    (stranded / "params").mkdir(parents=True)
    (stranded / "params" / "chunk").write_bytes(b"0" * 1024)
    out = hf_to_orbax.convert(tiny["dir"], tmp_path / "jax", progress=False)
    assert orbax_io.is_converted_dir(out) and not stranded.exists()
