"""The demo model (issue 7): the shapes data and its POPE files, the tokenizer, packed training, the HF export.

One tiny model (56 px images, 2-layer decoder) is trained for a few steps once per module and shared.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from blink_jax.processing import Processor, build_prompt, preprocess_image, tokenize_with_image
from train.demo import backbone, shapes
from train.demo.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = backbone.DemoModelConfig.tiny()
TINY_SETTINGS = backbone.TrainSettings(steps=8, batch_size=4, questions_per_image=4, lr=3e-3, warmup_steps=1,
                                       eval_every=8, val_images=4, log_every=1, seed=3)


# ---------------------------------------------------------------------------------------------- scenes


def test_scenes_are_a_function_of_seed_stream_index():
    a = shapes.render(shapes.random_scene(shapes.item_rng(5, shapes.TRAIN, 7)))
    b = shapes.render(shapes.random_scene(shapes.item_rng(5, shapes.TRAIN, 7)))
    c = shapes.render(shapes.random_scene(shapes.item_rng(5, shapes.VAL, 7)))
    assert a.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and a.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    v1 = shapes.training_view(1, shapes.TRAIN, 11, p_zoom=0.5)
    v2 = shapes.training_view(1, shapes.TRAIN, 11, p_zoom=0.5)
    assert v1.objects == v2.objects and v1.box == v2.box
    np.testing.assert_array_equal(np.asarray(v1.image), np.asarray(v2.image))


def test_scenes_span_sub_patch_to_multi_patch_sizes_without_overlap():
    scenes = [shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i)) for i in range(40)]
    sizes = [o.size for s in scenes for o in s.objects]
    assert min(sizes) < 8 and max(sizes) > 28
    assert np.mean([o.bucket in shapes.SUB_PATCH for s in scenes for o in s.objects]) > 0.3
    for s in scenes:
        assert 1 <= len(s.objects) <= 7
        for i, a in enumerate(s.objects):
            assert 0 <= a.box[0] and a.box[2] <= s.size
            for b in s.objects[i + 1:]:
                assert not shapes._overlap(a.box, b.box, gap=0.0)


def test_zoom_view_is_the_tokensr_teacher_crop_and_lists_what_it_shows():
    from blink_jax.processing.image import normalize
    from train.teacher import crop_box, crop_pixels

    scene = shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, 3))
    full = shapes.render(scene)
    for r, region in ((3, 5), (4, 8), (6, 0)):
        box = shapes.region_box(region, r)
        assert box == crop_box(region, shapes.IMAGE_SIZE // shapes.PATCH, r, shapes.PATCH)
        view = shapes.zoom_view(scene, box, full)
        np.testing.assert_array_equal(normalize(np.asarray(view.image)),
                                      crop_pixels(np.asarray(full), region, 12, r, shapes.PATCH))
        scale = shapes.IMAGE_SIZE / (box[2] - box[0])
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            inside = max(0, min(x1, box[2]) - max(x0, box[0])) * max(0, min(y1, box[3]) - max(y0, box[1]))
            share = inside / o.size ** 2
            if share >= shapes.MIN_VISIBLE:
                assert (o.name, pytest.approx(o.size * scale)) in view.objects
            elif share > 0:
                assert o.name in view.ambiguous or o.name in view.present


def test_training_questions_are_balanced_and_true():
    rng = np.random.default_rng(0)
    answers = Counter()
    for i in range(30):
        view = shapes.training_view(0, shapes.TRAIN, i, p_zoom=0.5)
        for colour, shape, answer in shapes.sample_questions(rng, view, 8):
            name = f"{colour} {shape}"
            assert name not in view.ambiguous
            assert (name in view.present) == answer
            answers[answer] += 1
    assert answers[True] > 100 and abs(answers[True] - answers[False]) <= 0.1 * sum(answers.values())


# ---------------------------------------------------------------------------------------------- POPE files


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pope")
    counts = shapes.write_pope(out, n_images=24, seed=4, questions_per_image=4)
    assert counts == {split: 24 * 4 for split in shapes.SPLITS}
    return out


def _class_of(text: str) -> str:
    assert text.startswith("Is there a ") and text.endswith(" in the image?"), text
    return text[len("Is there a "):-len(" in the image?")]


def test_pope_files_have_popes_format_and_labels(pope_dir):
    annotations = json.loads((pope_dir / "shapes_annotations.json").read_text())
    present = {item["image"]: {o["name"] for o in item["objects"]} for item in annotations["images"]}
    positives = {}
    for split in shapes.SPLITS:
        lines = (pope_dir / f"coco_pope_{split}.json").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(set(r) == {"question_id", "image", "text", "label"} for r in rows)
        assert [r["label"] for r in rows] == ["yes", "no"] * (len(rows) // 2)
        for r in rows:
            img = pope_dir / "val2014" / r["image"]
            assert img.is_file() and r["image"].startswith("COCO_val2014_")
            assert (_class_of(r["text"]) in present[r["image"]]) == (r["label"] == "yes")
        positives[split] = [(r["image"], r["text"]) for r in rows if r["label"] == "yes"]
        assert len(set((r["image"], r["text"]) for r in rows)) == len(rows)  # no question twice
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    with Image.open(pope_dir / "val2014" / shapes.pope_image_name(0)) as img:
        assert img.size == (168, 168) and img.format == "PNG"


def test_pope_popular_and_adversarial_negatives_follow_popes_sampling(pope_dir):
    annotations = json.loads((pope_dir / "shapes_annotations.json").read_text())
    present = {item["image"]: {o["name"] for o in item["objects"]} for item in annotations["images"]}
    frequency = Counter(name for names in present.values() for name in names)
    cooccur = Counter((a, b) for names in present.values() for a in names for b in names)
    for split in ("popular", "adversarial"):
        rows = [json.loads(line) for line in (pope_dir / f"coco_pope_{split}.json").read_text().splitlines()]
        for image, names in present.items():
            negatives = [_class_of(r["text"]) for r in rows if r["image"] == image and r["label"] == "no"]
            absent = [c for c in shapes.CLASSES if c not in names]
            if split == "popular":
                score = lambda c: frequency[c]
            else:
                score = lambda c: sum(cooccur[(g, c)] for g in names)
            best = sorted((score(c) for c in absent), reverse=True)[:len(negatives)]
            assert sorted((score(c) for c in negatives), reverse=True) == best


def test_pope_files_read_through_the_pope_benchmark(pope_dir):
    from eval.benchmarks.pope import Pope

    docs = list(Pope().read_official(pope_dir))
    assert len(docs) == 3 * 24 * 4
    assert all((pope_dir / d["image_file"]).is_file() for d in docs)
    assert Counter(d["label"] for d in docs) == {"yes": 3 * 48, "no": 3 * 48}


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (BOS_ID, EOS_ID, PAD_ID,
                                                                                         UNK_ID)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID == again.convert_tokens_to_ids("<image>")
    for name in shapes.CLASSES:
        question = shapes.question_text(*name.split())
        prompt = build_prompt(question)
        ids = tok(prompt).input_ids
        assert ids == again(prompt).input_ids
        assert ids[0] == BOS_ID and UNK_ID not in ids and ids.count(IMAGE_ID) == 1
        assert tok.decode(tok(question).input_ids, skip_special_tokens=True) == question
    assert tok.decode(tok("Yes").input_ids + [EOS_ID], skip_special_tokens=True) == "Yes"


# ---------------------------------------------------------------------------------------------- model


def test_packed_rows_compute_what_plain_prompts_compute():
    from blink_jax.model.forward import prefill

    cfg = TINY.llava_config()
    tok = build_tokenizer()
    model = backbone.init_model(cfg, seed=1)
    layout = backbone.PackedLayout.build(tok, cfg, k=3)
    questions = [[("red", "circle", True), ("blue", "cross", False)],
                 [("white", "diamond", False), ("green", "square", True), ("purple", "triangle", True)]]
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    batch = layout.pack(questions)
    packed = np.asarray(backbone.packed_logits(model, layout, batch["input_ids"], pixels))  # [B, K, 2, V]
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 0], [1, 1, 1]])
    masked = backbone.PackedLayout.mask(layout)
    assert masked[len(layout.prefix) + layout.block, len(layout.prefix)] == False  # blocks do not see each other
    for row, qs in enumerate(questions):
        for j, (colour, shape, answer) in enumerate(qs):
            ids = tokenize_with_image(tok, build_prompt(shapes.question_text(colour, shape)), IMAGE_ID,
                                      cfg.num_image_tokens) + [tok.convert_tokens_to_ids("Yes" if answer else "No")]
            ids = np.asarray([ids], np.int32)
            logits, _ = prefill(model, ids, pixels[row:row + 1], np.ones_like(ids))
            np.testing.assert_allclose(packed[row, j], np.asarray(logits[0, -2:]), atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def trained():
    return backbone.train(TINY, TINY_SETTINGS, progress=False)


def test_a_few_training_steps_reduce_the_loss_and_log(trained):
    losses = [h["loss"] for h in trained.history]
    assert len(losses) == TINY_SETTINGS.steps and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    last = trained.history[-1]
    assert {"val/accuracy", "val_zoom/accuracy", "grad_norm", "accuracy"} <= set(last)


def test_training_is_a_function_of_the_seed(trained):
    b1 = backbone.train_batch(2, TINY_SETTINGS, backbone.PackedLayout.build(build_tokenizer(), TINY.llava_config(), 4),
                              56)
    b2 = backbone.train_batch(2, TINY_SETTINGS, backbone.PackedLayout.build(build_tokenizer(), TINY.llava_config(), 4),
                              56)
    for key in b1:
        np.testing.assert_array_equal(b1[key], b2[key])
    init1 = backbone.flat_params(backbone.init_model(TINY.llava_config(), 3))
    init2 = backbone.flat_params(backbone.init_model(TINY.llava_config(), 3))
    assert all(np.array_equal(init1[k], init2[k]) for k in init1)
    # The same run again: same losses (XLA on CPU is deterministic for a fixed program and thread count).
    short = dataclasses.replace(TINY_SETTINGS, steps=3, val_images=0)
    again = backbone.train(TINY, short, progress=False)
    np.testing.assert_allclose([h["loss"] for h in again.history],
                               [h["loss"] for h in backbone.train(TINY, short, progress=False).history], rtol=1e-6)


def _logits_both_ways(model_dir: Path, image: Image.Image, question: str):
    import torch
    from transformers import LlavaForConditionalGeneration

    import blink_jax

    ours = blink_jax.load_pretrained(model_dir)
    processor = Processor.from_pretrained(model_dir)
    inputs = processor([build_prompt(question)], [image])
    from blink_jax.model.forward import prefill

    our_logits, _ = prefill(ours.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    hf = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                    pixel_values=torch.from_numpy(inputs["pixel_values"]),
                    attention_mask=torch.from_numpy(inputs["attention_mask"]).long()).logits
    return np.asarray(our_logits), theirs.numpy()


def test_exported_hf_directory_loads_in_both_loaders_with_equal_logits(trained, tmp_path):
    out = backbone.save_hf(trained.model, TINY, tmp_path / "model", dtype=np.float16,
                           extra_files={"note.txt": "tiny"})
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "note.txt"} <= {
        p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".model.tmp-*"))
    view = shapes.training_view(0, shapes.VAL, 0, p_zoom=0.0)
    ours, theirs = _logits_both_ways(out, view.image.resize((56, 56)), "Is there a red circle in the image?")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # fp16 storage: the loaded weights are the trained ones rounded to fp16
    import blink_jax

    loaded = backbone.flat_params(blink_jax.load_pretrained(out).model)
    for path, value in backbone.flat_params(trained.model).items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value).astype(np.float16).astype(np.float32))


BUNDLED = REPO / "demo" / "model"
BUNDLED_POPE = REPO / "demo" / "data" / "pope"


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="no bundled demo model in demo/model")
def test_bundled_model_loads_in_both_loaders_with_equal_logits():
    image_dir = BUNDLED_POPE / "val2014"
    image = Image.open(image_dir / shapes.pope_image_name(0)).convert("RGB") if image_dir.is_dir() else \
        shapes.render(shapes.random_scene(shapes.item_rng(0, shapes.VAL, 0)))
    ours, theirs = _logits_both_ways(BUNDLED, image, "Is there a blue triangle in the image?")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
