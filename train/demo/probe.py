"""What the demo backbone's vision tower reads, before the decoder: its stage-1 patch probe on each shape's centre
patch, from the full scene and from the crop mode's 2x crop of the shape's region (issue 16).

    python -m train.demo.probe [--model DIR] [--data-dir SET] [--out probe.json]

For every shape of every scene of a shapes POPE set, the probe (`probe.safetensors`, which `python -m
train.demo_backbone` writes beside the backbones it trains, the bundled demo/model's included) classifies the
patch holding the shape's centre, once in the full view and once in the 2x crop (`shapes.crop_view`, r = 3,
context 2) of the region holding it, as the class with the highest logit ("nothing" left out). The table gives
the share of shapes whose colour and whose class it gets right, by the shape's finish (a fine check of a checked
world, `shapes.World.checked`, or solid) and size (sub-patch: tiny and small; or larger); a set drawn with
`python -m demo.shapes --checked` has the check rows. In the full view a small check's colour is averaged to
grey, so the probe can only guess among the three checked colours (1/3 right); in the crop, its accuracy says
whether the vision tower learnt to read the check. Whether the decoder then uses it, `train.demo.zoom` measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from blink_jax.processing import preprocess_image
from blink_jax.rundir import atomic_write_text
from demo import shapes
from train.demo.backbone import PROBE_FILE, load_backbone, vision_features_of

ROOT = Path(__file__).resolve().parents[2]
VIEWS = ("full", "crop")
GROUPS = tuple(f"{finish}/{size}" for finish in ("checked", "solid") for size in ("sub_patch", "larger"))


def centre_patch(scene: shapes.Scene, view: shapes.View, o: shapes.Shape, grid: int) -> int:
    """The row-major patch of a `grid` x `grid` model holding shape `o`'s centre in `view` of `scene`."""
    x, y = shapes.view_point(scene, view.box, o.cx, o.cy)
    side = shapes.IMAGE_SIZE / grid
    return min(int(y // side), grid - 1) * grid + min(int(x // side), grid - 1)


def probe_reads(model, probe: dict, data_dir: str | Path, *, batch_size: int = 32,
                progress=lambda n: None) -> list[dict]:
    """One row per (shape, view): {"image", "name", "view", "group", "predicted"}, `predicted` the class the
    probe gives the shape's centre patch (the "nothing" column left out). `progress(n)` after each batch."""
    data_dir = Path(data_dir)
    scenes = shapes.read_annotations(data_dir)
    world = shapes.read_world(data_dir)
    cfg = model.config
    grid = cfg.vision.grid
    graphdef, state = nnx.split(model.vision_tower)
    features = jax.jit(lambda pixels: vision_features_of(graphdef, state, pixels, cfg.feature_layers))
    items = []  # (image, shape, view name, View)
    for image, scene in sorted(scenes.items()):
        photo = Image.open(data_dir / "val2014" / image).convert("RGB")
        for o in scene.objects:
            region = shapes.region_of(o.cx, o.cy, shapes.CROP_REGION, scene.size)
            shown = {"full": shapes.full_view(scene, photo),
                     "crop": shapes.crop_view(scene, region, shapes.CROP_REGION, shapes.CROP_CONTEXT, photo)}
            items += [(image, scene, o, view, shown[view]) for view in VIEWS]
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = np.stack([preprocess_image(v.resized(cfg.vision.image_size).image, image_size=cfg.vision.image_size)
                           for *_, v in chunk])
        logits = np.asarray(features(jnp.asarray(pixels)) @ probe["kernel"] + probe["bias"])  # [B, P, C + 1]
        for (image, scene, o, view, v), row in zip(chunk, logits):
            finish = "checked" if world.is_check(o.colour) else "solid"
            size = "sub_patch" if shapes.size_bucket(o.size) in shapes.SUB_PATCH else "larger"
            predicted = shapes.CLASSES[int(np.argmax(row[centre_patch(scene, v, o, grid)][:-1]))]
            rows.append({"image": image, "name": o.name, "view": view, "group": f"{finish}/{size}",
                         "predicted": predicted})
        progress(len(chunk))
    return rows


def summarize(rows: list[dict]) -> dict:
    """-> {view: {group: {"n", "colour", "class"}}}: per view and group, how many shapes and the share whose
    colour (the class's first word) and whose class the probe got right; empty groups left out."""
    out = {}
    for view in VIEWS:
        out[view] = {}
        for group in GROUPS:
            mine = [r for r in rows if r["view"] == view and r["group"] == group]
            if mine:
                out[view][group] = {
                    "n": len(mine),
                    "colour": float(np.mean([r["predicted"].split()[0] == r["name"].split()[0] for r in mine])),
                    "class": float(np.mean([r["predicted"] == r["name"] for r in mine]))}
    return out


def table(summary: dict) -> str:
    lines = ["| shapes | n | full scene: colour / class right | 2x crop: colour / class right |", "|---|---|---|---|"]
    for group in GROUPS:
        full, crop = summary["full"].get(group), summary["crop"].get(group)
        if full:
            lines.append(f"| {group.replace('/', ', ').replace('_', '-')} | {full['n']} | "
                         f"{full['colour']:.3f} / {full['class']:.3f} | {crop['colour']:.3f} / {crop['class']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo.probe", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "demo" / "model"),
                   help="a backbone `python -m train.demo_backbone` trained, with its saved probe (default: the "
                        "bundled demo/model)")
    p.add_argument("--data-dir", default=str(ROOT / "demo" / "data" / "pope"),
                   help="a shapes POPE set (default: the bundled eval set)")
    p.add_argument("--batch-size", type=int, default=32, help="(default %(default)s)")
    p.add_argument("--out", help="also write the summary here as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not (Path(args.data_dir) / "shapes_annotations.json").is_file():
        print(f"--data-dir '{args.data_dir}' has no shapes_annotations.json: give a shapes POPE set, as `python -m "
              f"demo.shapes --out DIR` writes", file=sys.stderr)
        return 2
    if not (Path(args.model) / PROBE_FILE).is_file():
        print(f"--model '{args.model}' has no {PROBE_FILE}: this tool reads a backbone's saved patch probe, which "
              f"`python -m train.demo_backbone` writes beside the backbones it trains (one trained before it did "
              f"has none)", file=sys.stderr)
        return 2
    model, probe = load_backbone(args.model)
    n = sum(len(s.objects) for s in shapes.read_annotations(args.data_dir).values())
    bar = tqdm(total=n * len(VIEWS), unit="view", disable=args.no_progress, desc="probe")
    summary = summarize(probe_reads(model, probe, args.data_dir, batch_size=args.batch_size, progress=bar.update))
    bar.close()
    if args.out:
        atomic_write_text(args.out, json.dumps({"model": args.model, "data_dir": args.data_dir, **summary},
                                               indent=1) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
