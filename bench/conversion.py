"""Conversion: time and peak resident memory of `python -m checkpoints_conversion.hf_to_orbax` on a synthetic
multi-GB sharded safetensors LLaVA checkpoint (real key names, index file, config.json).

    python -m bench.conversion [--size 7b-short|tiny] [--text-layers 2] [--vision-layers 2] [--shard-mb 1000]
                               [--reps 2] [--work DIR] [--keep] [--compare-with OLD_SOURCE_TREE]

The checkpoint is LLaVA-1.5-7B-shaped (4096 wide, 32064-token vocabulary) with fewer layers, so it is a few GB
and its largest tensors are the token embedding and the LM head (32064 x 4096 fp32, 525 MB). It is written
one tensor at a time in small blocks, so the writer itself never holds a tensor.

Peak memory is the converter process's own peak resident set (`ru_maxrss`, which counts the pages of
memory-mapped files it touched too; `bench/peak_rss.py` runs the converter and reports it), against the
baseline of a child that imports the same modules, reads the config and traces the parameter shapes, and
converts nothing. Target: peak - baseline < 1.5 x the largest tensor. Conversion and baseline runs alternate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

SHORT_7B = dataclasses.replace(common.LLAVA_7B, text_layers=2, vision_layers=2)

_ST_TAGS = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def checkpoint_tensors(size: common.Size) -> list[tuple[str, tuple[int, ...]]]:
    """(hub-layout key, torch-layout shape) of every tensor of the LLaVA of `size`, in the converter's order."""
    from blink_jax.config import LlavaConfig
    from blink_jax.weights.hf_reader import hf_shape
    from blink_jax.weights.param_mapping import build_mapping
    from blink_jax.weights.params import param_shapes

    cfg = LlavaConfig.from_hf_config(common.hf_config(size))
    shapes = param_shapes(cfg)
    return [(e.hf_key, hf_shape(e, shapes[e.path])) for e in build_mapping(cfg)]


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: np.dtype, block: np.ndarray) -> None:
    """A safetensors file written header first, then each tensor's bytes from a small repeated random block."""
    header, offset = {}, 0
    for key, shape in tensors:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[key] = {"dtype": _ST_TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data start
    raw = block.astype(dtype).tobytes()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, shape in tensors:
            left = int(np.prod(shape)) * dtype.itemsize
            while left:
                chunk = raw[:left]
                f.write(chunk)
                left -= len(chunk)


def write_checkpoint(out: Path, size: common.Size, *, shard_bytes: int, dtype=np.float32, seed: int = 0) -> dict:
    """Writes config.json, model-0000k-of-0000n.safetensors and model.safetensors.index.json.
    -> {"total_bytes", "largest_bytes", "largest_key", "shards", "tensors"}."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    common.hf_config(size).save_pretrained(str(out))
    tensors = checkpoint_tensors(size)
    shards, current, current_bytes = [], [], 0
    for key, shape in tensors:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if current and current_bytes + nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((key, shape))
        current_bytes += nbytes
    shards.append(current)
    block = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32) * 0.02
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / name, shard, dtype, block)
        weight_map.update({key: name for key, _ in shard})
    sizes = {key: int(np.prod(shape)) * dtype.itemsize for key, shape in tensors}
    total = sum(sizes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    largest = max(sizes, key=sizes.get)
    return {"total_bytes": total, "largest_bytes": sizes[largest], "largest_key": largest, "shards": len(shards),
            "tensors": len(tensors)}


PEAK_RSS = Path(__file__).resolve().with_name("peak_rss.py")


def _peak_child(args: list[str], tree: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of `peak_rss.py ARGS` importing the converter from the source `tree`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(PEAK_RSS), *args], env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"peak_rss {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("peak_rss_bytes=")][-1]
    return wall, int(line.split("=")[1])


def run(size: common.Size, work: Path, *, shard_bytes: int, reps: int, trees: dict[str, Path],
        keep: bool = False) -> str:
    """Converts the checkpoint `reps` times with each source tree's converter (interleaved, a baseline run
    before each conversion)."""
    hf_dir, out_dir = work / "hf", work / "converted"
    t0 = time.perf_counter()
    info = write_checkpoint(hf_dir, size, shard_bytes=shard_bytes)
    written = time.perf_counter() - t0
    convert = ["convert", "--hf-dir", str(hf_dir), "--out", str(out_dir), "--overwrite", "--no-progress"]
    baseline = ["baseline", str(hf_dir)]
    runs = {name: {"time": [], "peak": [], "base": []} for name in trees}
    for _ in range(reps):
        for name, tree in trees.items():
            runs[name]["base"].append(_peak_child(baseline, tree)[1])
            wall, peak = _peak_child(convert, tree)
            runs[name]["time"].append(wall)
            runs[name]["peak"].append(peak)
    mb = lambda x: x / 2 ** 20
    rows = [f"checkpoint: {info['total_bytes'] / 2 ** 30:.2f} GiB in {info['shards']} shards, {info['tensors']} tensors, "
            f"largest '{info['largest_key']}' {mb(info['largest_bytes']):.0f} MiB (written in {written:.0f} s)",
            "",
            "| converter | conversion (s) | throughput (MiB/s) | baseline RSS (MiB) | peak RSS (MiB) "
            "| peak - baseline (MiB) | (peak - baseline) / largest tensor | target |",
            "|---|---|---|---|---|---|---|---|"]
    raw = []
    for name, r in runs.items():
        base, peak, wall = common.median(r["base"]), common.median(r["peak"]), common.median(r["time"])
        over = peak - base
        rows.append(f"| {name} | {wall:.1f} | {mb(info['total_bytes']) / wall:.0f} | {mb(base):.0f} | {mb(peak):.0f} "
                    f"| {mb(over):.0f} | {over / info['largest_bytes']:.2f} | < 1.5 |")
        raw.append(f"{name} per run: conversion s {[round(t, 1) for t in r['time']]}, peak MiB "
                   f"{[round(mb(p)) for p in r['peak']]}, baseline MiB {[round(mb(b)) for b in r['base']]}")
    if len(runs) == 2:
        (a, ra), (b, rb) = runs.items()
        rows.append(f"| {b} / {a} | {common.median(rb['time']) / common.median(ra['time']):.2f} | | | "
                    f"{common.median(rb['peak']) / common.median(ra['peak']):.2f} | | | |")
    if not keep:
        shutil.rmtree(hf_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return "\n".join(rows + [""] + raw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["7b-short", "tiny"], default="7b-short",
                   help="7b-short: LLaVA-1.5-7B shapes with --text-layers/--vision-layers layers; tiny: smoke test")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--shard-mb", type=int, default=1000, help="shard size limit in MB (as save_pretrained's max_shard_size)")
    p.add_argument("--reps", type=int, default=2, help="conversions (and baseline runs)")
    p.add_argument("--work", default=None, help="directory for the checkpoint and its conversion (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--compare-with", default=None,
                   help="another source tree of this project (e.g. `git archive HEAD | tar -x -C /tmp/old`): its "
                        "converter runs too, interleaved, as 'before'")
    a = p.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    trees = {"this tree": here} if a.compare_with is None else {"before": Path(a.compare_with).resolve(),
                                                                 "after": here}
    size = common.TINY if a.size == "tiny" else dataclasses.replace(
        SHORT_7B, text_layers=a.text_layers, vision_layers=a.vision_layers)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_conversion_"))
    try:
        table = run(size, work, shard_bytes=a.shard_mb * 10 ** 6, reps=a.reps, trees=trees, keep=a.keep)
    finally:
        if not a.work and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {common.machine()}\nsize: {size}\n\n{table}")


if __name__ == "__main__":
    main()
