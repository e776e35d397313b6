"""TokenSR training (`python -m train.tokensr`) on a tiny random LLaVA and a tiny LLaVA-1.5 mix.

The 8-device run needs XLA_FLAGS set before JAX starts, so it runs as a subprocess, started as soon as the
fixtures exist so that it overlaps the in-process tests; its losses are compared with the 1-device run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import tiny_llava as tl
import tiny_llava_mix as tm
from blink_jax import sharding
from train import loop, stopping
from train.config import TrainConfig
from train.data import llava_mix, pipeline
from blink_jax.training.loss import distill_loss
from train.metrics import read_metrics
from blink_jax.blink.dtr import region_box
from train.teacher import TeacherCache, area_pool, crop_pixels

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 3


def base_config(root: Path, workdir: str, **overrides) -> TrainConfig:
    # 84 px -> 6x6 grid; r = 2 -> 9 regions; s = 2 -> 4x4 SR grid, so the teacher really area-pools 6 -> 4.
    fields = dict(model=str(root / "model"), data_dir=str(root / "mix"), workdir=str(root / workdir), mesh="cpu",
                  layers=(1, 2), region_size=2, scale=2, channels=8, batch_size=8, steps=STEPS, lr=3e-3,
                  warmup_steps=2, save_every=SAVE_EVERY, keep=2, log_every=1, max_prompt_len=96, seed=0,
                  cache_dtype="float32")
    fields.update(overrides)
    return TrainConfig(**fields)


def cli_args(cfg: TrainConfig) -> list[str]:
    return ["--model", cfg.model, "--data-dir", cfg.data_dir, "--workdir", cfg.workdir, "--mesh", cfg.mesh,
            "--layers", ",".join(map(str, cfg.layers)), "--region-size", str(cfg.region_size), "--scale",
            str(cfg.scale), "--channels", str(cfg.channels), "--batch-size", str(cfg.batch_size), "--steps",
            str(cfg.steps), "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps), "--save-every",
            str(cfg.save_every), "--keep", str(cfg.keep), "--log-every", str(cfg.log_every), "--max-prompt-len",
            str(cfg.max_prompt_len), "--seed", str(cfg.seed), "--cache-dtype", cfg.cache_dtype, "--no-progress"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokensr")
    tl.save_hf_model(root / "model", seed=0, vision_image_size=84, text_num_hidden_layers=4)
    tm.make_llava_mix(root / "mix")
    llava_mix.prepare(root / "mix", root / "mix" / "tfds")  # before the subprocess, so only one process builds it
    return root


@pytest.fixture(scope="module")
def cpu8(root):
    """The same run as `uninterrupted` on 8 simulated devices (data:2, fsdp:4), in the background."""
    cfg = base_config(root, "cpu8", mesh="cpu_8")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "train.tokensr", *cli_args(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, cfg
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def fresh_model(root):
    import blink_jax
    return blink_jax.load_pretrained(root / "model")


@pytest.fixture(scope="module")
def uninterrupted(root, cpu8):
    trainer = loop.Trainer(base_config(root, "full"), progress=False)
    result = trainer.run()
    return trainer, result


# -------------------------------------------------------------------------------------------- teacher, loss


def test_crop_box_and_pixels():
    # 6x6 grid of 14 px patches, r = 2: region 5 is row 1, col 2 of the 3x3 region grid.
    assert region_box(5, grid=6, region_size=2, patch=14) == (56, 28, 84, 56)
    image = np.asarray(tl.photo(84, 84, seed=2))
    got = crop_pixels(image, 5, grid=6, region_size=2, patch=14)
    from blink_jax.processing.image import normalize
    want = normalize(np.asarray(Image.fromarray(image[28:56, 56:84]).resize((84, 84), Image.Resampling.BICUBIC)))
    np.testing.assert_array_equal(got, want)


def test_area_pool_matches_slow_reference():
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 7, 5)).astype(np.float32)
    for out in (7, 5, 3, 1):
        want = np.zeros((2, 3, out, out, 5), np.float32)
        for i in range(out):
            for j in range(out):
                r0, r1 = (i * 7) // out, -(-(i + 1) * 7 // out)
                c0, c1 = (j * 7) // out, -(-(j + 1) * 7 // out)
                want[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
        np.testing.assert_allclose(np.asarray(area_pool(x, out)), want, rtol=1e-5, atol=1e-6)


def test_teacher_cache_round_trip(tmp_path):
    value = np.random.default_rng(1).standard_normal((4, 4, 5)).astype(np.float32)
    for dtype in ("float32", "bfloat16", "float16"):
        cache = TeacherCache(tmp_path / dtype, salt="s", dtype=dtype)
        key = cache.key(b"\x01" * 20, region=3, layer=2)
        assert cache.get(key) is None
        cache.put(key, value)
        got = cache.get(key)
        tol = 0 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(got, value, rtol=tol, atol=tol)
        assert key != cache.key(b"\x01" * 20, region=3, layer=1) != cache.key(b"\x01" * 20, region=2, layer=2)
        cache.path(key).write_bytes(b"garbage")
        assert cache.get(key) is None  # a damaged entry is recomputed, not fatal


def test_loss_is_kl_over_hidden_dim():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((2, 3, 2, 2, 5)).astype(np.float32)
    t = rng.standard_normal((2, 3, 2, 2, 5)).astype(np.float32)
    loss, aux = distill_loss(s, t, temperature=2.0, mse_weight=0.5)
    p = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
    q = np.exp(s / 2) / np.exp(s / 2).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1).mean()
    np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), kl + 0.5 * ((s - t) ** 2).mean(), rtol=1e-5)
    assert float(distill_loss(t, t)[0]) == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------------- sharding


def test_mesh_presets_and_rules():
    assert sharding.parse_mesh("cpu_8") == ("cpu", {"data": 2, "fsdp": 4})
    assert sharding.parse_mesh("data:2,fsdp:4") == (None, {"data": 2, "fsdp": 4})
    with pytest.raises(sharding.MeshError, match="xla_force_host_platform_device_count=8"):
        sharding.make_mesh("cpu_8")  # this process has one device
    with pytest.raises(sharding.MeshError, match="tpu preset"):
        sharding.make_mesh("tpu_v5e_8")
    with pytest.raises(sharding.MeshError, match="axis 'model' is unknown"):
        sharding.parse_mesh("model:2")
    assert dict(sharding.make_mesh("data:-1").shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    mesh = jax.sharding.AbstractMesh((2, 4, 1), sharding.MESH_AXES)
    P = jax.sharding.PartitionSpec
    assert sharding.logical_to_spec(("embed", "mlp"), (48, 61), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("mlp", "embed"), (61, 48), mesh) == P(None, "fsdp")
    assert sharding.logical_to_spec(("vocab", "embed"), (96, 42), mesh) == P(None, None)  # 42 % 4 != 0: whole
    assert sharding.logical_to_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert sharding.param_logical_axes(("language_model", "layers", 0, "self_attn", "q_proj", "kernel"), 3) == (
        "embed", "heads", "head_dim")
    with pytest.raises(ValueError, match="matches no rule"):
        sharding.param_logical_axes(("new_module", "weight"), 2)


def test_cli_help(capsys):
    from train.tokensr import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--mesh", "--layers", "--region-size", "--p-random-region", "--save-every", "--distributed"):
        assert flag in text


# ------------------------------------------------------------------------------------------------- training


def test_resume_after_interruption_matches_uninterrupted_run(root, uninterrupted):
    _, full = uninterrupted
    cfg = base_config(root, "resumed")
    stopped = loop.train(cfg, stop_after=SAVE_EVERY + 1, progress=False)  # killed one step after a save
    assert stopped.step == SAVE_EVERY + 1 and stopped.tokensr_dir is None
    assert sorted(int(p.name) for p in (root / "resumed" / "checkpoints").iterdir() if p.name.isdigit()) == [SAVE_EVERY]
    resumed = loop.train(cfg, progress=False)
    assert resumed.step == STEPS
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    full_losses = read_metrics(root / "full" / "metrics.jsonl")
    resumed_losses = read_metrics(root / "resumed" / "metrics.jsonl")
    assert [full_losses[s]["loss"] for s in range(1, STEPS + 1)] == [resumed_losses[s]["loss"]
                                                                    for s in range(1, STEPS + 1)]
    # the second epoch and the re-run step reuse cached teacher targets
    assert sum(resumed_losses[s]["teacher_cache_hits"] for s in range(SAVE_EVERY + 1, STEPS + 1)) > 0
    # a multi-host run exports afterwards from its last checkpoint: the same parameters
    from blink_jax.blink.checkpoint import load_tokensr
    from flax import nnx
    shutil.rmtree(root / "resumed" / "tokensr")
    bank, _ = load_tokensr(loop.export_only(root / "resumed"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 nnx.to_pure_dict(nnx.state(bank, nnx.Param)), full.params)


def test_ctrl_c_saves_the_finished_step_and_resumes_exactly(root, uninterrupted):
    """The first SIGINT lets the step finish, saves it (model and data iterator) and stops; rerunning resumes
    to the uninterrupted run's parameters."""
    import signal

    _, full = uninterrupted
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    cfg = base_config(root, "ctrl_c")
    trainer = loop.Trainer(cfg, progress=False)
    step_fn, calls = trainer.train_step, []

    def step_then_ctrl_c(*args):
        calls.append(1)
        if len(calls) == 2:  # in the middle of step 2, as a user would press it
            signal.raise_signal(signal.SIGINT)
        return step_fn(*args)

    trainer.train_step = step_then_ctrl_c
    with pytest.raises(stopping.TrainingInterrupted, match="interrupted after step 2"):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert sorted(int(p.name) for p in (root / "ctrl_c" / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    resumed = loop.train(cfg, progress=False)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)


def test_loss_goes_down_on_a_fixed_batch(root, uninterrupted):
    cfg = base_config(root, "fixed", steps=40, warmup_steps=0)
    trainer = loop.Trainer(cfg, progress=False)
    state = trainer.init_or_restore()
    hs_lr, target, _ = trainer.inputs(next(trainer.iterator), step=0)
    losses = []
    for _ in range(cfg.steps):
        state, metrics = trainer.train_step(state, hs_lr, target)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(losses[-5:]) < min(losses[:5])


def test_backbone_is_bit_identical_and_has_no_optimizer_state(uninterrupted, fresh_model):
    trainer, _ = uninterrupted
    fresh = fresh_model
    before = dict(jax.tree_util.tree_flatten_with_path(fresh.params)[0])
    after = dict(jax.tree_util.tree_flatten_with_path(trainer.backbone.params)[0])
    assert before.keys() == after.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(value), err_msg=str(path))
    # the optimiser state holds two moments of the TokenSR parameters and nothing else of any size
    abstract = trainer.program.abstract_state
    tokensr = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    moments = sum(x.size for x in jax.tree.leaves(abstract["opt_state"]) if x.size > 1)
    assert moments == 2 * tokensr


