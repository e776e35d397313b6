"""Checkpoint conversion HF <-> orbax on tiny real HF directories: every key layout and file format, bit-exact
round trips, logits against transformers, and every kind of bad input failing loudly with nothing written."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import tiny_llava as tl
from blink_jax.config import ConfigError, LlavaConfig
from blink_jax.loading import load_pretrained
from blink_jax.model import forward
from blink_jax.weights import hf_reader, orbax_io
from blink_jax.weights.hf_writer import export
from blink_jax.weights.param_mapping import canonical_key
from blink_jax.weights.params import CheckpointError, model_from_params
from checkpoints_conversion import hf_to_orbax, orbax_to_hf

AUX = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


# ------------------------------------------------------------------------------------------ helpers


def batch(cfg: LlavaConfig, lengths=(27, 20), seed=0):
    """Two prompts of different lengths, left padded, each with one run of image tokens."""
    rng = np.random.default_rng(seed)
    p, t = cfg.num_image_tokens, max(lengths)
    ids = np.full((len(lengths), t), 3, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        start = t - n
        ids[row, start:] = rng.integers(5, cfg.text.vocab_size, n)
        ids[row, start] = 1
        ids[row, start + 2 + row: start + 2 + row + p] = cfg.image_token_index
        mask[row, start:] = 1
    return ids, tl.random_pixels(len(lengths), cfg.vision.image_size, seed), mask


def hf_logits(hf_model, ids, pixels, mask) -> np.ndarray:
    pos = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                        attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


_GRAPHDEFS: dict[LlavaConfig, nnx.GraphDef] = {}


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids, pixels, mask):
    return forward.prefill(nnx.merge(graphdef, state), ids, pixels, mask)[0]


def converted_logits(converted_dir, ids, pixels, mask) -> np.ndarray:
    """Logits of the model read back from a converted directory.

    One compiled program per config: each new model's graphdef differs (its activation functions are
    fresh lambdas), so every `Llava` would recompile; the state pytrees match, so reuse the first graphdef.
    """
    cfg, params = orbax_io.read_params(converted_dir)
    graphdef, state = nnx.split(model_from_params(cfg, params))
    graphdef = _GRAPHDEFS.setdefault(cfg, graphdef)
    return np.asarray(_logits(graphdef, state, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))


def assert_logits_close(ours, theirs, mask, atol=1e-4):
    real = mask > 0  # padded positions are arbitrary in both
    np.testing.assert_allclose(ours[real], theirs[real], atol=atol, rtol=0)


def new_dir(base: Path, tensors: dict[str, torch.Tensor], fmt: str = "safetensors", src: Path | None = None,
            shards: int = 3) -> Path:
    """An HF directory holding `tensors` (stored keys as given) in `fmt`, plus config/tokenizer from `src`."""
    base.mkdir(parents=True)
    for name in AUX:
        if src is not None and (src / name).is_file():
            shutil.copy(src / name, base / name)
    keys = list(tensors)
    if fmt == "safetensors":
        save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(tensors, base / "pytorch_model.bin")
    else:  # sharded, with an index file, the way transformers names the shards
        ext, stem = ("safetensors", "model") if fmt == "sharded_safetensors" else ("bin", "pytorch_model")
        weight_map = {}
        for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
            name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
            chunk = {keys[j]: tensors[keys[j]] for j in part}
            if ext == "safetensors":
                save_file(chunk, str(base / name), metadata={"format": "pt"})
            else:
                torch.save(chunk, base / name)
            weight_map.update(dict.fromkeys(chunk, name))
        (base / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base


def stored(hf_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(hf_dir / "model.safetensors"))


def nothing_written(out: Path) -> bool:
    """No output and no temporary sibling left behind."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """The tiny model converted once, for the tests that only read a converted directory."""
    return hf_to_orbax.convert(tiny["dir"], tmp_path_factory.mktemp("conv") / "jax", progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny HF LLaVA (transformers-5 save layout), its torch model, a batch and its HF logits."""
    hf_dir = tmp_path_factory.mktemp("hf") / "tiny"
    model, _ = tl.save_hf_model(hf_dir, seed=0)
    cfg = LlavaConfig.from_json(hf_dir)
    inputs = batch(cfg)
    return dict(dir=hf_dir, model=model, cfg=cfg, inputs=inputs, logits=hf_logits(model, *inputs))


