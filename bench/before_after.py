"""Before/after the CPU optimisations, in one process: the model code as it was (one-shot einsum attention,
generation computing the LM head at every prompt position) against the code as it is (blocked attention
with causal key skipping, last-position logits for generation), same weights, interleaved.

    python -m bench.before_after [--size mid|tiny] [--batch 1,8] [--length 650] [--new-tokens 32] [--reps 3]

Times are wall medians; the after/before rows are medians of per-repetition ratios (wall, and process CPU
time, which other jobs on a shared host disturb much less). "Before" runs the current modules with the previous attention patched in while its own jitted programs are
traced, so both variants live side by side; `legacy_attention` is that previous implementation, verbatim.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from blink_jax.blink import BlinkConfig
from blink_jax.blink.config import parse_layers
from blink_jax.model import clip, forward, llama


def legacy_attention(q, k, v, mask, *, causal: bool = False, tail: int = 0):
    """`blink_jax.model.ops.attention` before the optimisation (`causal` and `tail` are accepted and ignored)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


@contextlib.contextmanager
def patched_attention(fn):
    saved = llama.attention, clip.attention
    llama.attention = clip.attention = fn
    try:
        yield
    finally:
        llama.attention, clip.attention = saved


def _programs(before: bool, new_tokens: int):
    """Fresh jitted (prefill, generate(n), blink prefill) for one variant."""
    from blink_jax.blink.forward import blink_prefill

    @functools.partial(jax.jit, static_argnums=0)
    def prefill(graphdef, params, ids, px, mask):
        return forward.prefill(nnx.merge(graphdef, params), ids, px, mask)[0]

    @functools.partial(jax.jit, static_argnums=(0, 5))
    def generate(graphdef, params, ids, px, mask, n):
        model = nnx.merge(graphdef, params)
        logits, cache = forward.prefill(model, ids, px, mask, all_logits=before)
        return forward.greedy_decode(model, logits[:, -1], cache, max_new_tokens=n, eos_token_id=-1, pad_token_id=0)

    @functools.partial(jax.jit, static_argnums=(0, 2, 8))
    def blink(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, static):
        model, bank = nnx.merge(graphdef, params), nnx.merge(bank_def, bank_state)
        return blink_prefill(model, bank, ids, px, mask, static, thresholds, jax.random.key(0))[0]

    wrap = (lambda f: f) if not before else (lambda f: lambda *a: _with_legacy(f, *a))
    return wrap(prefill), wrap(generate), wrap(blink)


def _with_legacy(f, *args):
    with patched_attention(legacy_attention):
        return f(*args)


def run(size: common.Size, batches, length: int, new_tokens: int, layers, reps: int) -> str:
    from blink_jax.blink.runner import _interp_bank

    _, ours = common.make_models(size, with_torch=False)
    gd, params = ours.graphdef, ours.params
    cfg = BlinkConfig(layers=tuple(layers), region_size=6 if ours.config.vision.grid % 6 == 0 else 3,
                      expansion="fixed")
    static, thresholds = cfg.split()
    bank_def, bank_state = _interp_bank(static, ours.config.text.hidden_size)
    variants = {"before": _programs(True, new_tokens), "after": _programs(False, new_tokens)}
    rows = [f"| batch | variant | prefill (s) | generate 1 token (s) | generate {new_tokens} tokens (s) | decode (tok/s) "
            "| Blink prefill, expand every layer (s) | Blink / vanilla prefill |", "|---|---|---|---|---|---|---|---|"]
    raw = []
    for b in batches:
        ids, px, mask = (jnp.asarray(x) for x in common.prompt_batch(ours, b, length))
        fns = {}
        for name, (prefill, generate, blink) in variants.items():
            fns[f"{name} prefill"] = lambda p=prefill: jax.block_until_ready(p(gd, params, ids, px, mask))
            fns[f"{name} gen1"] = lambda g=generate: jax.block_until_ready(g(gd, params, ids, px, mask, 1))
            fns[f"{name} genN"] = lambda g=generate: jax.block_until_ready(g(gd, params, ids, px, mask, new_tokens))
            fns[f"{name} blink"] = lambda f=blink: jax.block_until_ready(
                f(gd, params, bank_def, bank_state, ids, px, mask, thresholds, static))
        cpu = {}
        t = common.interleaved(fns, reps=reps, cpu=cpu)
        raw.append(common.raw_line(f"batch {b} wall seconds per repetition", t))
        raw.append(common.raw_line(f"batch {b} CPU seconds per repetition", cpu))
        med = {k: common.median(v) for k, v in t.items()}
        for name in variants:
            decode = common.median([b * (new_tokens - 1) / (n - one) if n > one else float("nan")
                                    for one, n in zip(t[f"{name} gen1"], t[f"{name} genN"])])
            rows.append(f"| {b} | {name} | {med[f'{name} prefill']:.3f} | {med[f'{name} gen1']:.3f} "
                        f"| {med[f'{name} genN']:.3f} | {decode:.1f} | {med[f'{name} blink']:.3f} "
                        f"| {med[f'{name} blink'] / med[f'{name} prefill']:.2f} |")
        for label, times in (("after/before", t), ("after/before, CPU time", cpu)):
            ratio = lambda key: common.paired_ratio(times[f"after {key}"], times[f"before {key}"])
            rows.append(f"| {b} | {label} | {ratio('prefill'):.2f} | {ratio('gen1'):.2f} | {ratio('genN'):.2f} "
                        f"| | {ratio('blink'):.2f} | |")
    return "\n".join(rows + [""] + raw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", default="3,4,5", help="Blink's participating layers")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant, interleaved")
    a = p.parse_args(argv)
    size = common.SIZES[a.size]
    table = run(size, common.batch_sizes(a.batch), a.length, a.new_tokens,
                parse_layers(a.layers), a.reps)
    print(f"machine: {common.machine()}\nsize: {size}\n\n{table}")


if __name__ == "__main__":
    main()
