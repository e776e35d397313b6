"""Where Blink and the crop baseline help or hurt on the demo: an eval.run output on the shapes POPE set, broken
down per mode by the size of the object each question is about, by the answer, by what Blink did at each layer,
and by whether the crop held the object asked about (from the samples' trace summaries).

    python -m train.demo.breakdown --run eval_out/pope_demo [--data-dir demo/data/pope]

Size buckets come from `shapes_annotations.json` (`shapes.question_bucket`: for a "yes" the object's size, for
a "no" the smallest object in view sharing its colour or shape, i.e. what it could be mistaken for). The "no"
questions are also split by whether the asked colour is somewhere in the scene: if it is, only shapes say no (a
model that answers from colour alone says yes there and is right everywhere else). In a checked world
(`shapes.World.checked`) the sub-patch questions are also split by whether that object is a fine check, whose
colour the model's input does not hold.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from demo import shapes
from demo.pope import parse_yes_no

BUCKETS = tuple(name for name, _, _ in shapes.SIZE_BUCKETS) + ("none",)
LABEL_ROWS = {"yes": 'answer "yes"', "no": 'answer "no"',
              "no, colour in scene": '"no", its colour in the scene (only shape says no)',
              "no, colour not in scene": '"no", its colour not in the scene',
              "sub-patch, checked": "sub-patch, the object a fine check (its colour not in the input)",
              "sub-patch, solid": "sub-patch, the object solid"}


def _said_yes(prediction: str | None) -> bool:
    return parse_yes_no(prediction or "") != "no"


def breakdown(run: Path, data_dir: Path) -> dict:
    """-> {mode: {"by_bucket": {bucket: (correct, n)}, "by_label": {"yes", "no" and the "no" split by whether the
    asked colour is in the scene, and in a checked world the sub-patch questions by their object's finish
    (`LABEL_ROWS`): (correct, n)}, "expanded": (n_expanded_any, n),
    "expanded_at": {layer: (n_expand, n)}, "crop_hit": (n "yes" questions whose crop holds the object, n),
    "sr_hit": (n "yes" questions Blink expanded whose expanded region holds the object, n)}}; sr_hit needs
    the run's traces_pope_<mode>.jsonl (--save-traces)."""
    scenes = shapes.read_annotations(data_dir)
    world = shapes.read_world(data_dir)
    rows = {}
    for split in shapes.SPLITS:
        for line in open(data_dir / f"coco_pope_{split}.json"):
            r = json.loads(line)
            rows[f"{split}/{r['question_id']}"] = r
    out = {}
    for samples in sorted(run.glob("samples_pope_*.jsonl")):
        mode = samples.stem.removeprefix("samples_pope_")
        by_bucket, by_label = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
        expanded, expanded_at, crop_hit, sr_hit = [0, 0], collections.defaultdict(lambda: [0, 0]), [0, 0], [0, 0]
        traces = run / f"traces_pope_{mode}.jsonl"
        regions = {}  # question id -> (expanded regions, region size)
        if traces.exists():
            for line in open(traces):
                t = json.loads(line)
                if "expanded_region" in t:
                    regions[t["question_id"]] = ({x for x in t["expanded_region"] if x >= 0}, t["region_size"])
        for line in open(samples):
            s = json.loads(line)
            if s["error"] is not None or s["question_id"] not in rows:
                continue
            r = rows[s["question_id"]]
            name = r["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            target = shapes.question_target([(o.name, o.size) for o in scenes[r["image"]].objects], name)
            bucket = shapes.size_bucket(target[1]) if target else "none"
            correct = _said_yes(s["prediction"]) == (r["label"] == "yes")
            colour_in_scene = name.split()[0] in {o.name.split()[0] for o in scenes[r["image"]].objects}
            keys = [(by_bucket, bucket), (by_label, r["label"])]
            if r["label"] == "no":
                keys.append((by_label, "no, colour in scene" if colour_in_scene else "no, colour not in scene"))
            if world.checked and bucket in shapes.SUB_PATCH:
                checked = world.is_check(target[0].split()[0])
                keys.append((by_label, "sub-patch, checked" if checked else "sub-patch, solid"))
            for table, key in keys:
                table[key][0] += correct
                table[key][1] += 1
            trace = s.get("trace") or {}
            if "actions" in trace:
                expanded[0] += trace["expansions"] > 0
                expanded[1] += 1
                for layer, action in zip(trace["layers"], trace["actions"]):
                    expanded_at[layer][0] += action == "expand"
                    expanded_at[layer][1] += 1
            if s["question_id"] in regions and r["label"] == "yes" and regions[s["question_id"]][0]:
                expanded_regions, size = regions[s["question_id"]]
                scene = scenes[r["image"]]
                sr_hit[0] += any(o.name == name and shapes.region_of(o.cx, o.cy, size, scene.size) in expanded_regions
                                 for o in scene.objects)
                sr_hit[1] += 1
            if "box" in trace and r["label"] == "yes":
                left, top, right, bottom = trace["box"]
                crop_hit[0] += any(o.name == name and left <= o.cx < right and top <= o.cy < bottom
                                   for o in scenes[r["image"]].objects)
                crop_hit[1] += 1
        out[mode] = {"by_bucket": dict(by_bucket), "by_label": dict(by_label), "expanded": expanded,
                     "expanded_at": dict(expanded_at), "crop_hit": crop_hit, "sr_hit": sr_hit}
    return out


def markdown(result: dict) -> str:
    order = ["vanilla", "crop", "interp", "blink"]
    modes = sorted(result, key=lambda m: (order.index(m) if m in order else len(order), m))
    lines = ["| questions about | n | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    keys = [("bucket", b) for b in BUCKETS] + [("label", k) for k in LABEL_ROWS]
    for kind, key in keys:
        cells = [result[m][f"by_{kind}"].get(key) for m in modes]
        if not any(cells):
            continue
        n = next(c[1] for c in cells if c)
        label = {"bucket": f"{key} objects", "label": LABEL_ROWS.get(key)}[kind]
        if key == "none":
            label = "no look-alike in view"
        lines.append(f"| {label} | {n} | " + " | ".join(f"{c[0] / c[1]:.3f}" if c else "-" for c in cells) + " |")
    share = lambda c: f"{c[0] / c[1]:.1%}" if c and c[1] else "-"
    lines.append("| expanded at least once | | " + " | ".join(share(result[m]["expanded"]) for m in modes) + " |")
    layers = sorted({layer for m in modes for layer in result[m].get("expanded_at", {})})
    for layer in layers:
        lines.append(f"| expanded at layer {layer} | | "
                     + " | ".join(share(result[m]["expanded_at"].get(layer)) for m in modes) + " |")
    if any(result[m].get("sr_hit", [0, 0])[1] for m in modes):
        lines.append('| expanded region holds the object ("yes" questions it expanded on) | | '
                     + " | ".join(share(result[m].get("sr_hit")) for m in modes) + " |")
    if any(result[m].get("crop_hit", [0, 0])[1] for m in modes):
        lines.append('| crop holds the object ("yes" questions) | | '
                     + " | ".join(share(result[m].get("crop_hit")) for m in modes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo.breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="an eval.run output directory (samples_pope_<mode>.jsonl)")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "demo" / "data" / "pope"),
                   help="the shapes POPE set the run read (default: the bundled one)")
    args = p.parse_args(argv)
    run, data = Path(args.run), Path(args.data_dir)
    if not list(run.glob("samples_pope_*.jsonl")):
        print(f"no samples_pope_<mode>.jsonl in '{run}': give an eval.run --bench pope output directory",
              file=sys.stderr)
        return 2
    if not (data / "shapes_annotations.json").is_file():
        print(f"'{data}' has no shapes_annotations.json: give the shapes set the run read (--data-dir)",
              file=sys.stderr)
        return 2
    print(markdown(breakdown(run, data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
