"""An oracle TokenSR on the demo: what Blink would do if its SR tokens were exactly TokenSR's training target.

Blink's TokenSR is trained to make, from a region's hidden states at layer L, the hidden states the model has at
layer L for that region's zoomed crop (the teacher, BLINK.md §5; `train.teacher`). This replaces TokenSR's output
by that target itself, computed for the region Blink expanded, and asks every question of a shapes POPE set
again. It bounds what any TokenSR trained that way could recover in one pass:

    python -m train.demo.oracle [--model demo/model] [--tokensr demo/tokensr] [--data-dir demo/data/pope]
                                [--out oracle.json]

Rows (first answer token, greedy, as eval.run's; "No" -> no, anything else yes, as eval_pope.py):
  vanilla       no expansion (tau_exp > 1);
  blink         Blink with the trained TokenSR (its answers should be eval.run's mode blink's);
  oracle        Blink whose SR tokens at each layer are the teacher's states for the region expanded there
                (the model's input, region cut and resized back: the target TokenSR trains on);
  oracle-photo  the same from the original photo's pixels of that region (the detail the input lacks).

The regions come from the run itself: Blink's decisions at layer L+1 read the SR tokens of layer L, so each
oracle run is repeated with the regions it expanded until they stop changing (at most `--rounds`); questions
whose regions still moved are counted in the output.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

import blink_jax
from blink_jax.blink.checkpoint import load_tokensr
from blink_jax.blink.forward import blink_prefill
from blink_jax.blink.probe import probe_layers
from blink_jax.model_inputs import LlavaInputs
from blink_jax.processing import build_prompt
from demo import shapes
from demo.pope import confusion_metrics
from train.teacher import area_pool, crop_uint8

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("vanilla", "blink", "oracle", "oracle-photo")


class OracleBank:
    """A TokenSR bank whose layer-L module returns given tokens [B, O, O, D] (whatever the region's states)."""

    def __init__(self, layers: tuple[int, ...], tokens: jax.Array):  # tokens [Lp, B, O, O, D]
        self.layers, self.tokens = layers, tokens

    def for_layer(self, layer: int):
        return lambda low_res: self.tokens[self.layers.index(layer)]


def _answer(model, bank, input_ids, pixel_values, mask, thresholds, static):
    """-> (first answer token [B], expanded region [Lp, B]) of Blink with `bank` as its TokenSR."""
    logits, _, trace = blink_prefill(model, bank, input_ids, pixel_values, mask, static, thresholds,
                                     jax.random.key(0), all_logits=False)
    return jnp.argmax(logits[:, -1], axis=-1), trace.expanded_region


@functools.partial(jax.jit, static_argnames=("graphdef", "bank_def", "static"))
def run_blink(graphdef, state, bank_def, bank_state, input_ids, pixel_values, mask, thresholds, *, static):
    return _answer(nnx.merge(graphdef, state), nnx.merge(bank_def, bank_state), input_ids, pixel_values, mask,
                   thresholds, static)


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def run_oracle(graphdef, state, tokens, input_ids, pixel_values, mask, thresholds, *, static):
    """`run_blink` with `OracleBank(tokens)` ([Lp, B, O, O, D]) as the TokenSR."""
    return _answer(nnx.merge(graphdef, state), OracleBank(tuple(static.layers), tokens), input_ids, pixel_values,
                   mask, thresholds, static)


@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "region_size", "side"))
def region_states(graphdef, state, input_ids, pixel_values, mask, *, layers, region_size, side):  # [Lp, B, O, O, D]
    """The teacher's target (`train.teacher.teacher_states`): visual states at `layers`, area-pooled to side x side."""
    return area_pool(probe_layers(nnx.merge(graphdef, state), input_ids, pixel_values, mask, layers=layers,
                                  region_size=region_size).visual, side)


def crops(scene: shapes.Scene, photo: Image.Image, image: np.ndarray, regions: int, region_size: int,
          source: str) -> list[np.ndarray]:
    """uint8 [S, S, 3] for each region: its box cut from the model's input `image` and resized back, exactly as the
    teacher's (`train.teacher.crop_uint8`), or the same box of the photo shown to the model (`source="photo"`,
    `shapes.zoom_view`)."""
    if source == "input":
        return [crop_uint8(image, region, shapes.GRID, region_size, shapes.PATCH) for region in range(regions)]
    return [np.asarray(shapes.zoom_view(scene, shapes.region_scene_box(scene, region, region_size), photo).image)
            for region in range(regions)]


