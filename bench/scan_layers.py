"""Decoder layers unrolled (the default) vs `jax.lax.scan` over stacked layer parameters (`Llava(scan_layers=True)`):
compile and run time of the vanilla prefill and of Blink's (Blink-interp expanding at every participating layer,
whose layers stay unrolled while the others are scanned).

    python -m bench.scan_layers [--size mid|tiny] [--batch 1] [--length 650] [--reps 5]
    python -m bench.scan_layers --compile-only --size 7b [--dtype bfloat16]     # compile times alone

Each variant is the library's jitted prefill entry point (`blink_jax.runtime._prefill`) with logits at every
position, same weights. Compile time is measured once per variant (lower + compile, a fresh program each); run
time interleaved, medians. With `--compile-only` the parameters are abstract (shapes, no memory), so a 7B-shaped
program compiles on any host, for the compile-time half of the comparison. Scanned and unrolled must give the
same logits, which the script checks.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from blink_jax import runtime


# Blink-interp expanding at every participating layer (LLaVA-1.5-7B's 12-18 of 32; scaled to the model's depth).
def blink_layers(num_layers: int) -> tuple[int, ...]:
    first = (num_layers * 12) // 32
    return tuple(range(first, first + max(1, (num_layers * 7) // 32)))


def variants(num_layers: int, grid: int, dim: int):
    """name -> (jitted entry point, its Blink arguments, scan): vanilla and Blink, unrolled and scanned."""
    from blink_jax.blink import BlinkConfig
    from blink_jax.blink import runner

    blink = BlinkConfig(layers=blink_layers(num_layers), region_size=_region(grid), expansion="fixed")
    args = {"vanilla": runner.BlinkArgs(None, None, None, None, None),
            "Blink": runner.prepare(blink, None, None, num_layers=num_layers, grid=grid, dim=dim)}
    return {f"{mode} {'scan' if scan else 'unrolled'}": (args[mode], scan) for mode in args for scan in (False, True)}


def _region(grid: int) -> int:
    return next(r for r in (6, 3, 2, 1) if grid % r == 0)


def lower(graphdef, params, ids, px, mask, blink_args, scan: bool):
    b = blink_args
    return runtime._prefill.lower(graphdef, params, b.bank_def, b.bank_state, ids, px, mask, b.thresholds, b.key,
                                  static=b.static, scan=scan)


def compile_times(size: common.Size, batch: int, length: int, dtype) -> str:
    """Lower + compile both variants on abstract parameters of `size` (nothing is allocated or run)."""
    from blink_jax.config import LlavaConfig
    from blink_jax.weights.params import abstract_model

    cfg = LlavaConfig.from_hf_config(common.hf_config(size))
    gd, params = nnx.split(abstract_model(cfg, dtype))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    px = jax.ShapeDtypeStruct((batch, 3, size.image_size, size.image_size), jnp.float32)
    rows = ["| batch | variant | compile (s) | compile / unrolled |", "|---|---|---|---|"]
    seconds = {}
    for name, (args, scan) in variants(cfg.text.num_hidden_layers, cfg.vision.grid, cfg.text.hidden_size).items():
        start = time.perf_counter()
        lower(gd, params, ids, px, ids, args, scan).compile()
        seconds[name] = time.perf_counter() - start
        base = seconds[name.replace("scan", "unrolled")]
        rows.append(f"| {batch} | {name} | {seconds[name]:.2f} | {seconds[name] / base:.2f} |")
    return "\n".join(rows)


def run(size: common.Size, batch: int, length: int, reps: int) -> str:
    _, ours = common.make_models(size, with_torch=False)
    ids, px, mask = (jnp.asarray(x) for x in common.prompt_batch(ours, batch, length))
    gd, params = ours.graphdef, ours.params
    cfg = ours.config
    compiled, compile_s = {}, {}
    for name, (args, scan) in variants(cfg.text.num_hidden_layers, cfg.vision.grid, cfg.text.hidden_size).items():
        start = time.perf_counter()
        compiled[name] = (lower(gd, params, ids, px, mask, args, scan).compile(), args)
        compile_s[name] = time.perf_counter() - start
    call = lambda name: compiled[name][0](params, compiled[name][1].bank_state, ids, px, mask,
                                          compiled[name][1].thresholds, compiled[name][1].key)
    outs = {name: np.asarray(call(name)[0]) for name in compiled}
    gaps = []
    for name in compiled:
        if "scan" in name:
            base = name.replace("scan", "unrolled")
            gap = float(np.abs(outs[name] - outs[base]).max())
            scale = float(np.abs(outs[base]).max())
            if not gap <= 1e-4 * max(scale, 1.0):
                raise AssertionError(f"{name} and {base} disagree: max |logit diff| {gap} (logits up to {scale})")
            gaps.append(f"{name} vs unrolled: max |logit difference| {gap:.2e}")
    cpu = {}
    t = common.interleaved({n: (lambda n=n: jax.block_until_ready(call(n))) for n in compiled}, reps=reps, cpu=cpu)
    rows = ["| batch | variant | compile (s) | prefill (s) | prefill / unrolled | prefill / unrolled, CPU time |",
            "|---|---|---|---|---|---|"]
    for name in compiled:
        base = name.replace("scan", "unrolled")
        rows.append(f"| {batch} | {name} | {compile_s[name]:.2f} | {common.median(t[name]):.3f} "
                    f"| {common.paired_ratio(t[name], t[base]):.2f} "
                    f"| {common.paired_ratio(cpu[name], cpu[base]):.2f} |")
    return "\n".join(rows + [""] + gaps + [common.raw_line("wall seconds per repetition", t),
                                            common.raw_line("CPU seconds per repetition", cpu)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p, batch="1", sizes=common.ALL_SIZES)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant, interleaved")
    p.add_argument("--compile-only", action="store_true",
                   help="compile times on abstract parameters (allows --size 7b on any host)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameters (--compile-only)")
    a = p.parse_args(argv)
    if a.size not in common.SIZES and not a.compile_only:
        p.error(f"--size {a.size} is for --compile-only (its weights would not fit a CPU host)")
    size = common.ALL_SIZES[a.size]
    if a.compile_only:
        tables = [compile_times(size, b, a.length, getattr(jnp, a.dtype)) for b in common.batch_sizes(a.batch)]
    else:
        tables = [run(size, b, a.length, a.reps) for b in common.batch_sizes(a.batch)]
    print(f"machine: {common.machine()}\nsize: {size}\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
