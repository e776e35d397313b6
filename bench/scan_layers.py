"""Decoder layers unrolled (as shipped) vs `jax.lax.scan` over stacked layer parameters: compile and run time.

    python -m bench.scan_layers [--size mid|tiny] [--batch 1] [--length 650] [--reps 5]
    python -m bench.scan_layers --compile-only --size 7b [--dtype bfloat16]     # compile times alone

Both variants are the vanilla prefill with logits at every position, same weights, jitted separately. Compile
time is measured once per variant (lower + compile, a fresh program each); run time interleaved, medians.
With `--compile-only` the parameters are abstract (shapes, no memory), so a 7B-shaped program compiles on any
host, for the compile-time half of the comparison. The scanned variant is a benchmark-only rewrite (the shipped forward unrolls, so Blink can treat each
participating layer differently); the two must give the same logits, which the script checks.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from blink_jax.model import forward


def scanned_prefill(graphdef, params, input_ids, pixel_values, attention_mask):
    """`forward.prefill`'s logits with the decoder layers run by `jax.lax.scan` over stacked parameters."""
    model = nnx.merge(graphdef, params)
    layers = list(model.language_model.layers)
    layer_def = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers])
    h = model.embed_multimodal(input_ids, pixel_values)
    valid = attention_mask > 0
    positions = forward.position_ids(attention_mask)
    b, t = input_ids.shape
    mask = forward.causal_mask(jnp.broadcast_to(jnp.arange(t), (b, t)), valid)

    def body(h, state):
        return nnx.merge(layer_def, state)(h, positions, mask, causal=True)[0], None

    h, _ = jax.lax.scan(body, h, stacked)
    return model.language_model.logits(h)


def unrolled_prefill(graphdef, params, input_ids, pixel_values, attention_mask):
    return forward.prefill(nnx.merge(graphdef, params), input_ids, pixel_values, attention_mask)[0]


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
    for name, fn in (("unrolled", unrolled_prefill), ("scan", scanned_prefill)):
        start = time.perf_counter()
        jax.jit(fn, static_argnums=0).lower(gd, params, ids, px, ids).compile()
        seconds[name] = time.perf_counter() - start
        rows.append(f"| {batch} | {name} | {seconds[name]:.2f} | {seconds[name] / seconds['unrolled']:.2f} |")
    return "\n".join(rows)


def run(size: common.Size, batch: int, length: int, reps: int) -> str:
    _, ours = common.make_models(size, with_torch=False)
    ids, px, mask = (jnp.asarray(x) for x in common.prompt_batch(ours, batch, length))
    gd, params = ours.graphdef, ours.params
    compiled, compile_s = {}, {}
    for name, fn in (("unrolled", unrolled_prefill), ("scan", scanned_prefill)):
        start = time.perf_counter()
        compiled[name] = jax.jit(fn, static_argnums=0).lower(gd, params, ids, px, mask).compile()
        compile_s[name] = time.perf_counter() - start
    outs = {name: np.asarray(c(params, ids, px, mask)) for name, c in compiled.items()}
    gap = float(np.abs(outs["scan"] - outs["unrolled"]).max())
    scale = float(np.abs(outs["unrolled"]).max())
    if not gap <= 1e-4 * max(scale, 1.0):
        raise AssertionError(f"scan and unrolled prefills disagree: max |diff| {gap} (logits up to {scale})")
    cpu = {}
    t = common.interleaved({n: (lambda c=c: jax.block_until_ready(c(params, ids, px, mask)))
                            for n, c in compiled.items()}, reps=reps, cpu=cpu)
    rows = ["| batch | variant | compile (s) | prefill (s) | prefill / unrolled | prefill / unrolled, CPU time |",
            "|---|---|---|---|---|---|"]
    for name in compiled:
        rows.append(f"| {batch} | {name} | {compile_s[name]:.2f} | {common.median(t[name]):.3f} "
                    f"| {common.paired_ratio(t[name], t['unrolled']):.2f} "
                    f"| {common.paired_ratio(cpu[name], cpu['unrolled']):.2f} |")
    return "\n".join(rows + ["", f"max |logit difference| {gap:.2e}",
                             common.raw_line("wall seconds per repetition", t),
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
