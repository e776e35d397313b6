"""Calibrate Blink's thresholds: the distribution of rho per participating layer on a data set.

    python -m eval.calibrate --model DIR --data questions.jsonl [--image-folder DIR] --layers 12-18 [--out stats.json]
    python -m eval.calibrate --model DIR --data images/ --question "What is in the image?"

rho (BLINK.md §2) is measured on vanilla LLaVA (`probe_layers`, no expansion): the share of the last
prompt token's head-mean visual attention that falls on its most-attended region. `tau_exp` and
`tau_drop` are thresholds on that number, so their sensible values depend on the model, the region
size and the data; this command shows where they sit.

Batches are sorted by prompt length and padded to a length bucket and a fixed batch size, so the
probe compiles once per bucket, not once per example.
Letters: B batch, T prompt length, G grid side, Lp participating layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from blink_jax import CheckpointError, ConfigError, load_pretrained, rundir, sharding
from blink_jax.blink import BlinkConfig
from blink_jax.blink.config import in_flag_terms, layers_argument
from blink_jax.blink.probe import probe_layers
from blink_jax.model_inputs import prompt_kwargs
from blink_jax.loading import inference_mesh
from blink_jax.processing import (SHORT_ANSWER_SUFFIX, ImageError, Processor, ProcessorError, build_prompt,
                                  left_pad, load_image)
from eval.harness.flags import positive_int

DEFAULT_QUESTION = "What is in the image?"
PERCENTILES = (10, 25, 50, 75, 90)
STAT_NAMES = ("count", "mean", "std", "min", "p10", "p25", "p50", "p75", "p90", "max")
# The suggested thresholds: percentiles of rho pooled over all participating layers.
TAU_EXP_PERCENTILE = 75
TAU_DROP_PERCENTILE = 25


class DataError(ValueError):
    """A data file or folder that cannot be read, naming the file (and line) and the fix."""


@dataclasses.dataclass(frozen=True)
class Example:
    image: Path
    question: str


# ---------------------------------------------------------------------------------------------- data


def image_files(folder: Path) -> list[Path]:
    """The files in `folder` whose extension PIL knows, sorted by name."""
    known = set(Image.registered_extensions())
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in known)


def read_examples(data: str | os.PathLike, *, question: str = DEFAULT_QUESTION,
                  image_folder: str | os.PathLike | None = None) -> list[Example]:
    """Questions and images from a JSONL question file or a folder of images.

    JSONL: one object per line with `image` (a path relative to `image_folder`, by default the file's own
    folder) and `question` or `text` (the LLaVA-eval / POPE question format). Folder: every image file in
    it, each with `question`. Images are not opened here: a bad one is reported when its batch runs.
    """
    data = Path(data)
    if data.is_dir():
        files = image_files(data)
        if not files:
            raise DataError(f"folder '{data}' holds no image files (extensions PIL reads, e.g. .jpg, .png)")
        return [Example(path, question) for path in files]
    if not data.is_file():
        raise DataError(f"--data '{data}' does not exist: give a JSONL question file or a folder of images")
    base = Path(image_folder) if image_folder is not None else data.parent
    examples = []
    with data.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{data}:{number} is not valid JSON ({e}): one JSON object per line") from None
            text = row.get("question", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(text, str):
                raise DataError(f"{data}:{number} needs an \"image\" path and a \"question\" (or \"text\") string, "
                                f"got {line.strip()[:120]}")
            examples.append(Example(base / row["image"], text))
    if not examples:
        raise DataError(f"question file '{data}' has no examples")
    return examples


# -------------------------------------------------------------------------------------------- probe


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "layers", "region_size"))
def _scan(graphdef, params, input_ids, pixel_values, attention_mask, extra, *, grid, layers, region_size):
    probe = probe_layers(nnx.merge(graphdef, params), input_ids, pixel_values, attention_mask, layers=layers,
                         region_size=region_size, **prompt_kwargs(extra, grid))
    # Leaving out `probe.visual` lets XLA drop the [Lp, B, Gh, Gw, D] hidden-state gathers.
    return probe.rho, probe.region, probe.attention


def scan(model, input_ids, pixel_values, attention_mask, *, layers: Sequence[int], region_size: int,
         image_grid_thw=None):
    """The vanilla model's saliency-guided scan at `layers`, on the host: LLaVA (`Llava`), or Qwen2.5-VL (`Qwen`,
    with the processor's `image_grid_thw`, every image of one grid shape).
    -> (rho [Lp, B] float32, region r* [Lp, B] int32, S_v [Lp, B, Gh, Gw] float32).
    """
    layers, region_size = tuple(int(l) for l in layers), int(region_size)
    if image_grid_thw is None:
        BlinkConfig(layers=layers, region_size=region_size).validate_for(
            model.config.text.num_hidden_layers, model.config.vision.grid)
        ids, px, mask = model.check_inputs(input_ids, pixel_values, attention_mask)
        extra, grid = {}, None
    else:
        inputs, grid = model.inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        if grid is None:
            raise ValueError("the batch's images have different grids: give images of one grid shape")
        BlinkConfig(layers=layers, region_size=region_size).validate_for(model.config.text.num_hidden_layers, grid)
        ids, px, mask = inputs.input_ids, inputs.pixel_values, inputs.attention_mask
        extra = {"layout": inputs.layout, "positions": inputs.positions}
    out = _scan(model.graphdef, model.params, ids, px, mask, extra, grid=grid, layers=layers, region_size=region_size)
    return tuple(np.asarray(x) for x in out)


def is_qwen(processor) -> bool:
    from blink_jax.model.qwen2_5_vl.processing import QwenProcessor
    return isinstance(processor, QwenProcessor)


def user_text(question: str) -> str:
    """The user turn of a Qwen2.5-VL prompt: the question and LLaVA-1.5's short-answer suffix, as the evals ask."""
    return f"{question}\n{SHORT_ANSWER_SUFFIX}"