def evaluate(model_dir: Path, tokensr_dir: Path, data_dir: Path, *, batch_size: int = 16, rounds: int = 4,
             images: int | None = None, log=print) -> dict:
    """-> `summarize`'s dict over the set's questions (those of its first `images` images when given)."""
    graphdef, state = nnx.split(blink_jax.load_pretrained(model_dir, dtype=jnp.float32).module)
    bank, blink = load_tokensr(tokensr_dir)
    bank_def, bank_state = nnx.split(bank)
    inputs = LlavaInputs.from_pretrained(model_dir)
    static, thresholds = blink.split()
    never = thresholds._replace(tau_exp=jnp.asarray(2.0, jnp.float32))  # tau_exp > 1 never expands: vanilla
    layers, r, side = tuple(blink.layers), blink.region_size, blink.sr_side
    num_regions = static.num_regions(shapes.GRID)
    no_id = inputs.processor.tokenizer.convert_tokens_to_ids("No")
    scenes = shapes.read_annotations(data_dir)

    rows = {split: [json.loads(line) for line in open(data_dir / f"coco_pope_{split}.json")] for split in shapes.SPLITS}
    questions = sorted({(row["image"], row["text"]) for split_rows in rows.values() for row in split_rows})
    by_image = collections.defaultdict(list)
    for image, text in questions:
        by_image[image].append(text)
    if images is not None:
        by_image = {name: by_image[name] for name in sorted(by_image)[:images]}
        rows = {split: [row for row in split_rows if row["image"] in by_image] for split, split_rows in rows.items()}

    prefix = np.asarray(inputs.prefix_ids(None), np.int32)
    said_yes = {v: {} for v in VARIANTS}
    unsettled = {"oracle": 0, "oracle-photo": 0}
    start = time.time()
    for n_done, (image_name, texts) in enumerate(sorted(by_image.items())):
        photo = Image.open(data_dir / "val2014" / image_name).convert("RGB")
        image = inputs.image_uint8(photo)
        teacher = {}
        for source in ("input", "photo"):
            views = np.stack([inputs.pixels(c) for c in crops(scenes[image_name], photo, image, num_regions, r, source)])
            ids = np.tile(prefix, (len(views), 1))
            states = region_states(graphdef, state, ids, views, np.ones_like(ids), layers=layers, region_size=r,
                                   side=side)  # [Lp, R, O, O, D]
            teacher["oracle" if source == "input" else "oracle-photo"] = np.asarray(states)
        for at in range(0, len(texts), batch_size):
            chunk = texts[at:at + batch_size]
            padded = chunk + chunk[-1:] * (batch_size - len(chunk))  # one batch shape: one program
            ids = np.asarray([inputs.processor.tokenize(build_prompt(t)) for t in padded], np.int32)
            mask = np.ones_like(ids)
            pixels = np.stack([inputs.pixels(image)] * batch_size)
            answer, _ = run_blink(graphdef, state, bank_def, bank_state, ids, pixels, mask, never, static=static)
            record(said_yes["vanilla"], image_name, chunk, answer, no_id)
            answer, regions = run_blink(graphdef, state, bank_def, bank_state, ids, pixels, mask, thresholds,
                                        static=static)
            record(said_yes["blink"], image_name, chunk, answer, no_id)
            for variant, states in teacher.items():
                supplied = np.asarray(regions)  # [Lp, B]
                for _ in range(rounds):
                    picked = np.where(supplied >= 0, supplied, 0)
                    tokens = states[np.arange(len(layers))[:, None], picked]  # [Lp, B, O, O, D]
                    answer, expanded = run_oracle(graphdef, state, tokens, ids, pixels, mask, thresholds, static=static)
                    moved = np.any(np.asarray(expanded) != supplied, axis=0)[:len(chunk)]  # [b]
                    if not moved.any():
                        break
                    supplied = np.asarray(expanded)
                else:
                    unsettled[variant] += int(moved.sum())
                record(said_yes[variant], image_name, chunk, answer, no_id)
        if (n_done + 1) % 25 == 0:
            log(f"{n_done + 1}/{len(by_image)} images, {time.time() - start:.0f} s")
    return summarize(said_yes, rows, scenes, unsettled)


