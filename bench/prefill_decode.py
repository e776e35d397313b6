"""Prefill and greedy decoding: blink-jax vanilla vs transformers' PyTorch LLaVA, same weights, same threads.

    python -m bench.prefill_decode [--size mid|tiny] [--batch 1,8] [--length 650] [--new-tokens 32] [--reps 5]
                                   [--no-decode]
"""

from __future__ import annotations

import argparse
import os

import jax

from bench import common


def _rate(tokens: int, seconds: float) -> float:
    """tokens / seconds; NaN when noise made the extra time non-positive (tiny models)."""
    return tokens / seconds if seconds > 0 else float("nan")


def run(size: common.Size, batches, length: int, new_tokens: int, reps: int, decode: bool = True) -> str:
    import torch

    torch.set_num_threads(os.cpu_count())
    hf, ours = common.make_models(size)
    rows = ["| batch | prefill torch (s) | prefill ours (s) | ours/torch | ours/torch per repetition (median) "
            "| ours/torch CPU time | decode torch (tok/s) | decode ours (tok/s) | ours/torch speed |",
            "|---|---|---|---|---|---|---|---|---|"]
    raw = []
    for b in batches:
        ids, px, mask = common.prompt_batch(ours, b, length)
        t_ids, t_px, t_mask = (torch.tensor(x) for x in (ids, px, mask))

        def torch_prefill():
            with torch.no_grad():
                return hf(input_ids=t_ids, pixel_values=t_px, attention_mask=t_mask).logits

        def ours_prefill():
            return jax.block_until_ready(ours(input_ids=ids, pixel_values=px, attention_mask=mask).logits)

        def torch_generate(n):
            with torch.no_grad():
                return hf.generate(input_ids=t_ids, pixel_values=t_px, attention_mask=t_mask, do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n)

        def ours_generate(n):
            return ours.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n,
                                 eos_token_id=-1)

        # Decode speed = the extra tokens over the extra time of generating `new_tokens` instead of 1.
        fns = {"tp": torch_prefill, "op": ours_prefill}
        if decode:
            fns.update({"tg1": lambda: torch_generate(1), "tgn": lambda: torch_generate(new_tokens),
                        "og1": lambda: ours_generate(1), "ogn": lambda: ours_generate(new_tokens)})
        cpu = {}
        t = common.interleaved(fns, reps=reps, cpu=cpu)
        raw.append(common.raw_line(f"batch {b} wall seconds per repetition", t))
        raw.append(common.raw_line(f"batch {b} CPU seconds per repetition", cpu))
        tp, op = common.median(t["tp"]), common.median(t["op"])
        paired, paired_cpu = common.paired_ratio(t["op"], t["tp"]), common.paired_ratio(cpu["op"], cpu["tp"])
        dec = "| - | - | - |"
        if decode:
            # Per repetition (the two runs were adjacent in time), then the median over repetitions.
            dec_t = common.median([_rate(b * (new_tokens - 1), n - one) for one, n in zip(t["tg1"], t["tgn"])])
            dec_o = common.median([_rate(b * (new_tokens - 1), n - one) for one, n in zip(t["og1"], t["ogn"])])
            dec = f"| {dec_t:.1f} | {dec_o:.1f} | {dec_o / dec_t:.2f} |"
        rows.append(f"| {b} | {tp:.3f} | {op:.3f} | {op / tp:.2f} | {paired:.2f} | {paired_cpu:.2f} {dec}")
    return "\n".join(rows + [""] + raw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant, interleaved")
    p.add_argument("--no-decode", action="store_true", help="time the prefill only")
    a = p.parse_args(argv)
    size = common.SIZES[a.size]
    table = run(size, common.batch_sizes(a.batch), a.length, a.new_tokens, a.reps, decode=not a.no_decode)
    print(f"machine: {common.machine()}\nsize: {size}\n\n{table}")


if __name__ == "__main__":
    main()