def bucketed(sequences: Sequence[Sequence[int]], pad_id: int, bucket: int, rows: int):
    """Left-padded (input_ids, attention_mask) [rows, T] with T rounded up to a multiple of `bucket`;
    rows past len(sequences) repeat the first sequence (their results are discarded)."""
    sequences = list(sequences) + [sequences[0]] * (rows - len(sequences))
    ids, mask = left_pad(sequences, pad_id)
    extra = -ids.shape[1] % bucket
    return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id),
            np.pad(mask, ((0, 0), (extra, 0)), constant_values=0))


@dataclasses.dataclass
class Calibration:
    layers: tuple[int, ...]
    region_size: int
    examples: list[Example]  # the examples that ran, in input order
    rho: np.ndarray  # [N, Lp]
    region: np.ndarray  # [N, Lp] r*
    skipped: list[tuple[str, str]]  # (image path, error)

    def rhos(self) -> dict[int, list[float]]:
        """layer -> rho of every example, the input of `rho_statistics`."""
        return {layer: self.rho[:, j].tolist() for j, layer in enumerate(self.layers)}


def _warn(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def calibrate(model, processor, examples: Sequence[Example], *, layers: Sequence[int], region_size: int,
              batch_size: int = 8, bucket: int = 32, progress: bool = True,
              report: Callable[[str], None] = _warn) -> Calibration:
    """rho and r* of every example at `layers` (vanilla forward). Images that cannot be read are reported
    through `report` and skipped. `processor`: LLaVA's `Processor`, or a `QwenProcessor` with grid buckets (then
    batches hold one grid shape; an image's grid comes from its header)."""
    layers = tuple(int(l) for l in layers)
    qwen = is_qwen(processor)
    if not qwen:
        BlinkConfig(layers=layers, region_size=region_size).validate_for(
            model.config.text.num_hidden_layers, model.config.vision.grid)
    if batch_size < 1 or bucket < 1:
        raise ValueError(f"batch_size={batch_size} and bucket={bucket} must be positive")
    skipped, grids, tokens = [], {}, {}
    for i, ex in enumerate(examples):
        if not qwen:
            grids[i], tokens[i] = None, processor.tokenize(build_prompt(ex.question))
            continue
        try:
            with Image.open(ex.image) as img:  # the header only
                grids[i] = processor.grid_of(img)
        except (OSError, ValueError) as e:
            skipped.append((str(ex.image), f"image '{ex.image}' cannot be read: {e}"))
            report(f"skipped: {skipped[-1][1]}")
            continue
        m = processor.image_config.merge_size
        tokens[i] = processor.tokenize(processor.prompt(user_text(ex.question)),
                                       (1, grids[i][0] * m, grids[i][1] * m))
    first_seen = {}
    for i in grids:
        first_seen.setdefault(grids[i], len(first_seen))
    order = sorted(grids, key=lambda i: (first_seen[grids[i]], len(tokens[i])))
    rows = min(batch_size, len(examples))
    chunks = [order[start:start + rows] for start in range(0, len(order), rows)] if not qwen else [
        group[start:start + rows] for key in first_seen for group in [[i for i in order if grids[i] == key]]
        for start in range(0, len(group), rows)]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with tqdm(total=len(examples), unit="img", desc="probing", file=sys.stderr, disable=not progress) as bar:
        bar.update(len(examples) - len(order))
        for todo in chunks:
            chunk, pixels = [], []
            for i in todo:
                try:
                    pixels.append(_pixels(processor, examples[i].image))
                    chunk.append(i)
                except ImageError as e:
                    skipped.append((str(examples[i].image), str(e)))
                    report(f"skipped: {e}")
            if chunk:
                ids, mask = bucketed([tokens[i] for i in chunk], processor.pad_id, bucket, rows)
                px = np.stack(pixels + [pixels[0]] * (rows - len(chunk)))
                thw = None
                if qwen:
                    m = processor.image_config.merge_size
                    gh, gw = grids[chunk[0]]
                    px, thw = px.reshape(-1, px.shape[-1]), np.tile([[1, gh * m, gw * m]], (rows, 1))
                rho, region, _ = scan(model, ids, px, mask, layers=layers, region_size=region_size,
                                      image_grid_thw=thw)
                for row, i in enumerate(chunk):
                    results[i] = rho[:, row], region[:, row]
            bar.update(len(todo))
    kept = sorted(results)
    empty = np.zeros((0, len(layers)))
    return Calibration(
        layers=layers, region_size=region_size, examples=[examples[i] for i in kept], skipped=skipped,
        rho=np.stack([results[i][0] for i in kept]) if kept else empty,
        region=np.stack([results[i][1] for i in kept]).astype(np.int32) if kept else empty.astype(np.int32))


def _pixels(processor, path) -> np.ndarray:
    """One image file -> LLaVA's pixel values [3, S, S], or Qwen2.5-VL's patches [P, patch_dim] of its grid bucket."""
    if not is_qwen(processor):
        return processor.pixel_values([path])[0]
    from blink_jax.model.qwen2_5_vl.processing import preprocess_image
    return preprocess_image(load_image(path), processor.image_config)[0]


# -------------------------------------------------------------------------------------------- stats


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, std (population), min, p10, p25, p50, p75, p90 (numpy's linear percentiles), max."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        return {name: (0 if name == "count" else None) for name in STAT_NAMES}
    p = np.percentile(v, PERCENTILES)
    return {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            **{f"p{q}": float(x) for q, x in zip(PERCENTILES, p)}, "max": float(v.max())}


def rho_statistics(rhos: Mapping[int, Sequence[float]]) -> dict:
    """layer -> rho values  ->  {"layers": {layer: describe(...)}, "all": describe(pooled),
    "suggested": {"tau_exp": pooled p75, "tau_drop": pooled p25}}."""
    pooled = [float(x) for values in rhos.values() for x in values]
    if not pooled:
        raise ValueError("no rho values to describe: every image was skipped or the data set is empty")
    everything = describe(pooled)
    return {
        "layers": {int(layer): describe(values) for layer, values in sorted(rhos.items())},
        "all": everything,
        "suggested": {"tau_exp": everything[f"p{TAU_EXP_PERCENTILE}"],
                      "tau_drop": everything[f"p{TAU_DROP_PERCENTILE}"]},
    }


def format_statistics(stats: dict, num_regions: int) -> str:
    """The per-layer table and the suggested thresholds with what they mean."""
    head = f"{'layer':>5} " + " ".join(f"{name:>7}" for name in STAT_NAMES)

    def row(label, s):
        cells = [f"{s['count']:>7d}"] + [f"{'-':>7}" if s[n] is None else f"{s[n]:>7.4f}" for n in STAT_NAMES[1:]]
        return f"{label:>5} " + " ".join(cells)

    lines = [f"rho per participating layer (R = {num_regions} regions; rho runs from 1/R = {1 / num_regions:.4f}, "
             f"attention spread evenly, to 1, all of it on one region):", head]
    lines += [row(str(layer), s) for layer, s in stats["layers"].items()]
    lines.append(row("all", stats["all"]))
    tau_exp, tau_drop = stats["suggested"]["tau_exp"], stats["suggested"]["tau_drop"]
    lines += [
        "",
        "suggested thresholds (pass to eval.predict / the benchmarks):",
        f"  --tau-exp {tau_exp:.4f}   p{TAU_EXP_PERCENTILE} of rho over all layers: a layer whose rho is above it "
        f"expands its most-attended region (rho is above it in {100 - TAU_EXP_PERCENTILE}% of layer decisions here).",
        f"  --tau-drop {tau_drop:.4f}  p{TAU_DROP_PERCENTILE}: an expanded example whose rho falls below it drops "
        f"its SR tokens (rho is below it in {TAU_DROP_PERCENTILE}% of layer decisions here); in between, the state "
        f"is kept.",
        "  rho was measured without expansion; SR tokens shift later layers' attention, so check the trace of a "
        "few examples with `python -m eval.predict`.",
    ]
    return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def report_payload(result: Calibration, stats: dict, *, model: str, data: str) -> dict:
    """What `--out` writes: settings, statistics, skipped images and every example's rho and r*."""
    return {
        "model": model, "data": data, "layers": list(result.layers), "region_size": result.region_size,
        "examples_used": len(result.examples),
        "skipped": [{"image": image, "error": error} for image, error in result.skipped],
        "statistics": stats,
        "examples": [{"image": str(ex.image), "question": ex.question,
                      "rho": {str(l): float(result.rho[i, j]) for j, l in enumerate(result.layers)},
                      "region": {str(l): int(result.region[i, j]) for j, l in enumerate(result.layers)}}
                     for i, ex in enumerate(result.examples)],
    }


# ---------------------------------------------------------------------------------------------- CLI




def load_model_and_processor(model_dir, *, dtype: str, mesh: str | None, region_size: int,
                             max_pixels: int | None = None, pad_to_square: bool = True,
                             batch_size: int | None = None, load: Callable | None = None):
    """(runnable model, its processor) of `model_dir`: LLaVA on the `--mesh` (checked before any weight is read), or
    Qwen2.5-VL on one device with grid buckets whose sides are multiples of `region_size` (BLINK.md §10).
    `batch_size`: checked against the mesh's batch axes (None: not batched, e.g. eval.predict's one question);
    `load`: the loader (default `blink_jax.load_pretrained`)."""
    from blink_jax.families import model_type
    from blink_jax.model_inputs import QwenInputs

    load = load or load_pretrained

    if model_type(model_dir) == "qwen2_5_vl":
        if mesh is not None:
            raise ConfigError("--mesh: Qwen2.5-VL runs on one device for now; leave --mesh out")
        family = QwenInputs(model_dir, region_size=region_size, max_pixels=max_pixels or 0)
        return load(model_dir, dtype=getattr(jnp, dtype)), family.processor
    if max_pixels is not None:
        raise ConfigError("--max-pixels is for Qwen2.5-VL models; LLaVA-1.5 has one image size: leave it out")
    mesh = inference_mesh(model_dir, mesh, getattr(jnp, dtype))  # before any weight is read
    if batch_size is not None:
        sharding.check_eval_batch(batch_size, mesh)
    llava = load(model_dir, dtype=getattr(jnp, dtype), mesh=mesh if mesh.devices.size > 1 else None)
    return llava, Processor.from_pretrained(model_dir, config=llava.config, pad_to_square=pad_to_square)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = BlinkConfig()
    parser = argparse.ArgumentParser(
        prog="python -m eval.calibrate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Hugging Face LLaVA directory, a converted blink-jax one, or a Hub id; or a Hugging Face "
                             "Qwen2.5-VL directory (one device)")
    parser.add_argument("--data", required=True,
                        help="JSONL question file (lines with \"image\" and \"question\"/\"text\", the LLaVA-eval/"
                             "POPE format) or a folder of images asked --question")
    parser.add_argument("--image-folder", default=None,
                        help="folder the JSONL's image paths are relative to (default: the JSONL's own folder)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="question asked of every image of a folder")
    parser.add_argument("--layers", type=layers_argument, default=defaults.layers,
                        help="participating layers, e.g. 12-18 or 12,14,16 (the default suits a 32-layer model)")
    parser.add_argument("--region-size", type=positive_int, default=defaults.region_size,
                        help="r: regions are r x r visual tokens; must divide the grid side (24 for LLaVA-1.5)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N examples")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass")
    parser.add_argument("--bucket", type=positive_int, default=32,
                        help="pad prompt lengths up to a multiple of this many tokens (fewer compilations)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    parser.add_argument("--no-pad-to-square", action="store_true",
                        help="centre-crop like llava-hf's processor instead of the original LLaVA pad-to-square")
    parser.add_argument("--out", default=None, help="also write statistics and per-example rho to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--mesh", default=None, help=f"{sharding.MESH_HELP}; default: every device on the data axis "
                                                     f"when the model fits one device")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="Qwen2.5-VL: pixel budget of the grid buckets images are resized to (default: the "
                             "model's preprocessor_config.json)")
    args = parser.parse_args(argv)

    try:
        examples = read_examples(args.data, question=args.question, image_folder=args.image_folder)
        if args.limit is not None:
            examples = examples[:args.limit]
        BlinkConfig(layers=args.layers, region_size=args.region_size)
        if args.out:  # before the model loads: a read-only or full disk is named now, not after the probe
            rundir.check_writable(Path(args.out).absolute().parent, flag="--out", min_free=1 << 20)
        model, processor = load_model_and_processor(args.model, dtype=args.dtype, mesh=args.mesh,
                                                     region_size=args.region_size, max_pixels=args.max_pixels,
                                                     pad_to_square=not args.no_pad_to_square,
                                                     batch_size=args.batch_size)
        result = calibrate(model, processor, examples, layers=args.layers, region_size=args.region_size,
                           batch_size=args.batch_size, bucket=args.bucket, progress=not args.no_progress)
    except (DataError, ConfigError, CheckpointError, ProcessorError, sharding.MeshError, FileNotFoundError,
            rundir.NotWritable) as e:
        raise SystemExit(f"error: {in_flag_terms(str(e))}") from None
    missing = sum("does not exist" in error for _, error in result.skipped)
    hint = ""
    if missing and args.image_folder is None and Path(args.data).is_file():
        hint = (f"; {missing} image(s) were not found: paths in {args.data} are read relative to its folder, "
                f"pass --image-folder DIR if the images live elsewhere")
    if not result.examples:
        raise SystemExit(f"error: none of the {len(examples)} images could be read (see the messages above){hint}")
    if hint:
        print(hint[2:], file=sys.stderr)
    stats = rho_statistics(result.rhos())
    print(f"{len(result.examples)} examples probed, {len(result.skipped)} skipped")
    blink = BlinkConfig(layers=args.layers, region_size=args.region_size)
    if is_qwen(processor):  # R differs per grid shape: the table names the largest
        regions = max(blink.num_regions(g) for g in processor.image_config.grid_shapes)
    else:
        regions = blink.num_regions(model.config.vision.grid)
    print(format_statistics(stats, regions))
    if args.out:
        write_json_atomic(args.out, report_payload(result, stats, model=str(args.model), data=str(args.data)))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
