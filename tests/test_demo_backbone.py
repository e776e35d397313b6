"""The demo model (issue 7): the shapes data and its POPE files, the tokenizer, packed training, the HF export.

One tiny model (56 px images, 2-layer decoder) is trained for a few steps once per module and shared.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from blink_jax.processing import Processor, build_prompt, tokenize_with_image
from demo import shapes
from train.demo import backbone
from train.demo.tokenizer import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = backbone.DemoModelConfig.tiny()
TINY_SETTINGS = backbone.TrainSettings(vision_steps=3, vision_batch_size=4, steps=8, batch_size=4,
                                       questions_per_image=4, lr=3e-3, warmup_steps=1, eval_every=8, val_images=4,
                                       log_every=1, seed=3, ground_layers=(1,))


# ---------------------------------------------------------------------------------------------- scenes


def test_scenes_are_a_function_of_seed_stream_index():
    a = shapes.render(shapes.random_scene(shapes.item_rng(5, shapes.TRAIN, 7)))
    b = shapes.render(shapes.random_scene(shapes.item_rng(5, shapes.TRAIN, 7)))
    c = shapes.render(shapes.random_scene(shapes.item_rng(5, shapes.VAL, 7)))
    assert a.size == (shapes.SCENE_SIZE, shapes.SCENE_SIZE) and a.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    v1 = shapes.training_view(1, shapes.TRAIN, 11, p_zoom=0.5)
    v2 = shapes.training_view(1, shapes.TRAIN, 11, p_zoom=0.5)
    assert v1.objects == v2.objects and v1.box == v2.box
    np.testing.assert_array_equal(np.asarray(v1.image), np.asarray(v2.image))


def test_scenes_span_sub_patch_to_multi_patch_sizes_without_overlap():
    scenes = [shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i)) for i in range(40)]
    sizes = [o.size for s in scenes for o in s.objects]
    assert min(sizes) < 10 and max(sizes) > 52  # scene pixels: 5 to 26 px in the model's 168 px input
    assert np.mean([o.bucket in shapes.SUB_PATCH for s in scenes for o in s.objects]) > 0.4
    cell = shapes.SCENE_SIZE / 12  # one model patch (14 px of 168) in scene pixels
    for s in scenes:
        assert 1 <= len(s.objects) <= 7
        for i, a in enumerate(s.objects):
            assert 0 <= a.box[0] and a.box[2] <= s.size and 0 <= a.box[1] and a.box[3] <= s.size
            for c in (a.cx, a.cy):  # near a patch centre
                assert abs(c - (c // cell + 0.5) * cell) <= shapes.ALIGN + 1e-9
            for b in s.objects[i + 1:]:
                assert not shapes._overlap(a.box, b.box, gap=0.0)


def test_the_generator_regenerates_the_bundled_eval_set():
    """The generator (whatever options it gains) still draws the shipped demo's scenes in the world they record:
    the bundled shapes_annotations.json, written when the demo was built, is the reference."""
    shipped = json.loads((Path(__file__).resolve().parents[1] / "demo/data/pope/shapes_annotations.json").read_text())
    world = shapes.World(**shipped.get("world", {}))
    scenes = shapes.pope_scenes(shipped["n_images"], shipped["seed"], shipped["questions_per_image"] // 2, world)
    assert sum(len({o.colour for o in s.objects}) > 1 for s in scenes) > len(scenes) / 2  # colours mix
    for item, scene in zip(shipped["images"], scenes, strict=True):
        assert [o["name"] for o in item["objects"]] == [o.name for o in scene.objects], item["image"]
        for o, mine in zip(item["objects"], scene.objects):
            assert o["box"] == [round(v, 2) for v in mine.box] and o["size"] == round(mine.size, 2)


def test_one_colour_world_paints_each_scene_in_one_colour_through_every_generator(tmp_path):
    def colours(objects):  # class names -> their colours
        return {name.split()[0] for name in objects}

    world = shapes.World(one_colour=True)
    mono = [shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i), world=world) for i in range(40)]
    assert all(len(colours(s.classes)) == 1 for s in mono)
    assert set().union(*(colours(s.classes) for s in mono)) == set(shapes.COLOURS)
    assert max(len(s.classes) for s in mono) >= 3  # still several shapes per scene
    for i in range(20):  # training (and validation) views, zoomed or not
        view = shapes.training_view(0, shapes.TRAIN, i, p_zoom=0.5, world=world)
        assert len(colours(view.present | view.ambiguous)) <= 1
    settings = dataclasses.replace(TINY_SETTINGS, world=world)
    for view in backbone._views(settings, shapes.TRAIN, range(8), 56, p_zoom=0.0):
        assert len(colours(view.present)) == 1
    shapes.write_pope(tmp_path, n_images=12, seed=4, questions_per_image=2, world=world)
    annotations = json.loads((tmp_path / "shapes_annotations.json").read_text())
    assert annotations["world"] == {"one_colour": True, "placement": "patch", "checked": False, "shape": None}
    for item in annotations["images"]:
        assert len(colours(o["name"] for o in item["objects"])) == 1
    scene_colour = {item["image"]: item["objects"][0]["name"].split()[0] for item in annotations["images"]}

    def same_colour_negatives(split):
        rows = [json.loads(line) for line in (tmp_path / f"coco_pope_{split}.json").read_text().splitlines()]
        return np.mean([_class_of(q["text"]).split()[0] == scene_colour[q["image"]]
                        for q in rows if q["label"] == "no"])

    # POPE's adversarial negatives (the classes that co-occur most) are then mostly the scene's colour in another
    # shape; random ones mostly another colour (4 of the 29 or so absent classes share it)
    assert same_colour_negatives("adversarial") > 0.6 > 0.3 > same_colour_negatives("random")


def test_one_shape_world_draws_and_asks_about_that_shape_only_through_every_generator(tmp_path):
    world = shapes.World(checked=True, shape="square")
    assert world.classes == ("red square", "green square", "blue square", "yellow square", "white square",
                             "purple square")  # by hand: the six colours, one shape
    scenes = [shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i), world=world) for i in range(40)]
    assert {o.shape for s in scenes for o in s.objects} == {"square"}
    assert {o.colour for s in scenes for o in s.objects} == set(shapes.COLOURS)
    settings = dataclasses.replace(TINY_SETTINGS, world=world, p_sibling=0.5)
    tok = build_tokenizer()
    cfg = backbone.DemoModelConfig.tiny().llava_config()
    layout = backbone.PackedLayout.build(tok, cfg, settings.questions_per_image)
    batch = backbone.train_batch(0, settings, layout, cfg)
    asked = [tok.decode(row) for row in batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])]
    assert all(" square" in text and not any(f" {s} " in text for s in shapes.SHAPES if s != "square")
               for text in asked)
    shapes.write_pope(tmp_path, n_images=30, seed=4, questions_per_image=2, world=world)
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(line) for line in (tmp_path / f"coco_pope_{split}.json").read_text().splitlines()]
        assert {_class_of(q["text"]) for q in rows} <= set(world.classes)
        assert len({_class_of(q["text"]) for q in rows if q["label"] == "no"}) >= 2
    assert shapes.read_world(tmp_path) == world
    # six classes can all be in view: then there is nothing to say "no" about, and only "yes" questions are asked
    full = shapes.View(Image.new("RGB", (168, 168)), tuple((c, 20.0, (0, 0, 20, 20)) for c in world.classes),
                       frozenset(), None)
    asked = shapes.sample_questions(np.random.default_rng(0), full, 12, p_sibling=0.5, classes=world.classes)
    assert len(asked) == 6 and all(answer for *_, answer in asked)
    # POPE's scenes leave classes absent for its negatives: a scene is redrawn when it holds too many
    few = [shapes.random_scene(shapes.item_rng(0, shapes.POPE, i), world=world, max_classes=2) for i in range(20)]
    assert max(len(s.classes) for s in few) == 2
    with pytest.raises(ValueError, match="shape 'star' is unknown; use one of circle, square"):
        shapes.World(shape="star")


def test_easy_steps_show_scenes_of_one_or_two_shapes_then_the_usual_ones():
    settings = dataclasses.replace(TINY_SETTINGS, easy_steps=2, p_zoom=0.0, p_teacher=0.0, batch_size=16)
    cfg = backbone.DemoModelConfig.tiny().llava_config()
    layout = backbone.PackedLayout.build(build_tokenizer(), cfg, settings.questions_per_image)
    for step in (1, 2):  # by hand: one or two shapes while easy, then 3 to 7 (their centre patches, full scenes)
        batch = backbone.train_batch(step, settings, layout, cfg)
        named = (batch["patch_targets"][..., :-1].sum(-1) > 0).sum(-1)  # [B] patches holding a shape's centre
        assert ((named >= 1) & (named <= 2)).all() if step < 2 else (named >= 3).any() and named.max() > 2


def test_checked_world_draws_fine_checks_that_the_downsampling_averages_to_one_grey():
    # By hand: a 16 px square (box 96..112, scene px) drawn as a 1 px check of (200, 50, 50) and (56, 206, 206),
    # whose mean is (128, 128, 128): the photo alternates the two colours pixel by pixel, the model's input (the
    # photo at half size) shows the grey; a green check about the same grey gives the same input exactly.
    def scene(rgb, check, size=16.0):
        square = shapes.Shape("red", "square", 104.0, 104.0, size, rgb, check)
        return shapes.Scene(shapes.SCENE_SIZE, (40, 40, 40), (0.0, 0.0, 0.0), 0.0, (square,))

    red, green = scene((200, 50, 50), (56, 206, 206)), scene((50, 200, 60), (206, 56, 196))
    photo = np.asarray(shapes.render(red)).astype(int)
    ys, xs = np.mgrid[96:112, 96:112]
    expected = np.where((((xs + ys) % 2) == 0)[..., None], [200, 50, 50], [56, 206, 206])
    np.testing.assert_array_equal(photo[96:112, 96:112], expected)
    assert (photo[94:96, 96:112] == 40).all() and (photo[112:114, 96:112] == 40).all()  # nothing outside the box
    seen = np.asarray(shapes.full_view(red).image).astype(int)[49:55, 49:55]  # input px 48..56: the inside (bicubic
    # rings by a level or two near the edge)
    assert np.abs(seen - 128).max() <= 2
    np.testing.assert_array_equal(seen, np.asarray(shapes.full_view(green).image).astype(int)[49:55, 49:55])
    # the 2x crop of the photo (1 scene px per model px) shows the check again
    zoomed = np.asarray(shapes.zoom_view(red, (20, 20, 188, 188)).image).astype(int)
    np.testing.assert_array_equal(zoomed[80:92, 80:92], expected[:12, :12])
    # a 48 px shape gets 3 px cells, which survive the downsampling
    big = np.asarray(shapes.full_view(scene((200, 50, 50), (56, 206, 206), 48.0)).image).astype(float)[44:60, 44:60]
    assert big[..., 0].std() > 20 and abs(big[..., 0].mean() - 128) < 8
    # in a checked world every red, green or blue shape is such a check, about a grey near CHECK_GREY; the
    # others, and every shape of the default world, are solid
    world = shapes.World(checked=True)
    drawn = [o for i in range(20)
             for o in shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i), world=world).objects]
    assert {o.colour for o in drawn if o.check} == set(shapes.CHECKED)
    for o in drawn:
        assert (o.check is not None) == (o.colour in shapes.CHECKED)
        if o.check:
            grey = (np.array(o.rgb) + o.check) / 2
            assert (grey == np.round(grey)).all() and np.abs(grey - shapes.CHECK_GREY).max() <= shapes.CHECK_GREY_JITTER
            assert o.cell == max(1, int(o.size // 16))
    assert not any(o.check for i in range(20) for o in shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i)).objects)


def test_quarter_placement_puts_shapes_on_the_patch_centres_of_the_crops_that_cut_on_patch_edges():
    cell = shapes.SCENE_SIZE / shapes.GRID  # 28 scene px: one patch of the full view
    scenes = [shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i), align=0.0,
                                  world=shapes.World(placement="quarter")) for i in range(30)]
    for s in scenes:
        for o in s.objects:  # a quarter patch (7 scene px) right and down of a patch centre
            assert (o.cx % cell, o.cy % cell) == (21.0, 21.0)
            assert 0 <= o.box[0] and o.box[2] <= s.size and 0 <= o.box[1] and o.box[3] <= s.size
    # By hand: a shape centred at scene (21 + 28 i, 21 + 28 j) seen through the 2x crop of an inner region
    # (r = 3, context 2: a 168 px box from 42 or 126, shown at 1 scene px per model px) sits at 21 + 28 i - 42,
    # = 7 mod 14: a patch centre; through a 6x crop (r = 2, context 1: 56 px boxes, 3 model px per scene px)
    # at 3 (21 + 28 i - 56 k) = 7 mod 14 too. The default world's shape (on a patch centre, 14 + 28 i) lands
    # on a patch corner of both.
    scene = scenes[0]
    for cx, offset in ((21 + 28 * 4, 0.0), (14 + 28 * 4, 0.5)):
        for region, r, context in ((5, 3, 2.0), (10, 3, 2.0), (14, 2, 1.0)):
            box = shapes.crop_view(scene, region, r, context).box
            x, y = shapes.view_point(scene, box, cx, cx)
            assert box[2] - box[0] == box[3] - box[1] in (168, 56)
            k = 168 / (box[2] - box[0])
            assert (x, y) == pytest.approx(((cx - box[0]) * k, (cx - box[1]) * k))
            assert shapes.patch_offset(x, y) == pytest.approx(offset)
    # a clipped box is padded to square first (expand2square), as model_view does: region 1's 168 x 126 box
    assert shapes.view_point(scene, (42, 0, 210, 126), 50, 10) == pytest.approx((8, 31))
    assert shapes.view_point(scene, None, 50, 10) == pytest.approx((25, 5))
    assert shapes.patch_offset(7, 7) == 0 and shapes.patch_offset(14, 7) == 0.5 and shapes.patch_offset(3.5, 7) == 0.25


def test_crop_placement_puts_every_shape_on_a_patch_centre_of_its_regions_2x_crop():
    centres = {tuple(p) for p in shapes.crop_centres().tolist()}
    # By hand, in scene px (regions of 84 px; 2x crops of r = 3, context 2; kept 2 px inside the region):
    # region 5: box 42..210 on both axes, 1 scene px per model px: 42 + 7 + 14 i in [86, 166) -> 91 .. 161
    assert {(x, y) for x, y in centres if 84 <= x < 168 and 84 <= y < 168} == {
        (91.0 + 14 * i, 91.0 + 14 * j) for i in range(6) for j in range(6)}
    # region 1: box 42..210 x 0..126, padded 21 px on top: y = -21 + 7 + 14 j in [2, 82) -> 14 .. 70
    assert {(x, y) for x, y in centres if 84 <= x < 168 and y < 84} == {
        (91.0 + 14 * i, 14.0 * j) for i in range(6) for j in range(1, 6)}
    # region 0: box 0..126 on both axes, 4/3 model px per scene px: (7 + 14 i) 3 / 4 -> 5.25 .. 78.75
    assert {(x, y) for x, y in centres if x < 84 and y < 84} == {
        (5.25 + 10.5 * i, 5.25 + 10.5 * j) for i in range(8) for j in range(8)}
    for i in range(30):
        scene = shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, i), world=shapes.World(placement="crop"))
        for o in scene.objects:
            box = shapes.crop_view(scene, shapes.region_of(o.cx, o.cy, 3), 3, 2.0).box
            # within CROP_ALIGN scene px, at most 4/3 model px each, of a patch centre of the zoomed crop
            assert shapes.patch_offset(*shapes.view_point(scene, box, o.cx, o.cy)) <= 2 * 4 / 3 / 14 + 1e-9
    with pytest.raises(ValueError, match="placement 'grid' is unknown"):
        shapes.World(placement="grid")


def test_full_view_is_the_scene_as_the_model_sees_it():
    scene = shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, 3))
    full = shapes.render(scene)
    view = shapes.full_view(scene, full)
    np.testing.assert_array_equal(np.asarray(view.image),  # downsampled 2x, as eval preprocesses the file
                                  np.asarray(full.resize((168, 168), resample=Image.Resampling.BICUBIC)))
    for (name, size, box), o in zip(view.objects, scene.objects):
        assert name == o.name and size == pytest.approx(o.size / 2)
        assert box == pytest.approx(tuple(v / 2 for v in o.box))


def test_teacher_view_is_the_tokensr_teacher_crop_of_the_downsampled_scene():
    from blink_jax.processing.image import normalize
    from train.teacher import crop_pixels

    scene = shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, 3))
    full = shapes.render(scene)
    model_image = np.asarray(shapes.full_view(scene, full).image)
    for r, region in ((3, 5), (4, 8), (6, 0)):
        view = shapes.teacher_view(scene, region, r, full)
        np.testing.assert_array_equal(normalize(np.asarray(view.image)), crop_pixels(model_image, region, 12, r, 14))
        # region (row, col) of the (12 / r)^2 grid: model box [col r 14, +r 14) x [row r 14, +r 14), zoom 12 / r
        row, col = divmod(region, 12 // r)
        left, top, zoom = col * r * 14, row * r * 14, 12 / r
        for name, size, box in view.objects:
            o = next(o for o in scene.objects if o.name == name and
                     abs((o.box[0] / 2 - left) * zoom - box[0]) < 1e-6 and abs((o.box[1] / 2 - top) * zoom - box[1]) < 1e-6)
            assert size == pytest.approx(o.size / 2 * zoom)


@pytest.mark.parametrize("region, r, box, pad", [
    (5, 3, (42, 42, 210, 210), (0, 0)),  # model box (42, 42, 84, 84) grown 2x about (63, 63), x2 to scene pixels
    (1, 3, (42, 0, 210, 126), (0, 21)),  # (42, 0, 84, 42) grown to (21, -21, 105, 63), clamped: 168 x 126, padded
    (0, 6, (0, 0, 252, 252), (0, 0)),  # (0, 0, 84, 84) grown to (-42, -42, 126, 126), clamped
])
def test_crop_view_is_the_crop_modes_pass_2_image_by_hand(region, r, box, pad):
    scene = shapes.random_scene(shapes.item_rng(0, shapes.TRAIN, 3))
    full = shapes.render(scene)
    view = shapes.crop_view(scene, region, r, 2.0, full)
    assert view.box == box
    w, h = box[2] - box[0], box[3] - box[1]
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))  # expand2square with CLIP's mean colour
    canvas.paste(full.crop(box), pad)
    np.testing.assert_array_equal(np.asarray(view.image),
                                  np.asarray(canvas.resize((168, 168), resample=Image.Resampling.BICUBIC)))
    s = 168 / side
    seen = {}
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        inside = max(0, min(x1, box[2]) - max(x0, box[0])) * max(0, min(y1, box[3]) - max(y0, box[1]))
        if inside / o.size ** 2 >= shapes.MIN_VISIBLE:
            seen[o.name] = (o.size * s, ((x0 - box[0] + pad[0]) * s, (y0 - box[1] + pad[1]) * s))
        elif inside > 0:
            assert o.name in view.ambiguous or o.name in view.present
    for name, size, vbox in view.objects:
        assert size == pytest.approx(seen[name][0]) and vbox[:2] == pytest.approx(seen[name][1])


def test_region_of_names_the_region_holding_a_point():
    assert shapes.region_of(0, 0, 3) == 0 and shapes.region_of(335, 335, 3) == 15
    assert shapes.region_of(84 + 1, 2 * 84 + 1, 3) == 2 * 4 + 1  # scene regions of 84 px for r = 3
    assert shapes.region_of(100, 300, 6) == 2  # r = 6: 2 x 2 regions of 168 px


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


def test_shape_negatives_are_absent_classes_in_a_present_colour_at_the_asked_share():
    view = shapes.View(Image.new("RGB", (168, 168)), (("red circle", 20.0, (0, 0, 20, 20)),
                                                      ("blue cross", 20.0, (40, 40, 60, 60))), frozenset(), None)
    mates = {f"{c} {s}" for c in ("red", "blue") for s in shapes.SHAPES} - view.present
    rng = np.random.default_rng(0)
    negatives = [f"{c} {s}" for _ in range(400) for c, s, a in shapes.sample_questions(rng, view, 4, p_shape=0.5)
                 if not a]
    share = np.mean([n in mates for n in negatives])
    # half drawn from the 8 mates, the other half as before: half of those from the 16 absent classes sharing a
    # colour or a shape (the 8 mates and the 8 circles and crosses in other colours), half from all 28 absent
    assert len(mates) == 8 and len(negatives) == 800
    assert share == pytest.approx(0.5 + 0.5 * (0.5 * 8 / 16 + 0.5 * 8 / 28), abs=0.04)
    rng0, rng1 = np.random.default_rng(3), np.random.default_rng(3)
    assert shapes.sample_questions(rng0, view, 8) == shapes.sample_questions(rng1, view, 8, p_shape=0.0)


def test_sibling_negatives_are_the_other_checked_colours_of_a_present_checks_shape_at_the_asked_share():
    view = shapes.View(Image.new("RGB", (168, 168)), (("red square", 20.0, (0, 0, 20, 20)),
                                                      ("yellow circle", 20.0, (40, 40, 60, 60))), frozenset(), None)
    siblings = {"green square", "blue square"}  # by hand: red, green and blue are CHECKED, yellow is not
    rng = np.random.default_rng(0)
    negatives = [f"{c} {s}" for _ in range(400) for c, s, a in shapes.sample_questions(rng, view, 4, p_sibling=0.5)
                 if not a]
    share = np.mean([n in siblings for n in negatives])
    # half drawn from the 2 siblings, the other half as before: half of those from the 16 absent classes sharing a
    # colour or a shape (the two siblings among them), half from all 28 absent
    assert len(negatives) == 800 and {n for n in negatives if n in siblings} == siblings
    assert share == pytest.approx(0.5 + 0.5 * (0.5 * 2 / 16 + 0.5 * 2 / 28), abs=0.04)
    solid = shapes.View(view.image, (("yellow circle", 20.0, (40, 40, 60, 60)),), frozenset(), None)
    rng0, rng1 = np.random.default_rng(3), np.random.default_rng(3)  # no check in view: nothing changes
    assert shapes.sample_questions(rng0, solid, 8) == shapes.sample_questions(rng1, solid, 8, p_sibling=0.9)
    rng0, rng1 = np.random.default_rng(3), np.random.default_rng(3)
    assert shapes.sample_questions(rng0, view, 8) == shapes.sample_questions(rng1, view, 8, p_sibling=0.0)


def test_p_sibling_without_the_checked_world_is_refused_before_anything_is_written(tmp_path, capsys):
    from train import demo_backbone

    assert demo_backbone.main(["--out", str(tmp_path / "x"), "--p-sibling", "0.5"]) == 2
    assert "add --checked" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.log.jsonl").exists()


def test_question_kind_names_what_the_smallest_lookalike_shares():
    objects = [("red square", 30.0), ("blue circle", 10.0), ("green cross", 12.0)]
    assert shapes.question_kind(objects, "red square") == "yes"
    assert shapes.question_kind(objects, "red circle") == "same shape"  # the 10 px blue circle, not the red square
    assert shapes.question_kind(objects, "red triangle") == "same colour"
    assert shapes.question_kind(objects, "green diamond") == "same colour"
    assert shapes.question_kind(objects, "yellow cross") == "same shape"
    assert shapes.question_kind(objects, "yellow diamond") == "none"
    assert shapes.question_bucket(objects, "red circle") == "tiny"  # the same look-alike sets the size


def test_patch_targets_name_each_shape_at_its_centre_patch_and_ignore_the_rest_it_covers():
    img = Image.new("RGB", (168, 168))
    # a 6 px shape inside patch (row 1, col 2); a 30 px one centred in patch (6, 4), touching rows 5-7 x cols 3-5
    view = shapes.View(img, (("red circle", 6.0, (30.0, 16.0, 36.0, 22.0)),
                             ("blue cross", 30.0, (45.0, 73.0, 75.0, 103.0))), frozenset(), None)
    t = shapes.patch_targets(view, 12).reshape(12, 12, -1)
    assert t.shape[-1] == len(shapes.CLASSES) + 1
    red, blue = shapes.CLASSES.index("red circle"), shapes.CLASSES.index("blue cross")
    assert t[1, 2, red] == 1 and t[6, 4, blue] == 1 and t[..., :-1].sum() == 2
    ignored = t.sum(-1) == 0
    assert ignored.sum() == 8 and ignored[5:8, 3:6].sum() == 8
    assert t[..., -1].sum() == 144 - 10  # "nothing" everywhere else


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
        assert img.size == (shapes.SCENE_SIZE,) * 2 == (336, 336) and img.format == "PNG"


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
    from flax import nnx

    from blink_jax.model.forward import prefill

    cfg = TINY.llava_config()
    tok = build_tokenizer()
    model = backbone.init_model(cfg, seed=1)
    layout = backbone.PackedLayout.build(tok, cfg, k=3)
    questions = [[("red", "circle", True), ("blue", "cross", False)],
                 [("white", "diamond", False), ("green", "square", True), ("purple", "triangle", True)]]
    pixels = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
    batch = layout.pack(questions)
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 0], [1, 1, 1]])
    assert not layout.mask()[len(layout.prefix) + layout.block, len(layout.prefix)]  # blocks do not see each other
    graphdef, state = nnx.split(model)
    packed = jax.jit(lambda st, ids, px: backbone.packed_forward(nnx.merge(graphdef, st), layout, ids, px)[0])(
        state, batch["input_ids"], pixels)  # [B, K, L - 1, V]
    np.testing.assert_array_equal(batch["block_targets"][..., -2:], batch["targets"])
    # The slow way: each question as its own prompt (+ its answer word), through the model's own prefill.
    rows, ids = [], []
    for row, qs in enumerate(questions):
        for j, (colour, shape, answer) in enumerate(qs):
            prompt = build_prompt(shapes.question_text(colour, shape))
            ids.append(tokenize_with_image(tok, prompt, IMAGE_ID, cfg.num_image_tokens)
                       + [tok.convert_tokens_to_ids("Yes" if answer else "No")])
            rows.append((row, j))
    ids = np.asarray(ids, np.int32)
    plain = jax.jit(lambda st, i, px, m: prefill(nnx.merge(graphdef, st), i, px, m)[0])(
        state, ids, pixels[[r for r, _ in rows]], np.ones_like(ids))
    for n, (row, j) in enumerate(rows):
        block = slice(ids.shape[1] - (layout.block - 1), None)  # the question's rows, up to the answer word
        np.testing.assert_array_equal(batch["block_targets"][row, j, :-1], ids[n, block][1:])
        np.testing.assert_allclose(np.asarray(packed[row, j]), np.asarray(plain[n, block]), atol=2e-5, rtol=1e-5)


def test_image_attention_maps_are_the_answering_rows_attention_over_image_tokens():
    """packed_forward's grounding maps against the slow way: the plain prompt through the decoder layers one by
    one, the answering row's softmax over the image keys per head, then the mean over heads."""
    from blink_jax.model.forward import causal_mask, position_ids

    cfg = TINY.llava_config()
    tok = build_tokenizer()
    model = backbone.init_model(cfg, seed=2)
    layout = backbone.PackedLayout.build(tok, cfg, k=2)
    questions = [[("red", "circle", True), ("blue", "cross", False)]]
    pixels = np.random.default_rng(1).standard_normal((1, 3, 56, 56)).astype(np.float32)
    maps = backbone.packed_forward(model, layout, layout.pack(questions)["input_ids"], pixels, (0, 1))[2]
    assert maps.shape == (2, 1, 2, cfg.num_image_tokens)
    np.testing.assert_allclose(np.asarray(maps.sum(-1)), 1.0, rtol=1e-5)
    heads, kv = cfg.text.num_attention_heads, cfg.text.num_key_value_heads
    for j, (colour, shape, _) in enumerate(questions[0]):
        ids = np.asarray([tokenize_with_image(tok, build_prompt(shapes.question_text(colour, shape)), IMAGE_ID,
                                              cfg.num_image_tokens)], np.int32)
        image = np.flatnonzero(ids[0] == IMAGE_ID)
        h = model.embed_multimodal(ids, pixels)
        mask = np.ones_like(ids)
        t = ids.shape[1]
        cmask = causal_mask(np.arange(t)[None], mask > 0)
        for layer_index, layer in enumerate(model.language_model.layers):
            h_next, q, k, _ = layer(h, position_ids(mask), cmask, causal=True)
            q, k = np.asarray(q[0, -1]), np.asarray(k[0, image])  # [N, H], [P, Kv, H]
            probs = []
            for n in range(heads):
                logits = k[:, n // (heads // kv)] @ q[n] / np.sqrt(q.shape[-1])
                probs.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
            np.testing.assert_allclose(np.asarray(maps[layer_index, 0, j]), np.mean(probs, 0), atol=1e-5)
            h = h_next


def test_question_patches_mark_the_asked_objects_patches():
    view = shapes.training_view(0, shapes.VAL, 4, p_zoom=0.0)
    name, _, (x0, y0, x1, y1) = view.objects[0]
    colour, shape = name.split()
    cfg = TINY.llava_config()
    layout = backbone.PackedLayout.build(build_tokenizer(), cfg, k=2)
    absent = next(c for c in shapes.CLASSES if c not in view.present)
    questions = [[(colour, shape, True), (*absent.split(), False)]]
    patches = layout.question_patches([view], questions, grid=12)
    assert patches.shape == (1, 2, 144) and not patches[0, 1].any()  # a "no" has no object to look at
    background = layout.question_patches([view], questions, grid=12, background=True)
    np.testing.assert_array_equal(background[0, 0], patches[0, 0])
    np.testing.assert_array_equal(background[0, 1], shapes.patch_targets(view, 12)[:, -1])  # or the empty patches
    assert not (background[0, 0] * background[0, 1]).any()
    grid = patches[0, 0].reshape(12, 12)
    assert grid[int((y0 + y1) / 2 // 14), int((x0 + x1) / 2 // 14)] == 1  # the centre's patch
    rows, cols = np.nonzero(grid)  # and no patch outside the object's box
    assert (rows * 14 < y1).all() and ((rows + 1) * 14 > y0).all() and (cols * 14 < x1).all() and ((cols + 1) * 14 > x0).all()


def test_lookalike_grounding_points_a_no_at_the_shapes_of_its_colour_else_of_its_shape():
    # a red circle in patch (1, 2) and a red square and a blue cross each filling one patch, drawn by hand
    view = shapes.View(Image.new("RGB", (168, 168)), (("red circle", 6.0, (30.0, 16.0, 36.0, 22.0)),
                                                      ("red square", 10.0, (88.0, 60.0, 98.0, 70.0)),
                                                      ("blue cross", 10.0, (4.0, 144.0, 14.0, 154.0))),
                       frozenset(), None)
    layout = backbone.PackedLayout.build(build_tokenizer(), TINY.llava_config(), k=4)
    questions = [[("red", "triangle", False), ("green", "cross", False), ("green", "diamond", False),
                  ("red", "circle", True)]]
    patches = layout.question_patches([view], questions, grid=12, lookalikes=True).reshape(4, 12, 12)
    assert set(zip(*np.nonzero(patches[0]))) == {(1, 2), (4, 6)}  # both red shapes
    assert set(zip(*np.nonzero(patches[1]))) == {(10, 0)}  # no green in view: the cross
    assert not patches[2].any()  # nothing shares green or diamond
    assert set(zip(*np.nonzero(patches[3]))) == {(1, 2)}  # a "yes" as before
    plain = layout.question_patches([view], questions, grid=12).reshape(4, 12, 12)
    assert not plain[:3].any() and (plain[3] == patches[3]).all()


def test_ground_loss_is_minus_log_mass_on_the_object():
    maps = jnp.asarray([[[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]])  # [A=1, B=1, K=2, P=3]
    patches = jnp.asarray([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # the second question is a "no"
    loss, metrics = backbone.ground_loss(maps, patches)
    np.testing.assert_allclose(float(loss), -np.log(0.75 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ground_mass"]), 0.75, rtol=1e-6)


def test_name_loss_teaches_each_centre_token_its_colour_and_shape_words_by_hand():
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    words = backbone.name_words(tokenizer)
    red_circle, blue_cross = shapes.CLASSES.index("red circle"), shapes.CLASSES.index("blue cross")
    assert words[red_circle, vocab["red"]] == words[red_circle, vocab["circle"]] == 0.5 and words[red_circle].sum() == 1
    c = len(shapes.CLASSES)
    targets = np.zeros((1, 3, c + 1), np.float32)  # patches: a red circle; a red circle and a blue cross; empty
    targets[0, 0, red_circle] = 1
    targets[0, 1, [red_circle, blue_cross]] = 1
    targets[0, 2, -1] = 1
    logits = np.random.default_rng(0).normal(size=(1, 3, len(vocab))).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    first = -0.5 * (logp[0, 0, vocab["red"]] + logp[0, 0, vocab["circle"]])
    second = -0.25 * (logp[0, 1, vocab["red"]] + logp[0, 1, vocab["circle"]] + logp[0, 1, vocab["blue"]]
                      + logp[0, 1, vocab["cross"]])
    loss, metrics = backbone.name_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(words))
    np.testing.assert_allclose(float(loss), (first + second) / 2, rtol=1e-5)  # the empty patch carries no loss
    assert float(metrics["name_loss"]) == float(loss)


@pytest.fixture(scope="module")
def trained():
    return backbone.train(TINY, TINY_SETTINGS, progress=False)


def test_a_few_training_steps_reduce_the_loss_and_log(trained):
    vision = [h for h in trained.history if h["stage"] == "vision"]
    llava = [h for h in trained.history if h["stage"] == "llava"]
    assert len(vision) == TINY_SETTINGS.vision_steps and len(llava) == TINY_SETTINGS.steps
    losses = [h["qa_loss"] for h in llava]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5
    assert {"val/accuracy", "val_zoom/accuracy", "grad_norm", "accuracy", "probe_loss"} <= set(llava[-1])
    assert trained.final == llava[-1]


def test_training_is_a_function_of_the_seed(trained):
    cfg = TINY.llava_config()
    layout = backbone.PackedLayout.build(build_tokenizer(), cfg, 4)
    b1, b2 = (backbone.train_batch(2, TINY_SETTINGS, layout, cfg) for _ in range(2))
    assert b1.keys() == {"input_ids", "targets", "block_targets", "weights", "pixel_values", "patch_targets",
                         "question_patches"}
    for key in b1:
        np.testing.assert_array_equal(b1[key], b2[key])
    # The same run again (the compiled steps are cached, so this is quick): the very same weights.
    again = backbone.flat_params(backbone.train(TINY, TINY_SETTINGS, progress=False).model)
    first = backbone.flat_params(trained.model)
    for path, value in first.items():
        np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(value), err_msg=str(path))


def _logits_both_ways(model_dir: Path, image: Image.Image, question: str):
    import torch
    from transformers import LlavaForConditionalGeneration

    import blink_jax

    ours = blink_jax.load_pretrained(model_dir)
    processor = Processor.from_pretrained(model_dir)
    inputs = processor([build_prompt(question)], [image])
    our_logits = ours(**inputs).logits
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

    loaded = backbone.flat_params(blink_jax.load_pretrained(out).module)
    for path, value in backbone.flat_params(trained.model).items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value).astype(np.float16).astype(np.float32))


def test_training_goes_on_from_a_saved_backbone_and_its_probe(trained, tmp_path):
    out = backbone.save_hf(trained.model, TINY, tmp_path / "model", dtype=np.float32, probe=trained.probe)
    model, probe = backbone.load_backbone(out)
    for key, value in trained.probe.items():
        np.testing.assert_array_equal(np.asarray(probe[key]), np.asarray(value))
    first = backbone.flat_params(trained.model)
    loaded = backbone.flat_params(model)
    for path, value in first.items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value), err_msg=str(path))
    # zero steps from it: the same model back; a few steps: it moves on from there, not from scratch
    same = backbone.train(TINY, dataclasses.replace(TINY_SETTINGS, vision_steps=0, steps=0, val_images=0),
                          progress=False, init=(model, probe))
    for path, value in first.items():
        np.testing.assert_array_equal(np.asarray(backbone.flat_params(same.model)[path]), np.asarray(value))
    more = backbone.train(TINY, dataclasses.replace(TINY_SETTINGS, vision_steps=0, steps=2, val_images=0),
                          progress=False, init=(model, probe))
    start = [h["qa_loss"] for h in more.history if h["stage"] == "llava"][0]
    scratch = [h["qa_loss"] for h in trained.history if h["stage"] == "llava"]
    assert abs(start - scratch[-1]) < abs(start - scratch[0])
    with pytest.raises(ValueError, match="not of the sizes asked for"):
        backbone.train(dataclasses.replace(TINY, text_mlp=64), TINY_SETTINGS, progress=False, init=(model, probe))
    (out / backbone.PROBE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="probe.safetensors' is missing"):
        backbone.load_backbone(out)


BUNDLED = REPO / "demo" / "model"
BUNDLED_POPE = REPO / "demo" / "data" / "pope"


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="no bundled demo model in demo/model")
def test_bundled_model_loads_in_both_loaders_with_equal_logits():
    image_dir = BUNDLED_POPE / "val2014"
    image = Image.open(image_dir / shapes.pope_image_name(0)).convert("RGB") if image_dir.is_dir() else \
        shapes.render(shapes.random_scene(shapes.item_rng(0, shapes.VAL, 0)))
    ours, theirs = _logits_both_ways(BUNDLED, image, "Is there a blue triangle in the image?")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_tokensr_training_data_is_in_the_llava_mix_layout(tmp_path):
    from train.data.llava_mix import ANNOTATION_FILE, check_image, first_question

    assert shapes.write_mix(tmp_path, 6, seed=0) == 6
    records = json.loads((tmp_path / ANNOTATION_FILE).read_text())
    assert [r["conversations"][1]["value"] for r in records] == ["Yes", "No"] * 3
    pope_images = {shapes.render(s).tobytes() for s in shapes.pope_scenes(3, 0, 1)}
    for r in records:
        data = (tmp_path / r["image"]).read_bytes()
        assert check_image(data) is None
        assert Image.open(tmp_path / r["image"]).tobytes() not in pope_images  # its own scenes
        colour, shape = first_question(r["conversations"]).removeprefix("Is there a ").split()[:2]
        assert f"{colour} {shape}" in shapes.CLASSES
        assert r["conversations"][0]["value"].startswith("<image>\n")


def test_breakdown_counts_each_question_once_in_its_bucket_and_label(pope_dir, tmp_path):
    from train.demo import breakdown

    run = tmp_path / "run"
    run.mkdir()
    rows = [(split, json.loads(line)) for split in shapes.SPLITS
            for line in open(pope_dir / f"coco_pope_{split}.json")]
    # "vanilla" always says Yes; "blink" is always right and expands at layer 1 on every other question (keeps at
    # layer 2); "crop" says No and crops the whole image for the first question, nothing for the others.
    with open(run / "samples_pope_vanilla.jsonl", "w") as f:
        for split, r in rows:
            f.write(json.dumps({"question_id": f"{split}/{r['question_id']}", "prediction": "Yes", "error": None,
                                "trace": None}) + "\n")
    with open(run / "samples_pope_blink.jsonl", "w") as f:
        for i, (split, r) in enumerate(rows):
            f.write(json.dumps({"question_id": f"{split}/{r['question_id']}", "prediction": r["label"].title(),
                                "error": None, "trace": {"expansions": i % 2, "layers": [1, 2],
                                                         "actions": ["expand" if i % 2 else "none", "keep"]}}) + "\n")
    with open(run / "samples_pope_crop.jsonl", "w") as f:
        for i, (split, r) in enumerate(rows):
            box = [0, 0, 10**4, 10**4] if i == 0 else [0, 0, 0, 0]
            f.write(json.dumps({"question_id": f"{split}/{r['question_id']}", "prediction": "No", "error": None,
                                "trace": {"crop_layer": 2, "box": box}}) + "\n")
    # Blink's traces for two "yes" questions: the first expanded the region holding its object (r = 3: regions of
    # 84 scene px, 4 per row), the second one region away from it.
    annotations = json.loads((pope_dir / "shapes_annotations.json").read_text())
    objects = {item["image"]: item["objects"] for item in annotations["images"]}
    yes = [(i, r) for i, (split, r) in enumerate(rows) if r["label"] == "yes"][:2]
    with open(run / "traces_pope_blink.jsonl", "w") as f:
        for k, (i, r) in enumerate(yes):
            name = r["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            box = next(o["box"] for o in objects[r["image"]] if o["name"] == name)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            region = int(cy // 84) * 4 + int(cx // 84)
            others = {int(o["box"][1] + o["box"][3]) // 168 * 4 + int(o["box"][0] + o["box"][2]) // 168
                      for o in objects[r["image"]] if o["name"] == name}
            wrong = next(x for x in range(16) if x not in others)
            split = rows[i][0]
            f.write(json.dumps({"question_id": f"{split}/{r['question_id']}", "region_size": 3,
                                "expanded_region": [region if k == 0 else wrong, -1]}) + "\n")
    result = breakdown.breakdown(run, pope_dir)
    n = len(rows)
    assert result["blink"]["sr_hit"] == [1, 2]
    # the "no" questions whose colour is in the scene, by hand from the annotations
    coloured = sum(r["label"] == "no" and r["text"].split()[3] in {o["name"].split()[0] for o in objects[r["image"]]}
                   for _, r in rows)
    assert 0 < coloured < n // 2
    assert result["vanilla"]["by_label"] == {"yes": [n // 2, n // 2], "no": [0, n // 2],
                                             "no, colour in scene": [0, coloured],
                                             "no, colour not in scene": [0, n // 2 - coloured]}
    assert result["blink"]["by_label"]["no, colour in scene"] == [coloured, coloured]
    assert sum(c[1] for c in result["blink"]["by_bucket"].values()) == n
    assert result["blink"]["expanded"] == [n // 2, n]
    assert result["blink"]["expanded_at"] == {1: [n // 2, n], 2: [0, n]}
    assert rows[0][1]["label"] == "yes" and result["crop"]["crop_hit"] == [1, n // 2]
    table = breakdown.markdown(result)
    assert table.splitlines()[0] == "| questions about | n | vanilla | crop | blink |"
    assert "| expanded at layer 1 | | - | - | 50.0% |" in table
    assert not any(k.startswith("sub-patch") for k in result["vanilla"]["by_label"])  # not a checked world
    # The same set marked as drawn in a checked world: the sub-patch questions split by their object's finish, by
    # hand (a "yes" its largest instance, a "no" its smallest look-alike; red, green and blue are checks).
    import shutil

    checked_dir = tmp_path / "checked"
    shutil.copytree(pope_dir, checked_dir)
    annotations["world"] = {"checked": True}
    (checked_dir / "shapes_annotations.json").write_text(json.dumps(annotations))
    expected = {"sub-patch, checked": [0, 0], "sub-patch, solid": [0, 0]}
    for _, r in rows:
        name = r["text"].removeprefix("Is there a ").removesuffix(" in the image?")
        same = [o for o in objects[r["image"]] if o["name"] == name]
        alike = [o for o in objects[r["image"]] if set(o["name"].split()) & set(name.split())]
        target = max(same, key=lambda o: o["size"]) if same else min(alike, key=lambda o: o["size"], default=None)
        if target is not None and target["size"] < 24:
            key = "sub-patch, checked" if target["name"].split()[0] in ("red", "green", "blue") else "sub-patch, solid"
            expected[key][0] += r["label"] == "yes"  # vanilla always says Yes
            expected[key][1] += 1
    assert min(c[1] for c in expected.values()) > 0
    by_label = breakdown.breakdown(run, checked_dir)["vanilla"]["by_label"]
    assert {k: by_label[k] for k in expected} == expected