def test_nan_loss_stops_with_last_good_checkpoint(root, uninterrupted):
    cfg = base_config(root, "nan")
    trainer = loop.Trainer(cfg, progress=False)
    real_step = trainer.train_step

    def poisoned(state, hs_lr, target):
        state, metrics = real_step(state, hs_lr, target)
        if int(state["step"]) == SAVE_EVERY + 2:
            metrics = {**metrics, "loss": metrics["loss"] * np.nan}
        return state, metrics

    trainer.train_step = poisoned
    with pytest.raises(stopping.NonFiniteLossError, match=rf"step {SAVE_EVERY + 2}: loss=nan.*last good checkpoint is "
                                                      rf"step {SAVE_EVERY}"):
        trainer.run()
    steps = sorted(int(p.name) for p in (root / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [SAVE_EVERY]
    assert not (root / "nan" / "tokensr").exists()
    logged = read_metrics(root / "nan" / "metrics.jsonl")
    assert max(logged) == SAVE_EVERY + 1  # the NaN step was not logged as a result


def test_trained_tokensr_loads_into_blink_and_changes_outputs(root, uninterrupted, fresh_model):
    from blink_jax.blink import TokenSRBank
    from blink_jax.blink.checkpoint import load_tokensr
    from blink_jax.processing import Processor, build_prompt
    from flax import nnx

    _, result = uninterrupted
    assert result.tokensr_dir == root / "full" / "tokensr"
    bank, blink = load_tokensr(result.tokensr_dir)
    assert blink.layers == (1, 2) and blink.region_size == 2 and blink.tokensr_channels == 8
    loaded = nnx.to_pure_dict(nnx.state(bank, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, result.params)

    model = fresh_model
    processor = Processor.from_pretrained(root / "model")
    inputs = processor([build_prompt("what colour is the circle ?")], [tl.photo(97, 70, seed=9)])
    always = dataclasses.replace(blink, tau_exp=0.0, tau_drop=0.0)  # expand at every participating layer
    trained = model(**inputs, blink=always, tokensr=bank).logits
    untrained = TokenSRBank(blink, model.config.text.hidden_size, rngs=nnx.Rngs(0))  # conv3 = 0: Blink-interp
    interp = model(**inputs, blink=always, tokensr=untrained).logits
    assert np.isfinite(trained).all()
    assert np.abs(np.asarray(trained) - np.asarray(interp)).max() > 1e-4


# ----------------------------------------------------------------------------------------------------- data


def test_builder_keeps_image_samples_only(root):
    source = llava_mix.data_source(root / "mix", root / "mix" / "tfds", build=False)
    ids = sorted(source[i]["id"].decode() for i in range(len(source)))
    assert ids == [f"img-{i}" for i in range(6)]  # text-only, missing and corrupt samples are gone
    record = next(source[i] for i in range(len(source)) if source[i]["id"] == b"img-1")
    assert record["question"].decode() == tm.QUESTIONS[1]  # "<image>\n" removed
    assert record["image"] == (root / "mix" / record["image_path"].decode()).read_bytes()


def test_pipeline_batches_and_resumes(root):
    from blink_jax.processing import Processor, preprocess_image

    source = llava_mix.data_source(root / "mix", root / "mix" / "tfds", build=False)
    processor = Processor.from_pretrained(root / "model")
    loader = pipeline.make_loader(source, processor, local_batch=4, seed=3, max_prompt_len=96)
    it = iter(loader)
    first = next(it)
    assert first["input_ids"].shape == (4, 96) and first["pixel_values"].shape == (4, 3, 84, 84)
    assert first["image"].shape == (4, 84, 84, 3) and first["image_digest"].shape == (4, 20)
    assert (first["attention_mask"][:, -1] == 1).all()  # left-padded
    state = it.get_state()
    expected = [next(it)["image_digest"] for _ in range(3)]  # crosses an epoch boundary (6 records)
    resumed = iter(loader)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["image_digest"], want)
    by_digest = {hashlib.sha1(source[i]["image"]).digest(): source[i]["image"] for i in range(len(source))}
    for row in range(4):
        data = by_digest[first["image_digest"][row].tobytes()]
        want = preprocess_image(Image.open(io.BytesIO(data)), image_size=84)
        np.testing.assert_array_equal(first["pixel_values"][row], want)


def test_cpu8_gives_the_same_losses_as_one_device(root, cpu8, uninterrupted):
    proc, cfg = cpu8
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    eight = read_metrics(Path(cfg.workdir) / "metrics.jsonl")
    one = read_metrics(root / "full" / "metrics.jsonl")
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(eight[step]["loss"], one[step]["loss"], rtol=2e-4, err_msg=f"step {step}")
        np.testing.assert_allclose(eight[step]["grad_norm"], one[step]["grad_norm"], rtol=2e-3, err_msg=f"step {step}")
    assert (Path(cfg.workdir) / "tokensr" / "tokensr.json").is_file()


def test_saved_config_paths_are_absolute(tmp_path, monkeypatch):
    """config.json must work from any directory (`--export-only` reads the model path from it)."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model="m", data_dir="d", workdir="w", teacher_cache="none").with_absolute_paths()
    assert (cfg.model, cfg.data_dir, cfg.workdir) == tuple(str(tmp_path / x) for x in "mdw")
    assert cfg.tfds_dir == "" and cfg.teacher_cache == "none"  # '' and 'none' mean something: kept
    assert TrainConfig(model="m", data_dir="d", workdir="w", teacher_cache="c").with_absolute_paths().teacher_cache \
        == str(tmp_path / "c")


def test_export_only_of_a_wrong_workdir_says_what_it_needs(tmp_path, capsys):
    from train import tokensr as cli

    assert cli.main(["--export-only", "--workdir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "work directory of a `python -m train.tokensr` run" in err


def test_resuming_with_other_settings_says_so_and_keeps_the_old_config(root, uninterrupted, caplog):
    shutil.copytree(root / "full", root / "more")
    cfg = base_config(root, "more", steps=STEPS + 1, lr=1e-3)
    with caplog.at_level("WARNING", logger="train.workdir"):
        loop.Trainer(cfg, progress=False)
    assert "--steps 6 -> 7" in caplog.text and "--lr 0.003 -> 0.001" in caplog.text
    assert "--workdir" in caplog.text  # the copy lives elsewhere: said too
    previous = TrainConfig.from_json(root / "more" / "config.previous.json")
    assert previous.steps == STEPS and previous.lr == 3e-3


def test_a_data_dir_without_the_mix_is_named_before_anything_is_written(tmp_path):
    (tmp_path / "pope").mkdir()
    with pytest.raises(FileNotFoundError, match="has no llava_v1_5_mix665k.json: it is not the LLaVA-1.5 mix"):
        llava_mix.prepare(tmp_path / "pope", tmp_path / "pope" / "tfds")
    assert list((tmp_path / "pope").iterdir()) == []


def test_two_processes_train_like_cpu8_and_resume_after_a_kill(root, cpu8):
    """2 processes x 4 devices (gloo) on the cpu_8 mesh, both SIGKILLed once the first checkpoint is on disk and
    started again: every step's loss and the final TokenSR equal the one-process cpu_8 run's."""
    import signal
    import socket
    import time

    from blink_jax.blink.checkpoint import load_tokensr
    from flax import nnx

    cfg = base_config(root, "two_processes", mesh="cpu_8")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def start():
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        return [subprocess.Popen([sys.executable, "-m", "train.tokensr", *cli_args(cfg), "--coordinator",
                                  f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)], cwd=REPO,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(2)]

    procs = start()
    first = Path(cfg.workdir) / "checkpoints" / str(SAVE_EVERY)
    deadline = time.time() + 600
    while not first.is_dir() and time.time() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    procs = start()
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "resuming from" in logs[0]

    proc, cfg8 = cpu8
    out = proc.communicate(timeout=600)[0] if proc.returncode is None else ""  # (test_cpu8_... may have waited)
    assert proc.returncode == 0, out[-4000:]
    one, two = read_metrics(Path(cfg8.workdir) / "metrics.jsonl"), read_metrics(Path(cfg.workdir) / "metrics.jsonl")
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
    got, _ = load_tokensr(loop.export_only(cfg.workdir))  # a multi-process run exports afterwards, on one host
    want, _ = load_tokensr(Path(cfg8.workdir) / "tokensr")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 nnx.to_pure_dict(nnx.state(got, nnx.Param)), nnx.to_pure_dict(nnx.state(want, nnx.Param)))
