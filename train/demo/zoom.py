"""Does zooming help the demo backbone, by how much, and at which magnification? The premise of the crop baseline
and of Blink (GitHub issue 16), measured on any shapes POPE set with a paired interval:

    python -m train.demo.zoom [--model demo/model] [--data-dir demo/data/pope] [--geometries 3:2,2:2,3:1,2:1]
                              [--out zoom.json]

Each distinct question with an object to zoom on is answered from the full scene and, for each crop geometry
r:context (the crop mode's `--region-size` and `--crop-context`, BLINK.md §9), from the crop of the right
region cut from the photo, the same box cut from the model's input and upsampled, and the region alone
upsampled (TokenSR's teacher's view); `train.demo.backbone.zoom_answers` has the details. The zoom factor is the
model's grid over the crop's side in patches: 12 / (r * context) for the demo, 2x for the crop mode's default
3:2. The gain on the sub-patch questions (tiny + small objects) and per size is paired: its bootstrap interval
and McNemar's test come from `blink_jax.stats.compare`, as eval.run's paired comparisons do. A larger, fresh
set tells the gain from the draw of 150 scenes: `python -m demo.shapes --out DIR --images 1000 --seed 2` (the
seeds 0 and 1 are the eval and the calibration sets).

What a gain is made of: the questions split by what they need read (`shapes.question_kind`: a "yes"; a "no"
whose look-alike has the asked colour, told apart by shape only; or the asked shape, told apart by colour),
the sub-patch "no" questions whose asked colour is in the scene by whether the crop keeps that colour in
view, and the questions that need the shape read by where the object lands on the zoomed crop's patch grid
(`shapes.patch_offset`: on a patch centre, or cut over patches). A model that answers from colour alone gains
exactly where the crop leaves the colour out: field of view, not detail (demo/MODEL_CARD.md, "Does zooming help
this backbone?").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import blink_jax
from blink_jax.rundir import atomic_write_text
from blink_jax.stats import compare
from demo import shapes
from train.demo.backbone import accuracy_by_bucket, zoom_answers

ROOT = Path(__file__).resolve().parents[2]
CENTRED = 0.25  # a `shapes.patch_offset` up to this (a quarter patch each way) counts as on the patch centre
KIND_LABELS = {"yes": '"yes"', "same colour": '"no", look-alike of the asked colour',
               "same shape": '"no", look-alike of the asked shape'}


def parse_geometries(text: str) -> list[tuple[int, float]]:
    """'3:2,2:1' -> [(3, 2.0), (2, 1.0)]; each r must divide the demo's 12 x 12 grid and context be >= 1."""
    out = []
    for item in text.split(","):
        try:
            r, context = item.split(":")
            r, context = int(r), float(context)
        except ValueError:
            raise ValueError(f"--geometries item {item!r}: write region_size:context, e.g. 3:2") from None
        if shapes.GRID % r or context < 1:
            raise ValueError(f"--geometries item {item!r}: the region side must divide the {shapes.GRID}-patch grid "
                             f"and the context be at least 1 (the crop grows the region)")
        out.append((r, context))
    return out


