"""TokenSR training on Qwen2.5-VL (`python -m train.tokensr --model QWEN_DIR`, BLINK.md §5 and §10) on a tiny random
Qwen2.5-VL and a tiny LLaVA-1.5 mix: batches of one grid shape, the crop teacher on non-square grids against
transformers' PyTorch model and a hand computation, loss going down, and kill-and-resume exactness."""

from __future__ import annotations

import io
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_llava_mix as tm
from blink_jax.blink.dtr import region_box
from test_qwen2_5_vl import save_model_dir
from tiny_llava import photo
from train import loop
from train.config import TrainConfig
from train.data import llava_mix
from train.metrics import read_metrics
from train.teacher import area_weights, crop_uint8

STEPS, SAVE_EVERY = 6, 3
# --max-pixels 28 x 28 x 24 with r = 2: buckets (6, 4) portrait, (4, 4) square, (4, 6) landscape, (2, 4) (2:1, unused).
MAX_PIXELS = 28 * 28 * 24
GRIDS = {(6, 4), (4, 4), (4, 6)}


def base_config(root, workdir: str, **overrides) -> TrainConfig:
    fields = dict(model=str(root / "model"), data_dir=str(root / "mix"), workdir=str(root / workdir), mesh="cpu",
                  layers=(0, 1), region_size=2, scale=2, channels=8, batch_size=2, steps=STEPS, lr=3e-3,
                  warmup_steps=2, save_every=SAVE_EVERY, keep=2, log_every=1, max_prompt_len=64, seed=0,
                  cache_dtype="float32", max_pixels=MAX_PIXELS)
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokensr_qwen")
    hf = save_model_dir(root / "model", "window", seed=5)  # 3 decoder layers, D = 60
    tm.make_llava_mix(root / "mix")  # 6 images: two portrait, two square, two landscape
    llava_mix.prepare(root / "mix", root / "mix" / "tfds")
    return root, hf


@pytest.fixture(scope="module")
def uninterrupted(root):
    root, _ = root
    trainer = loop.Trainer(base_config(root, "full"), progress=False)
    return trainer, trainer.run()


def test_batches_hold_one_grid_shape_and_every_bucket_comes(root):
    root, _ = root
    trainer = loop.Trainer(base_config(root, "batches", teacher_cache="none"), progress=False)
    grids = []
    for _ in range(6):  # two epochs of 3 batches
        batch = next(trainer.iterator)
        gh, gw = batch["image"].shape[1] // 28, batch["image"].shape[2] // 28
        assert batch["pixel_values"].shape == (2, gh * gw * 4, trainer.family.config.vision.patch_dim)
        assert (batch["attention_mask"][:, -1] == 1).all()
        grids.append((gh, gw))
    assert set(grids[:3]) == GRIDS and set(grids[3:]) == GRIDS


