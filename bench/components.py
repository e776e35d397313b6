"""Where a prefill's time goes, blink-jax vs transformers, piece by piece: one GEMM of the decoder MLP's shape,
the LM head over every position, and our prefill with logits at every position vs the last one only.

    python -m bench.components [--size mid|tiny] [--batch 8] [--length 650] [--reps 3]

Same weights, same threads, interleaved; medians. Explains the prefill ratio of `bench.prefill_decode`: if each
piece is as fast or faster here, what remains between the two frameworks is in the small memory-bound ops.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from flax import nnx

from bench import common
from blink_jax.model import forward


def run(size: common.Size, batch: int, length: int, reps: int) -> str:
    import torch

    torch.set_num_threads(os.cpu_count())
    hf, ours = common.make_models(size)
    ids, px, mask = common.prompt_batch(ours, batch, length)
    gd, params = ours.graphdef, ours.params
    rows = batch * length
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, size.text_width), np.float32)
    w = rng.standard_normal((size.text_width, size.text_ffn), np.float32)
    h = rng.standard_normal((batch, length, size.text_width), np.float32)
    ja, jw, jh = jax.device_put(a), jax.device_put(w), jax.device_put(h)
    ta, tw, th = torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(h)

    gemm = jax.jit(lambda x, y: x @ y)
    head = jax.jit(lambda p, x: nnx.merge(gd, p).language_model.logits(x))
    prefill = {n: jax.jit(lambda p, i, x, m, n=n: forward.prefill(nnx.merge(gd, p), i, x, m, all_logits=n)[0])
               for n in (True, False)}

    def torch_call(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    fns = {
        "gemm ours": lambda: gemm(ja, jw).block_until_ready(),
        "gemm torch": torch_call(lambda: ta @ tw),
        "head ours": lambda: head(params, jh).block_until_ready(),
        "head torch": torch_call(lambda: hf.lm_head(th)),
        "prefill ours, all logits": lambda: prefill[True](params, ids, px, mask).block_until_ready(),
        "prefill ours, last logits": lambda: prefill[False](params, ids, px, mask).block_until_ready(),
    }
    t = common.interleaved(fns, reps=reps)
    med = {k: common.median(v) for k, v in t.items()}
    flops = 2 * rows * size.text_width * size.text_ffn
    lines = [f"| piece ({rows} rows) | ours (s) | torch (s) | ours/torch |", "|---|---|---|---|",
             f"| GEMM {rows} x {size.text_width} x {size.text_ffn} | {med['gemm ours']:.3f} "
             f"({flops / med['gemm ours'] / 1e9:.0f} GFLOP/s) | {med['gemm torch']:.3f} "
             f"({flops / med['gemm torch'] / 1e9:.0f} GFLOP/s) | {common.paired_ratio(t['gemm ours'], t['gemm torch']):.2f} |",
             f"| LM head over every position | {med['head ours']:.3f} | {med['head torch']:.3f} "
             f"| {common.paired_ratio(t['head ours'], t['head torch']):.2f} |",
             "",
             f"prefill ours, logits at every position: {med['prefill ours, all logits']:.3f} s; last position only: "
             f"{med['prefill ours, last logits']:.3f} s",
             "", common.raw_line("seconds per repetition", t)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p, batch=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions, interleaved")
    a = p.parse_args(argv)
    size = common.SIZES[a.size]
    print(f"machine: {common.machine()}\nsize: {size}\nbatch {a.batch}, {a.length} tokens\n\n"
          f"{run(size, a.batch, a.length, a.reps)}")


if __name__ == "__main__":
    main()