def paired(zoomed: np.ndarray, full: np.ndarray, questions: list[str]) -> dict:
    """Zoomed against full on the same questions (`blink_jax.stats.compare`: accuracies, the difference with its
    95% bootstrap interval, the discordant counts, McNemar's exact p)."""
    return compare(dict(zip(questions, zoomed)), dict(zip(questions, full)))


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def measure(model_dir: Path, data_dir: Path, geometries: list[tuple[int, float]], *, batch_size: int = 32,
            progress: bool = True) -> dict:
    """-> {"questions", "full": accuracy by bucket, "full_by_kind": {kind: {bucket: [correct, n]}},
    "geometries": [{"region_size", "context", "zoom", "views": {view: accuracy by bucket},
    "paired": {group: zoomed vs full (`paired`)}, "colour_in_scene"}]}.
    The groups: "sub_patch", each size bucket, and "sub_patch/KIND" for the sub-patch questions by
    `shapes.question_kind`, and in a checked world "sub_patch/checked" and "sub_patch/solid" by the zoomed-on
    object's finish ("finish": each view's accuracy on those), and "sub_patch/FINISH/KIND" by both.
    "colour_in_scene": the sub-patch "no" questions whose asked colour is in the scene, how many crops keep it in
    view or leave it out, and the zoomed accuracy of each."""
    model = blink_jax.load_pretrained(model_dir, dtype="float32").module
    bar = tqdm(total=None, unit="q", disable=not progress, desc="full scene")
    full = zoom_answers(model, data_dir, views=("full",), batch_size=batch_size, progress=bar.update)
    bar.close()
    n_questions = len(full.questions)
    out = {"questions": n_questions, "full": accuracy_by_bucket(full.correct["full"], full.buckets, prefix="full"),
           "full_by_kind": {k: {b: [int(full.correct["full"][m].sum()), int(m.sum())]
                                for b, _, _ in shapes.SIZE_BUCKETS
                                for m in [(full.kinds == k) & (full.buckets == b)] if m.any()}
                            for k in shapes.LOOKALIKE_KINDS},
           "geometries": []}
    names = np.array([f"{image}: {name}" for image, name, _ in full.questions])
    sub_patch = np.isin(full.buckets, shapes.SUB_PATCH)
    # in a checked world, the sub-patch questions by their object's finish
    finishes = {finish: sub_patch & m for finish, m in (("checked", full.checked), ("solid", ~full.checked))
                if full.checked.any() and (sub_patch & m).any()}
    groups = {"sub_patch": sub_patch,
              **{b: full.buckets == b for b, _, _ in shapes.SIZE_BUCKETS if (full.buckets == b).any()},
              **{f"sub_patch/{k}": sub_patch & (full.kinds == k) for k in shapes.LOOKALIKE_KINDS
                 if (sub_patch & (full.kinds == k)).any()},
              **{f"sub_patch/{finish}": m for finish, m in finishes.items()},
              **{f"sub_patch/{finish}/{k}": m & (full.kinds == k) for finish, m in finishes.items()
                 for k in shapes.LOOKALIKE_KINDS if (m & (full.kinds == k)).any()}}
    for r, context in geometries:
        bar = tqdm(total=n_questions, unit="q", disable=not progress, desc=f"crop {r}:{context:g}")
        answers = zoom_answers(model, data_dir, region_size=r, context=context, views=("zoom", "upsampled", "teacher"),
                               batch_size=batch_size, progress=bar.update)
        bar.close()
        zoomed = answers.correct["zoom"]  # the same questions in the same order as `full` (sorted labels)
        # sub-patch "no" questions whose colour is in the scene: does the crop keep that colour in view?
        asked = sub_patch & ~np.array([label for _, _, label in full.questions]) & full.colour_in_view["full"]
        kept = answers.colour_in_view["zoom"]
        colour = {"n": int(asked.sum()), "full_accuracy": _mean(full.correct["full"][asked]),
                  "kept": int((asked & kept).sum()), "zoom_accuracy_kept": _mean(zoomed[asked & kept]),
                  "left_out": int((asked & ~kept).sum()), "zoom_accuracy_left_out": _mean(zoomed[asked & ~kept])}
        # where the zoomed-on object lands on the crop's patch grid: a small shape on a patch corner is cut in four
        centred = answers.zoom_offsets <= CENTRED
        landing = {f"sub_patch/{k}_{where}": sub_patch & (full.kinds == k) & m
                   for k in ("yes", "same colour") for where, m in (("centred", centred), ("off_centre", ~centred))}
        out["geometries"].append({
            "region_size": r, "context": context, "zoom": shapes.GRID / (r * context),
            "views": {view: accuracy_by_bucket(c, answers.buckets, prefix=view) for view, c in answers.correct.items()},
            "paired": {g: paired(zoomed[m], full.correct["full"][m], list(names[m]))
                       for g, m in {**groups, **landing}.items() if m.any()},
            "colour_in_scene": colour,
            "finish": {finish: {view: _mean(c[m]) for view, c in answers.correct.items()}
                       for finish, m in finishes.items()},
        })
    return out


