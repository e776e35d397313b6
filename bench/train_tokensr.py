"""TokenSR training throughput (examples per second) on the mid-size random LLaVA, with a warm teacher cache
against no cache (teacher targets computed from the crops at every step).

    python -m bench.train_tokensr [--size mid|tiny] [--batch-size 4] [--images 12] [--steps 4]
                                  [--layers 3,4,5] [--channels 512]

Training runs as the user runs it, `python -m train.tokensr`, and the step times are read from its
metrics.jsonl (`--log-every 1`: each line's `examples_per_s` covers one step, all of `train.loop.Trainer.run`'s
work: next grain batch, the jitted probe (student inputs and SGS regions), the teacher (cache or crops), the
donated train step, metrics to host). Data: the tiny LLaVA-1.5 mix of the tests with `--images` photos. One run
has no cache, the other fills its cache with two passes over the data first (`--p-random-region 0`, so then every
target is in it); each then trains `--steps` timed steps, the two runs one after the other. Compilation (a run's
first step) and the cache warm-up are not timed; the table reports the cache hits of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from blink_jax.blink.config import parse_layers

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def make_model_dir(out: Path, size: common.Size) -> Path:
    """A random HF LLaVA of `size` with the tests' word-level tokenizer (config, safetensors, tokenizer)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import torch
    import tiny_llava as tl
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    LlavaForConditionalGeneration(common.hf_config(size)).save_pretrained(str(out))
    tl.make_tokenizer(out)
    return out


def make_data(out: Path, images: int) -> Path:
    """The tests' LLaVA-1.5 mix with `images` photos (train.tokensr prepares its dataset on first use)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import tiny_llava_mix as tm

    tm.make_llava_mix(out, num_images=images)
    return out


def train(workdir: Path, flags: list[str], *, steps: int, teacher_cache: str) -> list[dict]:
    """`python -m train.tokensr` for `steps` steps into a new `workdir` (`teacher_cache` '': its own, 'none': none).
    -> its metrics.jsonl records, one per step."""
    cmd = [sys.executable, "-m", "train.tokensr", *flags, "--workdir", str(workdir), "--steps", str(steps),
           "--teacher-cache", teacher_cache, "--log-every", "1", "--save-every", str(10 ** 6), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if [r["step"] for r in records] != list(range(1, steps + 1)):
        raise RuntimeError(f"{workdir / 'metrics.jsonl'} logs steps {[r['step'] for r in records]}, expected 1..{steps} "
                           f"(--log-every 1 into a new --workdir)")
    return records


def run(size: common.Size, work: Path, *, batch_size: int, images: int, steps: int, layers, channels: int,
        max_prompt_len: int) -> str:
    model_dir = make_model_dir(work / "model", size)
    data_dir = make_data(work / "mix", images)
    grid = size.image_size // size.patch
    flags = ["--model", str(model_dir), "--data-dir", str(data_dir), "--mesh", "cpu",
             "--layers", ",".join(map(str, layers)), "--region-size", str(6 if grid % 6 == 0 else 3), "--scale", "2",
             "--channels", str(channels), "--batch-size", str(batch_size), "--p-random-region", "0",
             "--max-prompt-len", str(max_prompt_len), "--warmup-steps", "1"]
    # Untimed: the first step of a run, which compiles (the first run also prepares the dataset), and the cached
    # run's two passes over the data that fill its cache.
    warm = 2 * math.ceil(images / batch_size)
    timed = {"none": train(work / "none", flags, steps=1 + steps, teacher_cache="none")[1:],
             "cache": train(work / "cached", flags, steps=warm + steps, teacher_cache="")[warm:]}
    times = {name: [batch_size / r["examples_per_s"] for r in records] for name, records in timed.items()}
    hits = sum(r["teacher_cache_hits"] for r in timed["cache"])
    computed = sum(r["teacher_crops_computed"] for r in timed["cache"])
    c, n = common.median(times["cache"]), common.median(times["none"])
    rows = ["| teacher targets | step (s) | examples/s | speed-up |", "|---|---|---|---|",
            f"| computed from crops (no cache) | {n:.2f} | {batch_size / n:.2f} | 1.00 |",
            f"| warm cache ({hits} hits, {computed} computed) | {c:.2f} | {batch_size / c:.2f} | {n / c:.2f} |"]
    return (f"batch {batch_size}, layers {tuple(layers)}, TokenSR channels {channels}, prompts padded to "
            f"{max_prompt_len} tokens, {steps} timed steps each\n\n" + "\n".join(rows) + "\n\n"
            + common.raw_line("step seconds", times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(common.SIZES), default="mid")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--images", type=int, default=12, help="photos in the synthetic LLaVA mix")
    p.add_argument("--steps", type=int, default=4, help="timed steps per trainer")
    p.add_argument("--layers", default="3,4,5")
    p.add_argument("--channels", type=int, default=512, help="TokenSR bottleneck width")
    p.add_argument("--max-prompt-len", type=int, default=704)
    a = p.parse_args(argv)
    size = common.SIZES[a.size]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        table = run(size, Path(work), batch_size=a.batch_size, images=a.images, steps=a.steps,
                    layers=parse_layers(a.layers), channels=a.channels, max_prompt_len=a.max_prompt_len)
    print(f"machine: {common.machine()}\nsize: {size}\n\n{table}\n\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