# --------------------------------------------------------------------------------- layouts & formats


def _layout_dir(tiny, tmp_path, name) -> Path:
    saved = stored(tiny["dir"])
    in_memory = {k: v.detach().clone() for k, v in tiny["model"].state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in in_memory)  # the layout this case is about
    cases = {
        "saved": lambda: tiny["dir"],
        "hub": lambda: new_dir(tmp_path / "hf", {canonical_key(k): v for k, v in saved.items()}, src=tiny["dir"]),
        "in_memory": lambda: new_dir(tmp_path / "hf", in_memory, src=tiny["dir"]),
        "sharded_safetensors": lambda: new_dir(tmp_path / "hf", saved, "sharded_safetensors", tiny["dir"]),
        "torch_bin": lambda: new_dir(tmp_path / "hf", in_memory, "bin", tiny["dir"]),
        "sharded_bin": lambda: new_dir(tmp_path / "hf", saved, "sharded_bin", tiny["dir"]),
    }
    return cases[name]()


@pytest.mark.parametrize("name", ["saved", "hub", "in_memory", "sharded_safetensors", "torch_bin", "sharded_bin"])
def test_every_layout_and_format_gives_hf_logits(tiny, tmp_path, name):
    src = _layout_dir(tiny, tmp_path, name)
    out = hf_to_orbax.convert(src, tmp_path / "jax", progress=False)
    assert orbax_io.is_converted_dir(out) and not hf_reader.list_tensors(src).keys() - hf_reader.list_tensors(
        tiny["dir"]).keys()
    assert_logits_close(converted_logits(out, *tiny["inputs"]), tiny["logits"], tiny["inputs"][2])


def test_hub_layout_keys_really_differ(tiny):
    """The hub case above is only a test if the saved layout lacks `vision_model.`."""
    keys = stored(tiny["dir"])
    assert "vision_tower.embeddings.class_embedding" in keys
    assert not any(k.startswith("vision_tower.vision_model.") for k in keys)


def test_read_params_streams_one_tensor_at_a_time(tiny):
    refs = hf_reader.list_tensors(tiny["dir"])
    assert all(not hasattr(r, "data") for r in refs.values())
    it = hf_reader.iter_tensors(tiny["dir"], ["language_model.model.norm.weight"])
    key, value = next(it)
    assert key == "language_model.model.norm.weight" and value.shape == (48,)
    with pytest.raises(StopIteration):
        next(it)


# -------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tiny, tmp_path, dtype):
    from transformers import LlavaForConditionalGeneration

    src = new_dir(tmp_path / "hf", {k: v.to(dtype) for k, v in stored(tiny["dir"]).items()}, src=tiny["dir"])
    conv = hf_to_orbax.convert(src, tmp_path / "jax", progress=False)
    back = export(conv, tmp_path / "back")
    a, b = stored(src), stored(back)
    assert set(b) == set(a)  # the source is in the saved layout: same keys exactly
    for key in a:
        assert b[key].dtype == a[key].dtype == dtype, key
        assert np.array_equal(a[key].view(torch.int16 if dtype == torch.bfloat16 else dtype).numpy(),
                              b[key].view(torch.int16 if dtype == torch.bfloat16 else dtype).numpy()), key
    for name in AUX[1:]:
        assert (back / name).read_bytes() == (src / name).read_bytes()
    _, info = LlavaForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_round_trip_from_hub_layout_writes_saved_layout(tiny, tmp_path):
    hub = {canonical_key(k): v for k, v in stored(tiny["dir"]).items()}
    src = new_dir(tmp_path / "hf", hub, src=tiny["dir"])
    back = export(hf_to_orbax.convert(src, tmp_path / "jax", progress=False), tmp_path / "back")
    assert set(stored(back)) == set(stored(tiny["dir"]))