def markdown(result: dict) -> str:
    full, sizes = result["full"], [b for b, _, _ in shapes.SIZE_BUCKETS]

    def cell(kind: str, size: str) -> str:
        c = result["full_by_kind"][kind].get(size)
        return f"{c[0] / c[1]:.3f} ({c[1]})" if c else "-"

    lines = [f"{result['questions']} questions; sub-patch (tiny + small objects): {full['full/n_sub_patch']}, "
             f"full scene accuracy {full['full/acc_sub_patch']:.3f}", "",
             "Full scene accuracy by what the question needs read (`shapes.question_kind`) and size:", "",
             "| | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes),
             *[f"| {KIND_LABELS[k]} | " + " | ".join(cell(k, b) for b in sizes) + " |"
               for k in shapes.LOOKALIKE_KINDS if result["full_by_kind"].get(k)], "",
             "| crop r:context | zoom | crop of the photo | gain (points) | 95% interval "
             "| right only zoomed / only full | McNemar p | upsampled | teacher's view | tiny gain | small gain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in result["geometries"]:
        s, views, by = g["paired"]["sub_patch"], g["views"], g["paired"]
        lines.append(
            f"| {g['region_size']}:{g['context']:g} | {g['zoom']:g}x | {s['accuracy']:.3f} "
            f"| {100 * s['difference']:+.1f} "
            f"| [{100 * s['ci95'][0]:+.1f}, {100 * s['ci95'][1]:+.1f}] | {s['only_this']} / {s['only_reference']} "
            f"| {s['mcnemar_p']:.2g} | {views['upsampled']['upsampled/acc_sub_patch']:.3f} "
            f"| {views['teacher']['teacher/acc_sub_patch']:.3f} | "
            + " | ".join(f"{100 * by[b]['difference']:+.1f}" if b in by else "" for b in ("tiny", "small")) + " |")
    kinds = [k for k in shapes.LOOKALIKE_KINDS if f"sub_patch/{k}" in result["geometries"][0]["paired"]] \
        if result["geometries"] else []
    if kinds:
        first = result["geometries"][0]["paired"]
        lines += ["", "Sub-patch questions by what they need read (`shapes.question_kind`): the answer is yes; no, "
                  "and the look-alike has the asked colour (only its shape differs) or the asked shape (only its "
                  "colour differs). Full scene / zoomed accuracy and the gain (points):", "",
                  "| crop r:context | " + " | ".join(f"{k} ({first[f'sub_patch/{k}']['units']})" for k in kinds) + " |",
                  "|---|" + "---|" * len(kinds)]
        for g in result["geometries"]:
            cells = [g["paired"][f"sub_patch/{k}"] for k in kinds]
            lines.append(f"| {g['region_size']}:{g['context']:g} | " + " | ".join(
                f"{c['reference_accuracy']:.3f} → {c['accuracy']:.3f} ({100 * c['difference']:+.1f})" for c in cells)
                + " |")
    wheres = ("centred", "off_centre")
    landing = [k for k in ("yes", "same colour")
               if any(f"sub_patch/{k}_{w}" in g["paired"] for g in result["geometries"] for w in wheres)]
    if landing:
        lines += ["", "Sub-patch questions that need the shape read (\"yes\", and \"no\" with a look-alike of the "
                  "asked colour) by where the object lands on the zoomed crop's patch grid: within a quarter patch "
                  "of a patch centre, or further (towards an edge or a corner, cut over patches). n, full scene → "
                  "zoomed accuracy:", "",
                  "| crop r:context | " + " | ".join(f"{k}, {w.replace('_', '-')}" for k in landing
                                                      for w in wheres) + " |",
                  "|---|" + "---|" * (2 * len(landing))]
        for g in result["geometries"]:
            cells = []
            for k in landing:
                for w in wheres:
                    c = g["paired"].get(f"sub_patch/{k}_{w}")
                    cells.append(f"{c['units']}: {c['reference_accuracy']:.3f} → {c['accuracy']:.3f}" if c else "-")
            lines.append(f"| {g['region_size']}:{g['context']:g} | " + " | ".join(cells) + " |")
    if result["geometries"] and result["geometries"][0].get("finish"):
        lines += ["", "Sub-patch questions by the zoomed-on object's finish (a checked world, `shapes.World.checked`): "
                  "a fine check, whose colour the downsampling averages away, or solid. n, full scene → crop of the "
                  "photo (gain), upsampled, teacher's view:", "",
                  "| crop r:context | " + " | ".join(result["geometries"][0]["finish"]) + " |",
                  "|---|" + "---|" * len(result["geometries"][0]["finish"])]
        for g in result["geometries"]:
            cells = []
            for finish, acc in g["finish"].items():
                c = g["paired"][f"sub_patch/{finish}"]
                cells.append(f"{c['units']}: {c['reference_accuracy']:.3f} → {c['accuracy']:.3f} "
                             f"({100 * c['difference']:+.1f}), {acc['upsampled']:.3f}, {acc['teacher']:.3f}")
            lines.append(f"| {g['region_size']}:{g['context']:g} | " + " | ".join(cells) + " |")
    split = [(f, k) for f in ("checked", "solid") for k in shapes.LOOKALIKE_KINDS
             if result["geometries"] and f"sub_patch/{f}/{k}" in result["geometries"][0]["paired"]]
    if split:
        lines += ["", "Sub-patch questions by finish and by what they need read (a checked world): does the crop "
                  "read the check (\"yes\" and \"same shape\" on a checked object), and what does it do to the "
                  "questions only shape decides (\"same colour\")? n: full scene → zoomed accuracy:", "",
                  "| crop r:context | " + " | ".join(f"{f}, {k}" for f, k in split) + " |",
                  "|---|" + "---|" * len(split)]
        for g in result["geometries"]:
            cells = [g["paired"].get(f"sub_patch/{f}/{k}") for f, k in split]
            lines.append(f"| {g['region_size']}:{g['context']:g} | " + " | ".join(
                f"{c['units']}: {c['reference_accuracy']:.3f} → {c['accuracy']:.3f}" if c else "-" for c in cells)
                + " |")
    if result["geometries"] and "colour_in_scene" in result["geometries"][0]:
        c0 = result["geometries"][0]["colour_in_scene"]
        f = lambda x: "-" if x is None else f"{x:.3f}"
        lines += ["", f"Sub-patch \"no\" questions whose asked colour is somewhere in the scene ({c0['n']}; "
                  f"full scene accuracy {f(c0['full_accuracy'])}): the crop keeps that colour in view, or leaves "
                  "it out.", "", "| crop r:context | kept: n | zoomed accuracy | left out: n | zoomed accuracy |",
                  "|---|---|---|---|---|"]
        for g in result["geometries"]:
            c = g["colour_in_scene"]
            lines.append(f"| {g['region_size']}:{g['context']:g} | {c['kept']} | {f(c['zoom_accuracy_kept'])} "
                         f"| {c['left_out']} | {f(c['zoom_accuracy_left_out'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo.zoom",
                                description=__doc__.split("\n\n")[0].rstrip(":") + ".",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--model", default=str(ROOT / "demo" / "model"), help="the demo backbone (default: bundled)")
    p.add_argument("--data-dir", default=str(ROOT / "demo" / "data" / "pope"),
                   help="a shapes POPE set (default: the bundled eval set)")
    p.add_argument("--geometries", default="3:2,2:2,3:1,2:1",
                   help="crop geometries region_size:context, comma-separated (default %(default)s: 2x, 3x, 4x, 6x)")
    p.add_argument("--batch-size", type=int, default=32, help="(default %(default)s)")
    p.add_argument("--out", help="also write the result here as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        geometries = parse_geometries(args.geometries)
    except ValueError as e:
        p.error(str(e))
    data = Path(args.data_dir)
    if not (data / "shapes_annotations.json").is_file():
        print(f"'{data}' has no shapes_annotations.json: give a shapes POPE set (python -m demo.shapes --out DIR)",
              file=sys.stderr)
        return 2
    result = measure(Path(args.model), data, geometries, batch_size=args.batch_size, progress=not args.no_progress)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