def record(table: dict, image: str, texts: list[str], answer, no_id: int) -> None:
    for text, token in zip(texts, np.asarray(answer)):  # a padded batch's extra rows are left out
        table[(image, text)] = int(token) != no_id


def summarize(said_yes: dict, rows: dict, scenes: dict, unsettled: dict) -> dict:
    """-> {"splits": {variant: {split: eval_pope metrics}}, "buckets": {variant: {bucket: [correct, n]}},
    "paired": {variant: {against: [right only in variant, right only in against]}}, "unsettled": ...,
    "said_yes": {variant: [[image, question, said yes], ...]}}."""
    out = {"splits": {}, "buckets": {}, "paired": {}, "unsettled": unsettled,
           "said_yes": {v: [[image, text, yes] for (image, text), yes in sorted(a.items())] for v, a in said_yes.items()}}
    correct = {}
    for variant, answers in said_yes.items():
        out["splits"][variant], buckets, right = {}, collections.defaultdict(lambda: [0, 0]), []
        for split, split_rows in rows.items():
            preds = ["yes" if answers[(row["image"], row["text"])] else "no" for row in split_rows]
            labels = [row["label"] for row in split_rows]
            out["splits"][variant][split] = confusion_metrics(preds, labels)
            for row, pred in zip(split_rows, preds):
                name = row["text"].removeprefix("Is there a ").removesuffix(" in the image?")
                bucket = shapes.question_bucket([(o.name, o.size) for o in scenes[row["image"]].objects], name)
                ok = pred == row["label"]
                right.append(ok)
                for key in (bucket, "sub_patch" if bucket in shapes.SUB_PATCH else None, f"label_{row['label']}"):
                    if key:
                        buckets[key][0] += ok
                        buckets[key][1] += 1
        out["buckets"][variant] = dict(buckets)
        correct[variant] = np.asarray(right)
    for variant in VARIANTS:
        out["paired"][variant] = {other: [int((correct[variant] & ~correct[other]).sum()),
                                          int((~correct[variant] & correct[other]).sum())]
                                  for other in VARIANTS if other != variant}
    return out


def markdown(result: dict) -> str:
    lines = ["| | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    average = lambda v, key: np.mean([m[key] for m in result["splits"][v].values()])
    lines.append("| accuracy (average) | " + " | ".join(f"{average(v, 'accuracy'):.3f}" for v in VARIANTS) + " |")
    lines.append("| F1 (average) | " + " | ".join(f"{average(v, 'f1'):.3f}" for v in VARIANTS) + " |")
    for key in ("tiny", "small", "sub_patch", "medium", "large", "label_yes", "label_no"):
        cells = [result["buckets"][v].get(key) for v in VARIANTS]
        if cells[0]:
            lines.append(f"| {key} (n = {cells[0][1]}) | " + " | ".join(f"{c[0] / c[1]:.3f}" for c in cells) + " |")
    lines.append("| right only here / only in vanilla | | "
                 + " | ".join("%d / %d" % tuple(result["paired"][v]["vanilla"]) for v in VARIANTS[1:]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo.oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "demo" / "model"), help="the demo backbone (default: bundled)")
    p.add_argument("--tokensr", default=str(ROOT / "demo" / "tokensr"), help="its trained TokenSR (default: bundled)")
    p.add_argument("--data-dir", default=str(ROOT / "demo" / "data" / "pope"), help="a shapes POPE set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="oracle reruns until its regions settle")
    p.add_argument("--images", type=int, help="only the questions about the set's first N images")
    p.add_argument("--out", help="write the result here as JSON")
    args = p.parse_args(argv)
    data = Path(args.data_dir)
    if not (data / "shapes_annotations.json").is_file():
        print(f"'{data}' has no shapes_annotations.json: give a shapes POPE set (python -m demo.shapes)",
              file=sys.stderr)
        return 2
    result = evaluate(Path(args.model), Path(args.tokensr), data, batch_size=args.batch_size, rounds=args.rounds,
                      images=args.images,
                      log=lambda m: print(m, file=sys.stderr))
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