def test_out_dir_must_not_be_the_source(tiny):
    with pytest.raises(FileExistsError, match="HF directory itself"):
        hf_to_orbax.convert(tiny["dir"], tiny["dir"], overwrite=True, progress=False)
    assert (tiny["dir"] / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- other configs


@pytest.mark.parametrize("overrides", [
    # GQA 9 over 3 kv heads, head_dim 6, odd widths and vocab
    dict(text_hidden_size=54, text_num_attention_heads=9, text_num_key_value_heads=3, text_intermediate_size=37,
         text_vocab_size=101,
         vision_hidden_size=35, vision_intermediate_size=29),
    dict(text_tie_word_embeddings=True, tie_word_embeddings=True),
], ids=["gqa_odd", "tied"])
def test_other_configs_convert(tmp_path, overrides):
    model, _ = tl.save_hf_model(tmp_path / "hf", seed=3, **overrides)
    cfg = LlavaConfig.from_json(tmp_path / "hf")
    if "tie_word_embeddings" in overrides:
        assert cfg.text.tie_word_embeddings and "language_model.lm_head.weight" not in stored(tmp_path / "hf")
    inputs = batch(cfg)
    out = hf_to_orbax.convert(tmp_path / "hf", tmp_path / "jax", progress=False)
    assert_logits_close(converted_logits(out, *inputs), hf_logits(model, *inputs), inputs[2])


def test_tied_config_ignores_a_stored_lm_head(tmp_path):
    tl.save_hf_model(tmp_path / "hf", seed=3, text_tie_word_embeddings=True, tie_word_embeddings=True)
    tensors = stored(tmp_path / "hf")
    tensors["language_model.lm_head.weight"] = torch.zeros_like(tensors["language_model.model.embed_tokens.weight"])
    src = new_dir(tmp_path / "hf2", tensors, src=tmp_path / "hf")
    cfg = LlavaConfig.from_json(src)
    params = hf_reader.read_params(src, cfg)
    assert ("language_model", "lm_head", "kernel") not in params
    np.testing.assert_array_equal(params[("language_model", "embed_tokens", "embedding")],
                                  tensors["language_model.model.embed_tokens.weight"].numpy())


# --------------------------------------------------------------------------------------- bad input


def _broken(tiny, tmp_path, missing=False, extra=False, wrong_shape=False) -> Path:
    tensors = stored(tiny["dir"])
    if missing:
        del tensors["language_model.model.norm.weight"]
    if extra:
        tensors["language_model.model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 5)
    if wrong_shape:
        key = "multi_modal_projector.linear_1.weight"
        tensors[key] = tensors[key].T.contiguous()
    return new_dir(tmp_path / "hf", tensors, src=tiny["dir"])


MISSING = "missing key 'language_model.model.norm.weight'"
EXTRA = "unexpected key 'language_model.model.layers.0.mlp.extra_proj.weight'"
SHAPE = "checkpoint key 'multi_modal_projector.linear_1.weight' has shape (40, 48), expected (48, 40)"


@pytest.mark.parametrize("kinds", [("missing",), ("extra",), ("wrong_shape",), ("missing", "extra", "wrong_shape")])
def test_key_and_shape_errors_are_listed_together_and_nothing_is_written(tiny, tmp_path, monkeypatch, kinds):
    src = _broken(tiny, tmp_path, **dict.fromkeys(kinds, True))
    out = tmp_path / "jax"

    def read(*args):
        raise AssertionError("tensor data was read before the checkpoint was validated")

    monkeypatch.setattr(hf_reader, "_read", read)
    with pytest.raises(CheckpointError) as err:
        hf_to_orbax.convert(src, out, progress=False)
    expected = {"missing": MISSING, "extra": EXTRA, "wrong_shape": SHAPE}
    for kind, text in expected.items():
        assert (text in str(err.value)) == (kind in kinds), str(err.value)
    assert nothing_written(out)


def test_cli_reports_the_error_and_writes_nothing(tiny, tmp_path, capsys):
    src = _broken(tiny, tmp_path, missing=True)
    out = tmp_path / "jax"
    assert hf_to_orbax.main(["--hf-dir", str(src), "--out", str(out), "--no-progress"]) == 2
    assert MISSING in capsys.readouterr().err
    assert nothing_written(out)


@pytest.mark.parametrize("fmt,damage", [("safetensors", "truncated"), ("safetensors", "garbage_header"),
                                        ("bin", "truncated")])
def test_corrupt_weight_file_names_the_file(tiny, tmp_path, fmt, damage):
    src = new_dir(tmp_path / "hf", stored(tiny["dir"]), f"sharded_{fmt}", tiny["dir"])
    shard = src / f"{'model' if fmt == 'safetensors' else 'pytorch_model'}-00002-of-00003.{fmt}"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncated" else b"\xff" * 8 + b"not json" + data[16:])
    out = tmp_path / "jax"
    with pytest.raises(CheckpointError, match=shard.name):
        hf_to_orbax.convert(src, out, progress=False)
    assert nothing_written(out)


def test_missing_shard_is_named(tiny, tmp_path):
    src = new_dir(tmp_path / "hf", stored(tiny["dir"]), "sharded_safetensors", tiny["dir"])
    (src / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors"):
        hf_reader.list_tensors(src)


def test_duplicate_keys_across_layouts_are_an_error(tiny, tmp_path):
    tensors = stored(tiny["dir"])
    tensors["vision_tower.vision_model.post_layernorm.bias"] = tensors["vision_tower.post_layernorm.bias"].clone()
    src = new_dir(tmp_path / "hf", tensors, src=tiny["dir"])
    with pytest.raises(CheckpointError, match="vision_tower.post_layernorm.bias") as err:
        hf_to_orbax.convert(src, tmp_path / "jax", progress=False)
    assert "vision_tower.vision_model.post_layernorm.bias" in str(err.value)
    assert nothing_written(tmp_path / "jax")


def test_non_llava_config_is_refused(tiny, tmp_path):
    src = new_dir(tmp_path / "hf", stored(tiny["dir"]), src=tiny["dir"])
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama'"):
        hf_to_orbax.convert(src, tmp_path / "jax", progress=False)
    assert nothing_written(tmp_path / "jax")


def test_non_empty_out_is_not_overwritten_unless_asked(tiny, tmp_path):
    out = tmp_path / "jax"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_to_orbax.convert(tiny["dir"], out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    hf_to_orbax.convert(tiny["dir"], out, overwrite=True, progress=False)
    assert orbax_io.is_converted_dir(out) and not (out / "precious.txt").exists()
    assert not list(tmp_path.glob(".jax.*"))


# -------------------------------------------------------------------------------------- atomicity


def test_crash_mid_write_leaves_nothing_that_looks_converted(tiny, tmp_path, monkeypatch):
    out = tmp_path / "jax"
    save = orbax_io._GroupWriter._save
    calls = []

    def save_then_crash(self, group, params):
        save(self, group, params)
        calls.append(group)
        # what a `kill -9` at this moment would leave: a temporary sibling, not recognised as converted
        assert not out.exists()
        (tmp,) = tmp_path.glob(".jax.tmp-*")
        assert not orbax_io.is_converted_dir(tmp)
        raise KeyboardInterrupt("simulated crash after the first group")

    monkeypatch.setattr(orbax_io._GroupWriter, "_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        hf_to_orbax.convert(tiny["dir"], out, progress=False)
    assert len(calls) == 1
    assert not orbax_io.is_converted_dir(out) and nothing_written(out)


def test_a_killed_conversions_leftovers_are_removed_by_the_next(tiny, tmp_path):
    """What a `kill -9` leaves (`.jax.tmp-<pid>` of a dead process, up to the model's size) goes with the next
    conversion to the same place; a live process's temporary directory is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stranded = tmp_path / f".jax.tmp-{dead.pid}"
    (stranded / "params").mkdir(parents=True)
    (stranded / "params" / "chunk").write_bytes(b"0" * 1024)
    live = tmp_path / f".jax.tmp-{os.getppid()}"
    live.mkdir()
    out = hf_to_orbax.convert(tiny["dir"], tmp_path / "jax", progress=False)
    assert orbax_io.is_converted_dir(out)
    assert not stranded.exists() and live.exists()


def test_non_finite_weights_are_refused_by_name(tiny, tmp_path):
    """NaN weights would convert and load, and every answer would be "" (POPE 66.67): refused, naming the
    tensor, by the converter and by both loaders."""
    tensors = stored(tiny["dir"])
    key = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, :3] = float("nan")
    bad = new_dir(tmp_path / "bad", tensors, src=tiny["dir"])
    with pytest.raises(CheckpointError, match=r"'language_model\.layers\.1\.mlp\.up_proj\.kernel' holds 3 NaN"):
        hf_to_orbax.convert(bad, tmp_path / "jax", progress=False)
    assert nothing_written(tmp_path / "jax")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.kernel' holds 3 NaN or infinite"):
        load_pretrained(bad)


def test_writer_refuses_an_incomplete_stream(tiny, tmp_path):
    steps = hf_reader.plan(tiny["dir"], tiny["cfg"])
    partial = hf_reader.iter_plan(steps[:-1])
    with pytest.raises(CheckpointError, match="without 1 parameter"):
        orbax_io.write_converted(tmp_path / "jax", tiny["dir"], partial)
    assert nothing_written(tmp_path / "jax")


# ----------------------------------------------------------------------------------- load_pretrained


def test_load_pretrained_hf_and_converted_dirs_agree(tiny, converted):
    conv = converted
    ids, pixels, mask = tiny["inputs"]
    a = load_pretrained(tiny["dir"])(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    b = load_pretrained(conv)(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_logits_close(np.asarray(b), tiny["logits"], mask)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_help(capsys):
    res = subprocess.run([sys.executable, "-m", "checkpoints_conversion.hf_to_orbax", "--help"], capture_output=True,
                         text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert res.returncode == 0, res.stderr
    assert all(flag in res.stdout for flag in ("--hf-dir", "--out", "--dtype", "--verify", "--overwrite"))
    with pytest.raises(SystemExit) as exit_:
        orbax_to_hf.main(["--help"])
    assert exit_.value.code == 0 and "--converted" in capsys.readouterr().out


def test_cli_convert_to_bf16_verify_and_export(tiny, tmp_path, capsys):
    out = tmp_path / "jax"
    argv = ["--hf-dir", str(tiny["dir"]), "--out", str(out), "--dtype", "bfloat16", "--verify", "--no-progress"]
    assert hf_to_orbax.main(argv) == 0
    printed = capsys.readouterr().out
    # --verify rounds transformers' weights to bf16 too, so the two models agree to fp32 precision
    diff = float(printed.split("max |logit difference| vs transformers = ")[1].split()[0])
    assert diff < 1e-4, printed
    _, params = orbax_io.read_params(out)
    assert {str(x.dtype) for x in params.values()} == {"bfloat16"}
    assert orbax_io.read_marker(out)["dtype"] == "bfloat16"
    assert orbax_to_hf.main(["--converted", str(out), "--out", str(tmp_path / "back")]) == 0
    back = stored(tmp_path / "back")
    assert {t.dtype for t in back.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


def test_verify_catches_a_wrong_conversion(tiny, tmp_path, monkeypatch):
    """--verify must fail (exit 1) if the converted weights are wrong: scale one MLP kernel."""
    out = tmp_path / "jax"
    real = hf_reader.iter_plan

    def swapped(steps, dtype=None):
        for path, x in real(steps, dtype):
            yield path, (x * 1.5 if path == ("language_model", "layers", 1, "mlp", "up_proj", "kernel") else x)

    monkeypatch.setattr(hf_reader, "iter_plan", swapped)
    assert hf_to_orbax.main(["--hf-dir", str(tiny["dir"]), "--out", str(out), "--verify", "--no-progress"]) == 1


def test_without_torch_a_pickle_and_verify_say_how_to_get_it(tiny, tmp_path, monkeypatch, capsys):
    """PyTorch is optional (safetensors need none): where it is needed, the error says so, before any work."""
    src = new_dir(tmp_path / "hf", stored(tiny["dir"]), "bin", tiny["dir"])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
        with pytest.raises(CheckpointError, match="PyTorch pickle, which needs PyTorch.*pip install torch"):
            hf_reader._header(src / "pytorch_model.bin")
    monkeypatch.setattr(hf_to_orbax.importlib.util, "find_spec", lambda name: None if name == "torch" else True)
    out = tmp_path / "jax2"
    assert hf_to_orbax.main(["--hf-dir", str(tiny["dir"]), "--out", str(out), "--verify", "--no-progress"]) == 2
    assert "--verify runs transformers' PyTorch model" in capsys.readouterr().err
    assert not out.exists()


def test_converting_a_converted_dir_says_what_it_is(converted, tmp_path):
    with pytest.raises(CheckpointError, match="already a converted blink-jax directory"):
        hf_to_orbax.convert(converted, tmp_path / "again", progress=False)
