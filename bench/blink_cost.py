"""Blink's cost: Blink-interp forced to expand at every participating layer vs vanilla prefill, and vs the
two-pass baseline (vanilla on the image, then vanilla again on the salient region's crop).

Times are wall-clock medians; ratios are medians of the per-repetition ratios, in wall time and in process
CPU time (less disturbed by other jobs on a shared host; all three variants run on XLA).

    python -m bench.blink_cost [--size mid|tiny] [--batch 1,8] [--length 650] [--layers 3,4,5] [--reps 5]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bench import common
from blink_jax.blink import BlinkConfig
from blink_jax.blink.config import parse_layers


def run(size: common.Size, batches, length: int, layers, region_size: int, reps: int) -> str:
    _, ours = common.make_models(size, with_torch=False)
    blink = BlinkConfig(layers=tuple(layers), region_size=region_size, expansion="fixed")
    never = BlinkConfig(layers=tuple(layers), region_size=region_size, tau_exp=1.01)  # rho <= 1: never expands
    rows = ["| batch | vanilla (s) | Blink, expand every layer (s) | Blink/vanilla | two-pass (s) | two-pass/vanilla "
            "| Blink/vanilla, CPU time | two-pass/vanilla, CPU time | Blink never expanding/vanilla |",
            "|---|---|---|---|---|---|---|---|---|"]
    raw = []
    for b in batches:
        ids, px, mask = common.prompt_batch(ours, b, length)
        crop = np.roll(px, 7, axis=-1)  # stands for the zoomed crop: same shapes, other pixels

        def vanilla(pixels=px):
            return jax.block_until_ready(ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)

        def blink_fixed():
            return jax.block_until_ready(ours(input_ids=ids, pixel_values=px, attention_mask=mask, blink=blink).logits)

        def blink_never():  # the same buffered program, SR slots all masked: its cost without the extra tokens
            return jax.block_until_ready(ours(input_ids=ids, pixel_values=px, attention_mask=mask, blink=never).logits)

        def two_pass():
            vanilla(px)
            return vanilla(crop)

        cpu = {}
        t = common.interleaved({"v": vanilla, "b": blink_fixed, "n": blink_never, "2": two_pass}, reps=reps, cpu=cpu)
        raw.append(common.raw_line(f"batch {b} wall seconds per repetition", t))
        raw.append(common.raw_line(f"batch {b} CPU seconds per repetition", cpu))
        v, bl, tp = (common.median(t[k]) for k in ("v", "b", "2"))
        # Ratios are medians of the per-repetition ratios (wall, then CPU time); times are wall medians.
        rows.append(f"| {b} | {v:.3f} | {bl:.3f} | {common.paired_ratio(t['b'], t['v']):.2f} | {tp:.3f} "
                    f"| {common.paired_ratio(t['2'], t['v']):.2f} | {common.paired_ratio(cpu['b'], cpu['v']):.2f} "
                    f"| {common.paired_ratio(cpu['2'], cpu['v']):.2f} | {common.paired_ratio(t['n'], t['v']):.2f} |")
    return "\n".join(rows + [""] + raw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--layers", default="3,4,5", help="participating layers (mid has 8 layers: 3-5 mirrors 12-18 of 32)")
    p.add_argument("--region-size", type=int, default=6, help="region side r (24x24 grid -> 16 regions)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant, interleaved")
    a = p.parse_args(argv)
    size = common.SIZES[a.size]
    table = run(size, common.batch_sizes(a.batch), a.length, parse_layers(a.layers),
                a.region_size, a.reps)
    print(f"machine: {common.machine()}\nsize: {size}\n\n{table}")


if __name__ == "__main__":
    main()
