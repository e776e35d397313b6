"""TokenSR training throughput (examples per second) on the mid-size random LLaVA, with a warm teacher cache
against no cache (teacher targets computed from the crops at every step), the two trainers interleaved.

    python -m bench.train_tokensr [--size mid|tiny] [--batch-size 4] [--images 12] [--steps 4]
                                  [--layers 3,4,5] [--channels 512]

A step is what `train.loop.Trainer.run` does per step: next grain batch, the jitted probe (student inputs
and SGS regions), the teacher (cache or crops), the donated train step, metrics to host. Data: the tiny
LLaVA-1.5 mix of the tests with `--images` photos. `p_random_region=0`, so after the warm-up pass every
teacher target of the cached trainer is in its cache (the table reports the hits). Compilation and the
cache warm-up are not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import jax

from bench import common
from blink_jax.blink.config import parse_layers

TESTS = Path(__file__).resolve().parents[1] / "tests"


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
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import tiny_llava_mix as tm
    from train.data import llava_mix

    tm.make_llava_mix(out, num_images=images)
    llava_mix.prepare(out, out / "tfds")
    return out


class _Stepper:
    """One trainer and its state; `step()` runs one training step as `Trainer.run` does and waits for it."""

    def __init__(self, cfg):
        from train.loop import Trainer

        self.trainer = Trainer(cfg, progress=False)
        self.state = self.trainer.init_or_restore()
        self.count = 0

    def step(self):
        t = self.trainer
        batch = next(t.iterator)
        hs_lr, target, info = t.inputs(batch, self.count)
        self.state, metrics = t.train_step(self.state, hs_lr, target)
        jax.device_get({**metrics, **info})
        self.count += 1


def run(size: common.Size, work: Path, *, batch_size: int, images: int, steps: int, layers, channels: int,
        max_prompt_len: int) -> str:
    from train.config import TrainConfig

    model_dir = make_model_dir(work / "model", size)
    data_dir = make_data(work / "mix", images)
    grid = size.image_size // size.patch
    base = TrainConfig(model=str(model_dir), data_dir=str(data_dir), workdir=str(work / "cached"), mesh="cpu",
                       layers=tuple(layers), region_size=6 if grid % 6 == 0 else 3, scale=2, channels=channels,
                       batch_size=batch_size, steps=10 ** 6, save_every=10 ** 6, log_every=10 ** 6,
                       p_random_region=0.0, max_prompt_len=max_prompt_len, warmup_steps=1)
    cached = _Stepper(base)
    uncached = _Stepper(dataclasses.replace(base, workdir=str(work / "uncached"), teacher_cache="none"))
    # Warm-up, not timed: compile both, and pass over the data twice so every target is in the cache.
    for _ in range(2 * math.ceil(images / batch_size)):
        cached.step()
    uncached.step()
    stats0 = dict(cached.trainer.teacher.stats)
    times = common.interleaved({"cache": cached.step, "none": uncached.step}, reps=steps, warmup=0)
    hits = cached.trainer.teacher.stats["hits"] - stats0["hits"]
    computed = cached.trainer.teacher.stats["computed"] - stats0["computed"]
    c, n = common.median(times["cache"]), common.median(times["none"])
    rows = ["| teacher targets | step (s) | examples/s | speed-up |", "|---|---|---|---|",
            f"| computed from crops (no cache) | {n:.2f} | {batch_size / n:.2f} | 1.00 |",
            f"| warm cache ({hits} hits, {computed} computed) | {c:.2f} | {batch_size / c:.2f} | {n / c:.2f} |"]
    return (f"batch {batch_size}, layers {tuple(layers)}, TokenSR channels {channels}, prompts padded to "
            f"{max_prompt_len} tokens, {steps} timed steps each\n\n" + "\n".join(rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(common.SIZES), default="mid")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--images", type=int, default=12, help="photos in the synthetic LLaVA mix")
    p.add_argument("--steps", type=int, default=4, help="timed steps per trainer, interleaved")
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