def test_crop_box_on_a_non_square_grid_by_hand():
    # A 4 x 6 grid of 28 px merged cells (168 x 112 px), r = 2: regions 2 rows x 3 columns; region 4 is row 1, col 1.
    assert region_box(4, (4, 6), region_size=2, patch=28) == (56, 56, 112, 112)
    image = np.asarray(photo(168, 112, seed=4))
    want = np.asarray(Image.fromarray(image[56:112, 56:112]).resize((168, 112), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(crop_uint8(image, 4, (4, 6), 2, 28), want)
    # 6 x 4 (portrait): regions 3 rows x 2 columns; region 5 is row 2, col 1
    assert region_box(5, (6, 4), region_size=2, patch=28) == (56, 112, 112, 168)


def test_teacher_targets_equal_transformers_on_the_crop(root, uninterrupted):
    """One target of the trained run's teacher = transformers' hidden states of layer L on the crop's prompt (the
    chat template up to the image), its Gh x Gw visual tokens area-pooled by hand to 4 x 4."""
    root, hf = root
    trainer, _ = uninterrupted
    from blink_jax.model.qwen2_5_vl.processing import IMAGE_PAD
    from test_qwen2_5_vl import hf_processor

    source = llava_mix.data_source(root / "mix", root / "mix" / "tfds", build=False)
    record = next(source[i] for i in range(len(source)) if Image.open(io.BytesIO(source[i]["image"])).size == (97, 70))
    family = trainer.family
    image = family.image_uint8(Image.open(io.BytesIO(record["image"])))
    assert family.grid_of(image) == (4, 6)
    region = 5  # row 1, col 2 of the 2 x 3 region grid
    digest = np.frombuffer(__import__("hashlib").sha1(record["image"]).digest(), np.uint8)
    got = trainer.teacher(image[None], digest[None], np.full((2, 1), region))  # [Lp, 1, 4, 4, D]

    crop = Image.fromarray(image[28 * 2:28 * 4, 28 * 4:28 * 6]).resize((168, 112), Image.Resampling.BICUBIC)
    proc = hf_processor(root / "model")
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}],
                                    add_generation_prompt=True, tokenize=False)
    text = text[:text.index(IMAGE_PAD) + len(IMAGE_PAD)]
    batch = proc(text=[text], images=[crop], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 12]]  # the crop keeps the grid: no resize by the processor
    with torch.no_grad():
        states = hf(**batch, output_hidden_states=True).hidden_states
    is_image = (batch["input_ids"][0] == hf.config.image_token_id).numpy()
    rows, cols = area_weights(4, 4), area_weights(6, 4)
    for l, layer in enumerate((0, 1)):  # (the last layer's hidden_states entry is transformers' final norm)
        visual = states[layer + 1][0].numpy()[is_image].reshape(4, 6, -1)
        want = np.einsum("gwd,og,qw->oqd", visual, rows, cols)
        np.testing.assert_allclose(got[l, 0], want, rtol=2e-4, atol=2e-4)
    # by hand: pooled row 0 of a 4-row grid to 4 rows is grid row 0; column 0 of 6 -> 4 averages columns 0 and 1
    visual = states[2][0].numpy()[is_image].reshape(4, 6, -1)
    np.testing.assert_allclose(got[1, 0, 0, 0], visual[0, :2].mean(0), rtol=2e-4, atol=2e-4)


def test_loss_goes_down_on_a_fixed_batch(root):
    root, _ = root
    cfg = base_config(root, "fixed", steps=30, warmup_steps=0)
    trainer = loop.Trainer(cfg, progress=False)
    state = trainer.init_or_restore()
    batch = next(trainer.iterator)
    assert batch["image"].shape[1:3] != (112, 112)  # a non-square grid (the first batch of seed 0)
    hs_lr, target, _ = trainer.inputs(batch, step=0)
    assert hs_lr.shape == (2, 2, 2, 2, 60) and target.shape == (2, 2, 4, 4, 60)
    losses = []
    for _ in range(cfg.steps):
        state, metrics = trainer.train_step(state, hs_lr, target)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_after_interruption_matches_uninterrupted_run(root, uninterrupted):
    root, _ = root
    _, full = uninterrupted
    cfg = base_config(root, "resumed")
    stopped = loop.train(cfg, stop_after=SAVE_EVERY + 1, progress=False)  # killed one step after a save
    assert stopped.step == SAVE_EVERY + 1 and stopped.tokensr_dir is None
    resumed = loop.train(cfg, progress=False)
    assert resumed.step == STEPS
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    full_losses = read_metrics(root / "full" / "metrics.jsonl")
    resumed_losses = read_metrics(root / "resumed" / "metrics.jsonl")
    assert [full_losses[s]["loss"] for s in range(1, STEPS + 1)] == [resumed_losses[s]["loss"]
                                                                    for s in range(1, STEPS + 1)]
    assert (root / "full" / "tokensr" / "tokensr.json").is_file()
    # --export-only (after a run stopped before its export) reads the Qwen directory's width: the same parameters
    from blink_jax.blink.checkpoint import load_tokensr
    from flax import nnx
    shutil.rmtree(root / "resumed" / "tokensr")
    bank, blink = load_tokensr(loop.export_only(root / "resumed"))
    assert blink.layers == (0, 1) and blink.region_size == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 nnx.to_pure_dict(nnx.state(bank, nnx.Param)), full.params)


def test_cli_trains_and_refuses_several_devices(root, capsys):
    root, _ = root
    from train.tokensr import main

    cfg = base_config(root, "cli", steps=2)
    args = ["--model", cfg.model, "--data-dir", cfg.data_dir, "--workdir", cfg.workdir, "--layers", "0,1",
            "--region-size", "2", "--channels", "8", "--batch-size", "2", "--steps", "2", "--max-prompt-len", "64",
            "--max-pixels", str(MAX_PIXELS), "--no-progress"]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main([*args, "--workdir", str(root / "cli8"), "--mesh", "data:2"]) == 2
    assert "device" in capsys.readouterr().err
