"""The demo backbone's patch probe: a fresh probe for a curriculum (`--new-probe`), and `train.demo.probe`, what
the vision tower reads from the full scene and from the 2x crop, against a reading done by hand."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from blink_jax.processing import preprocess_image, preprocess_uint8
from blink_jax.weights.params import abstract_model, model_from_params
from demo import shapes
from train import demo_backbone
from train.demo import backbone, probe
from shapes_by_hand import region_box

# The demo's input size (12 x 12 patches), so the crop is the photo's pixels one for one; a small, fast tower.
CONFIG = dataclasses.replace(backbone.DemoModelConfig.tiny(), image_size=shapes.IMAGE_SIZE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    # random weights drawn in numpy (an eager `init_model` compiles one op per parameter: slow here)
    cfg = CONFIG.llava_config()
    rng = np.random.default_rng(1)
    model = model_from_params(cfg, {path: (0.1 * rng.standard_normal(var.shape)).astype(np.float32)
                                    for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))})
    head = backbone.init_probe(cfg, seed=2)
    # a probe that reads something: its kernel scaled up so the argmax is not a tie-break of near-zero logits
    head = {"kernel": head["kernel"] * 50, "bias": head["bias"]}
    out = backbone.save_hf(model, CONFIG, root / "model", dtype=np.float32, probe=head)
    data = root / "data"
    shapes.write_pope(data, 3, seed=7, world=shapes.World(checked=True))
    return out, data, head


def test_a_curriculum_can_start_a_new_probe_on_a_backbone_without_one(saved, tmp_path, capsys):
    out, _, head = saved
    bare = backbone.save_hf(*backbone.load_backbone(out)[:1], CONFIG, tmp_path / "bare", dtype=np.float32)
    with pytest.raises(FileNotFoundError, match="probe.safetensors' is missing"):
        backbone.load_backbone(bare)
    model, fresh = backbone.load_backbone(bare, new_probe_seed=5)
    first = backbone.flat_params(backbone.load_backbone(out)[0])
    for path, value in backbone.flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(first[path]), err_msg=str(path))
    # the probe is the seed's fresh one, also where the directory has a saved probe of its own
    seeded = backbone.init_probe(model.config, 5)
    _, over_saved = backbone.load_backbone(out, new_probe_seed=5)
    for probe_ in (fresh, over_saved):
        for key in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(probe_[key]), np.asarray(seeded[key]))
    assert not np.allclose(over_saved["kernel"], head["kernel"])
    # the command line: --new-probe needs --init-from; --init-from a backbone without a probe names the fix
    assert demo_backbone.main(["--out", str(tmp_path / "x"), "--new-probe"]) == 2
    assert "--new-probe" in capsys.readouterr().err
    assert demo_backbone.main(["--out", str(tmp_path / "x"), "--init-from", str(bare)]) == 2
    assert "pass --new-probe" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.log.jsonl").exists()


def _by_hand(photo: Image.Image, box, cx: float, cy: float) -> tuple[np.ndarray, int]:
    """The photo's `box` as the model's 168 px input (its own pixels, padded to a square, centred) and the patch
    holding the photo point (cx, cy) there, its 14 px patches counted by hand."""
    x0, y0, x1, y1 = box
    shown = Image.fromarray(preprocess_uint8(photo.crop(box), image_size=shapes.IMAGE_SIZE, pad_to_square=True))
    side = max(x1 - x0, y1 - y0)
    scale = shapes.IMAGE_SIZE / side
    x, y = (cx - x0 + (side - (x1 - x0)) // 2) * scale, (cy - y0 + (side - (y1 - y0)) // 2) * scale
    return preprocess_image(shown, image_size=shapes.IMAGE_SIZE), int(y // shapes.PATCH) * shapes.GRID + int(
        x // shapes.PATCH)


def test_probe_tool_reads_each_shapes_centre_patch_in_both_views_as_done_by_hand(saved):
    out, data, head = saved
    model, loaded = backbone.load_backbone(out)
    rows = probe.probe_reads(model, loaded, data, batch_size=5)
    scenes = shapes.read_annotations(data)
    assert len(rows) == 2 * sum(len(s.objects) for s in scenes.values())
    expected, pixels, patches = [], [], []
    for image, scene in sorted(scenes.items()):
        photo = Image.open(data / "val2014" / image).convert("RGB")
        for o in scene.objects:
            crop = region_box(o.cx, o.cy, 3, 2.0)  # the 2x crop
            group = (("checked" if o.colour in shapes.CHECKED else "solid") + "/"
                     + ("sub_patch" if o.size < 24 else "larger"))
            for view, box in (("full", (0, 0, 336, 336)), ("crop", crop)):
                expected.append((image, o.name, view, group))
                px, patch = _by_hand(photo, box, o.cx, o.cy)
                pixels.append(px)
                patches.append(patch)
    features = np.asarray(backbone.vision_features(model, jnp.asarray(np.stack(pixels))))  # [N, P, D]
    logits = features @ np.asarray(loaded["kernel"]) + np.asarray(loaded["bias"])  # [N, P, C + 1]
    read = np.argmax(logits[..., :-1], -1)  # [N, P]
    rows_at = np.arange(len(patches))
    patches = np.asarray(patches)
    expected = [(*e, shapes.CLASSES[c]) for e, c in zip(expected, read[rows_at, patches])]
    # the reading tells a patch from its neighbours (right or left, below or above), so a wrong patch would show
    beside = np.where(patches % shapes.GRID < shapes.GRID - 1, patches + 1, patches - 1)
    below = np.where(patches < shapes.GRID * (shapes.GRID - 1), patches + shapes.GRID, patches - shapes.GRID)
    for other in (beside, below):
        assert (read[rows_at, other] != read[rows_at, patches]).sum() >= 3
    assert [(r["image"], r["name"], r["view"], r["group"], r["predicted"]) for r in rows] == expected
    summary = probe.summarize(rows)
    for view in probe.VIEWS:
        mine = [e for e in expected if e[2] == view and e[3] == "checked/sub_patch"]
        assert summary[view]["checked/sub_patch"]["n"] == len(mine) > 0
        assert summary[view]["checked/sub_patch"]["colour"] == pytest.approx(
            sum(e[4].split()[0] == e[1].split()[0] for e in mine) / len(mine))


def test_probe_cli_says_what_is_missing(saved, tmp_path, capsys):
    out, data, _ = saved
    assert probe.main(["--model", str(out), "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "shapes_annotations.json" in capsys.readouterr().err
    bare = backbone.save_hf(backbone.load_backbone(out)[0], CONFIG, tmp_path / "bare", dtype=np.float32)
    assert probe.main(["--model", str(bare), "--data-dir", str(data), "--no-progress"]) == 2
    assert "has no probe.safetensors" in capsys.readouterr().err
    assert probe.main(["--model", str(out), "--data-dir", str(data), "--no-progress",
                       "--out", str(tmp_path / "p.json")]) == 0
    assert "| checked, sub-patch |" in capsys.readouterr().out
    written = json.loads((tmp_path / "p.json").read_text())
    model, loaded = backbone.load_backbone(out)
    assert {view: written[view] for view in probe.VIEWS} == probe.summarize(probe.probe_reads(model, loaded, data))
