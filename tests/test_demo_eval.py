"""The bundled demo: `python -m eval.run --bench pope` with no --model runs the shipped model, TokenSR and data.

Checks that the demo runs all four modes (vanilla, crop, interp, blink) through the normal POPE path, that what it reports is what the
official rules (`eval.score`) give on its saved predictions, and that the shipped TokenSR loads with the
geometry the demo's interp mode uses.
"""

from __future__ import annotations

import json

import pytest

from demo.pope import parse_yes_no
from eval import run as eval_run
from eval import score as eval_score
from eval.demo import DEMO
from shapes_by_hand import region_box

pytestmark = pytest.mark.skipif(bool(DEMO.missing()), reason="the demo/ folder is not bundled in this checkout")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert eval_run.main(["--bench", "pope", "--limit", "6", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_demo_runs_four_modes_on_the_bundled_files(demo_run):
    _, results = demo_run
    assert list(results["modes"]) == ["vanilla", "crop", "interp", "blink"]
    for entry in results["modes"].values():
        assert entry["counts"]["questions"] == 18 and entry["counts"]["errors"] == 0  # 6 per split
    settings = results["config"]["mode_settings"]
    assert settings["blink"]["blink"]["tokensr_kind"] == "conv"
    assert settings["interp"]["blink"]["layers"] == settings["blink"]["blink"]["layers"]
    assert settings["crop"]["crop"]["crop_input"] == DEMO.crop_input == "crop"
    assert settings["crop"]["crop"]["crop_layer"] == settings["blink"]["blink"]["layers"][1]  # the middle one
    for kind in ("interp", "blink"):
        assert settings[kind]["blink"]["tau_exp"] == DEMO.tau_exp
        assert settings[kind]["blink"]["tau_drop"] == DEMO.tau_drop


def demo_rows() -> dict[str, dict]:
    """question id ("split/qid", as the POPE task names them) -> its row of the release files."""
    rows = {}
    for split in ("random", "popular", "adversarial"):
        for line in open(DEMO.data_dir("pope") / f"coco_pope_{split}.json"):
            row = json.loads(line)
            rows[f"{split}/{row['question_id']}"] = row
    return rows


def demo_labels() -> dict[str, str]:
    """question id -> "yes"/"no"."""
    return {qid: row["label"] for qid, row in demo_rows().items()}


def _by_hand(rows: list[dict], labels: dict[str, str]) -> dict[str, float]:
    """eval_pope.py's rule written out: an answer is "no" if its first sentence has the word No, no or not."""
    said_no = lambda text: bool({"No", "no", "not"} & set(text.split(".")[0].replace(",", "").split(" ")))
    pairs = [(not said_no(r["prediction"]), labels[r["question_id"]] == "yes") for r in rows]
    tp = sum(p and l for p, l in pairs)
    fp = sum(p and not l for p, l in pairs)
    precision, recall = tp / max(tp + fp, 1), tp / max(sum(l for _, l in pairs), 1)
    return {"accuracy": sum(p == l for p, l in pairs) / len(pairs),
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def test_demo_metrics_follow_popes_rules_and_rescore_identically(demo_run, tmp_path):
    out, results = demo_run
    labels = demo_labels()
    for mode, entry in results["modes"].items():
        rows = [json.loads(line) for line in open(out / f"samples_pope_{mode}.jsonl")]
        for split, metrics in entry["metrics"]["splits"].items():
            hand = _by_hand([r for r in rows if r["question_id"].startswith(split + "/")], labels)
            assert metrics["accuracy"] == pytest.approx(hand["accuracy"])
            assert metrics["f1"] == pytest.approx(hand["f1"])
    for mode, entry in results["modes"].items():
        scores = tmp_path / f"{mode}.json"
        assert eval_score.main(["--bench", "pope", "--samples", str(out / f"samples_pope_{mode}.jsonl"),
                                "--data-dir", str(DEMO.data_dir("pope")), "--out", str(scores)]) == 0
        assert json.loads(scores.read_text())["metrics"] == entry["metrics"]


def test_demo_paired_comparison_counts_the_saved_answers(demo_run):
    out, results = demo_run
    labels = demo_labels()
    said_no = lambda text: bool({"No", "no", "not"} & set(text.split(".")[0].replace(",", "").split(" ")))
    right = {}
    for mode in results["modes"]:
        rows = [json.loads(line) for line in open(out / f"samples_pope_{mode}.jsonl")]
        right[mode] = {r["question_id"]: (not said_no(r["prediction"])) == (labels[r["question_id"]] == "yes")
                       for r in rows}
    paired = results["paired"]
    assert paired["reference"] == "vanilla" and list(paired["modes"]) == ["crop", "interp", "blink"]
    [vs_crop] = paired["also"]
    assert vs_crop["reference"] == "crop" and list(vs_crop["modes"]) == ["vanilla", "interp", "blink"]
    for comparison in (paired, vs_crop):
        ref = comparison["reference"]
        for mode, c in comparison["modes"].items():
            assert c["units"] == 18
            assert c["only_this"] == sum(right[mode][q] and not right[ref][q] for q in right[mode])
            assert c["only_reference"] == sum(right[ref][q] and not right[mode][q] for q in right[mode])
            assert c["difference"] == pytest.approx((c["only_this"] - c["only_reference"]) / 18)
    text = (out / "results.md").read_text()
    assert "## Paired comparison against Vanilla" in text
    assert "## Paired comparison against Crop" in text
    assert "POPE: F1 x 100, averaged over the random, popular and adversarial splits" in text  # the headline, said


@pytest.mark.parametrize("folder, kind", [("tokensr", "conv"), ("tokensr_mlp", "mlp")])
def test_demo_tokensr_matches_the_demo_model(folder, kind):
    from blink_jax.blink.checkpoint import load_tokensr
    from blink_jax.blink.tokensr import check_geometry
    from blink_jax.config import LlavaConfig

    bank, blink = load_tokensr(DEMO.tokensr.parent / folder)
    cfg = LlavaConfig.from_json(DEMO.model)
    blink.validate_for(cfg.text.num_hidden_layers, cfg.vision.grid)  # layers exist, regions tile the grid
    check_geometry(blink, cfg.text.hidden_size, bank)
    assert bank.layers == blink.layers and blink.tokensr_kind == kind


def test_oracle_tool_asks_as_eval_run_does(demo_run):
    """`train.demo.oracle` (the oracle-TokenSR measurement of demo/MODEL_CARD.md) answers with its own forward; its
    vanilla and Blink rows must be eval.run's answers on the same questions, else its oracle row means nothing."""
    from train.demo import oracle

    out, _ = demo_run
    result = oracle.evaluate(DEMO.model, DEMO.tokensr, DEMO.data_dir("pope"), images=3, log=lambda m: None)
    rows = demo_rows()
    compared = 0
    for mode in ("vanilla", "blink"):
        said_yes = {(image, text): yes for image, text, yes in result["said_yes"][mode]}
        for line in open(out / f"samples_pope_{mode}.jsonl"):
            sample = json.loads(line)
            key = rows[sample["question_id"]]["image"], rows[sample["question_id"]]["text"]
            if key in said_yes:
                assert said_yes[key] == (parse_yes_no(sample["prediction"]) != "no"), (mode, key)
                compared += 1
    assert compared >= 12


def _region_crop_by_hand(photo, cx: float, cy: float, r: int, context: float):
    """The crop of the r x r region of the 12 x 12 grid holding (cx, cy), grown by `context` about its centre
    and clamped to the model's 168 px input, cut from the 336 px photo: written out, not through blink_jax."""
    return photo.crop(region_box(cx, cy, r, context))


def test_zoom_tool_answers_as_the_model_does_on_crops_cut_by_hand(tmp_path):
    """`train.demo.zoom` (the premise measurement of demo/MODEL_CARD.md): its accuracies and paired gain per
    geometry equal those of the model's normal path (Processor, build_prompt, Llava) on the full photos and on
    crops cut by hand around the object asked about (or its smallest look-alike), on a fresh 4-scene set of the
    checked world (`shapes.World.checked`: red, green and blue shapes are fine checks)."""
    import numpy as np
    from PIL import Image

    from blink_jax import load_pretrained
    from blink_jax.processing import Processor, build_prompt
    from demo import shapes
    from train.demo import zoom

    data = tmp_path / "pope"
    shapes.write_pope(data, 4, seed=7, world=shapes.World(checked=True))
    out = tmp_path / "zoom.json"
    assert zoom.main(["--data-dir", str(data), "--geometries", "3:2,2:1", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())

    scenes = shapes.read_annotations(data)
    questions = {}
    for split in ("random", "popular", "adversarial"):
        for line in open(data / f"coco_pope_{split}.json"):
            row = json.loads(line)
            questions[(row["image"], row["text"])] = row["label"]
    llava = load_pretrained(DEMO.model, dtype="float32")
    processor = Processor.from_pretrained(DEMO.model, config=llava.config)

    def right(images, texts, labels):
        batch = processor([build_prompt(t) for t in texts], images)
        said = np.asarray(llava(**batch).logits)[:, -1].argmax(-1)
        return np.array([parse_yes_no(processor.decode([t])) == label for t, label in zip(said, labels)])

    items = []  # (image, text, label, bucket, target object)
    for (image, text), label in sorted(questions.items()):
        name = text.removeprefix("Is there a ").removesuffix(" in the image?")
        objects = scenes[image].objects
        same = [o for o in objects if o.name == name]
        alike = [o for o in objects if set(name.split()) & set(o.name.split())]
        if not same and not alike:
            continue  # nothing to zoom on
        target = max(same, key=lambda o: o.size) if same else min(alike, key=lambda o: o.size)
        items.append((image, text, label, target.bucket, target))
    photos = {image: Image.open(data / "val2014" / image).convert("RGB") for image in scenes}
    texts, labels = [i[1] for i in items], [i[2] for i in items]
    sub = np.array([i[3] in ("tiny", "small") for i in items])
    full = right([photos[i[0]] for i in items], texts, labels)
    assert result["questions"] == len(items) and result["full"]["full/n_sub_patch"] == sub.sum() > 0
    assert result["full"]["full/accuracy"] == pytest.approx(full.mean())
    kinds = np.array(["yes" if i[2] == "yes" else "same colour" if i[4].name.split()[0] in i[1].split()
                      else "same shape" for i in items])
    for kind, by_size in result["full_by_kind"].items():
        for size, counts in by_size.items():
            m = (kinds == kind) & np.array([i[3] == size for i in items])
            assert counts == [full[m].sum(), m.sum()], (kind, size)
    assert sum(c[1] for by_size in result["full_by_kind"].values() for c in by_size.values()) == len(items)
    for g in result["geometries"]:
        zoomed = right([_region_crop_by_hand(photos[i[0]], i[4].cx, i[4].cy, g["region_size"], g["context"])
                        for i in items], texts, labels)
        assert g["views"]["zoom"]["zoom/accuracy"] == pytest.approx(zoomed.mean()), g["region_size"]
        s = g["paired"]["sub_patch"]
        assert (s["only_this"], s["only_reference"]) == ((zoomed & ~full)[sub].sum(), (~zoomed & full)[sub].sum())
        assert s["difference"] == pytest.approx(zoomed[sub].mean() - full[sub].mean())
        assert s["ci95"][0] <= s["difference"] <= s["ci95"][1]
        for kind in ("yes", "same colour", "same shape"):  # by hand: the answer, else what the look-alike shares
            m = sub & (kinds == kind)
            k = g["paired"].get(f"sub_patch/{kind}", {"only_this": 0, "only_reference": 0})
            assert (k["only_this"], k["only_reference"]) == ((zoomed & ~full)[m].sum(), (~zoomed & full)[m].sum())
        # sub-patch "no" questions whose colour is in the scene, and whether a shape of it overlaps the crop
        colour = lambda i: i[1].split()[3]
        asked = sub & np.array([i[2] == "no" and any(o.name.split()[0] == colour(i) for o in scenes[i[0]].objects)
                                for i in items])
        boxes = [region_box(i[4].cx, i[4].cy, g["region_size"], g["context"]) for i in items]
        kept = np.array([any(o.name.split()[0] == colour(i) and min(o.box[2], b[2]) > max(o.box[0], b[0])
                             and min(o.box[3], b[3]) > max(o.box[1], b[1]) for o in scenes[i[0]].objects)
                         for i, b in zip(items, boxes)])
        c = g["colour_in_scene"]
        assert (c["n"], c["kept"], c["left_out"]) == (asked.sum(), (asked & kept).sum(), (asked & ~kept).sum())
        if (asked & ~kept).any():
            assert c["zoom_accuracy_left_out"] == pytest.approx(zoomed[asked & ~kept].mean())
        checked = np.array([i[4].name.split()[0] in ("red", "green", "blue") for i in items])
        assert set(g["finish"]) == {f for f, m in (("checked", checked), ("solid", ~checked)) if (sub & m).any()}
        for finish, m in (("checked", sub & checked), ("solid", sub & ~checked)):
            if m.any():
                assert g["finish"][finish]["zoom"] == pytest.approx(zoomed[m].mean())
                assert g["paired"][f"sub_patch/{finish}"]["units"] == m.sum()
                for kind in ("yes", "same colour", "same shape"):  # by finish and kind, by hand
                    mk = m & (kinds == kind)
                    k = g["paired"].get(f"sub_patch/{finish}/{kind}", {"units": 0, "only_this": 0})
                    assert (k["units"], k["only_this"]) == (mk.sum(), (zoomed & ~full)[mk].sum()), (finish, kind)
