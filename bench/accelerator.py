"""Prefill throughput and model FLOP utilisation on an accelerator: blink-jax vanilla, Blink-interp expanding at
every participating layer, and transformers' PyTorch LLaVA on the same device when torch can reach it.

    python -m bench.accelerator [--size 7b|mid|tiny] [--dtype bfloat16|float32] [--batch 1,8] [--length 650]
                                [--layers 12-18] [--reps 10] [--peak-tflops N] [--torch-device cuda|cpu|none]

Random weights of the model's shapes (ours from flax's initialisers, torch's from its own: values do not change
the time of dense work), the dtype chosen for parameters and activations (softmax and norms accumulate in
float32 in both). Prefill = one forward over `--length` prompt tokens with logits at every position, as in
`bench.prefill_decode`. Model FLOPs are counted analytically (`blink_jax.flops.prefill_flops`, causal attention
counted as half the square); MFU = model FLOPs / seconds / the device's dense peak for the dtype (`PEAK_TFLOPS`, or
`--peak-tflops`). Blink's FLOPs include its extra SR tokens in the layers that carry them, so its MFU measures
how well its own work runs; its tokens/s counts prompt tokens, the user's work, like vanilla's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from bench import common
from blink_jax.blink.config import parse_layers
from blink_jax.config import ConfigError
from blink_jax.flops import prefill_flops

# Dense bf16 peak (TFLOP/s) by device kind, from the vendors' data sheets (no sparsity). float32 has no entry:
# pass --peak-tflops for it. Matched as substrings of `jax.devices()[0].device_kind`, first match wins, so the more
# specific names come first ("L40S" before "L40" before "L4").
PEAK_TFLOPS = {
    "bfloat16": (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                 ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
                 ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
                 ("TPU v5", 459.0), ("TPU v6", 918.0)),
}
def default_layers(text_layers: int) -> tuple[int, ...]:
    """Layers 12-18 of 32 (BLINK.md), scaled to a decoder of `text_layers` layers."""
    first, last = int(12 * text_layers / 32 + 0.5), int(18 * text_layers / 32 + 0.5)  # halves round up
    last = min(max(last, first), text_layers - 1)
    return tuple(range(first, last + 1))


def peak_for_kind(device_kind: str, dtype: str) -> float | None:
    """The dense peak (TFLOP/s) of a device kind for `dtype`, None when the table does not know it."""
    for name, tflops in PEAK_TFLOPS.get(dtype, ()):
        if name in device_kind:
            return tflops
    return None


def peak_tflops(dtype: str, override: float | None) -> float | None:
    return override or peak_for_kind(jax.devices()[0].device_kind, dtype)


def make_ours(size: common.Size, dtype):
    """Our `Llava` with flax's random initialisation, parameters in `dtype` on the default device."""
    from flax import nnx

    from blink_jax.config import LlavaConfig
    from blink_jax.model.llava import LlavaModel
    from blink_jax.runtime import Llava

    cfg = LlavaConfig.from_hf_config(common.hf_config(size))
    model = nnx.jit(lambda: LlavaModel(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)))()
    return Llava(model)


def make_torch(size: common.Size, dtype: str, device: str):
    """transformers' `LlavaForConditionalGeneration` built directly on `device` in `dtype` (SDPA attention)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg = common.hf_config(size)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            return LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(previous)


def _torch_device(choice: str) -> str | None:
    if choice == "none":
        return None
    try:
        import torch
    except ImportError:
        return None
    if choice == "cuda" and not torch.cuda.is_available():
        return None
    return choice


def run(size: common.Size, dtype: str, batches, length: int, layers, region_size: int, reps: int,
        peak: float | None, torch_device: str | None) -> str:
    from blink_jax.blink import BlinkConfig

    ours = make_ours(size, getattr(jnp, dtype))
    blink = BlinkConfig(layers=tuple(layers), region_size=region_size, expansion="fixed")
    sr_tokens = (blink.region_size * blink.scale) ** 2
    hf = make_torch(size, dtype, torch_device) if torch_device else None
    rows = ["| batch | variant | prefill (ms) | prompt tokens/s | model TFLOP | TFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|"]
    raw = []
    for b in batches:
        ids, px, mask = common.prompt_batch(ours, b, length)
        j_ids, j_px, j_mask = ours.check_inputs(ids, px, mask)

        def vanilla():
            return jax.block_until_ready(ours(input_ids=j_ids, pixel_values=j_px, attention_mask=j_mask).logits)

        def blink_fixed():
            out = ours(input_ids=j_ids, pixel_values=j_px, attention_mask=j_mask, blink=blink)
            return jax.block_until_ready(out.logits)

        fns = {"ours vanilla": vanilla, "ours Blink, expand every layer": blink_fixed}
        flops = {"ours vanilla": prefill_flops(size, b, length),
                 "ours Blink, expand every layer": prefill_flops(
                     size, b, length, sr_tokens=sr_tokens, sr_layers=size.text_layers - 1 - layers[0])}
        if hf is not None:
            import torch

            t_ids, t_mask = (torch.tensor(x, device=torch_device) for x in (ids, mask))
            t_px = torch.tensor(px, device=torch_device, dtype=getattr(torch, dtype))

            def torch_prefill():
                with torch.no_grad():
                    out = hf(input_ids=t_ids, pixel_values=t_px, attention_mask=t_mask).logits
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                return out

            fns["torch vanilla"] = torch_prefill
            flops["torch vanilla"] = flops["ours vanilla"]
        t = common.interleaved(fns, reps=reps, warmup=2)
        raw.append(common.raw_line(f"batch {b} seconds per repetition", t))
        for name, times in t.items():
            sec = common.median(times)
            tflops = flops[name] / sec / 1e12
            mfu = f"{tflops / peak:.1%}" if peak else "-"
            rows.append(f"| {b} | {name} | {sec * 1e3:.1f} | {b * length / sec:,.0f} | {flops[name] / 1e12:.2f} "
                        f"| {tflops:.1f} | {mfu} |")
        base = t["ours vanilla"]
        ratios = [f"Blink/vanilla {common.paired_ratio(t['ours Blink, expand every layer'], base):.2f}"]
        if "torch vanilla" in t:
            ratios.append(f"ours/torch {common.paired_ratio(base, t['torch vanilla']):.2f}")
        raw.append(f"batch {b} paired ratios (median of per-repetition ratios): " + ", ".join(ratios))
    return "\n".join(rows + [""] + raw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(common.ALL_SIZES), default="7b", help="model shape (tiny: smoke test)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="parameters and activations")
    p.add_argument("--length", type=int, default=650, help="prompt length in tokens (576 of them image tokens)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--layers", default=None, help="Blink's participating layers, '12-18' or '3,4,5' "
                   "(default: 12-18 of 32, scaled to the decoder's depth)")
    p.add_argument("--region-size", type=int, default=6, help="region side r (24x24 grid -> 16 regions)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per variant, interleaved")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for --dtype, for MFU (default: looked up from the device kind)")
    p.add_argument("--torch-device", choices=("cuda", "cpu", "none"), default="cuda",
                   help="where transformers' model runs ('cuda' is skipped when torch sees no GPU)")
    a = p.parse_args(argv)
    size = common.ALL_SIZES[a.size]
    try:
        layers = parse_layers(a.layers) if a.layers else default_layers(size.text_layers)
    except ConfigError as e:
        p.error(str(e))
    if not 0 <= layers[0] <= layers[-1] < size.text_layers:
        p.error(f"--layers {a.layers} must lie within the decoder's {size.text_layers} layers")
    peak = peak_tflops(a.dtype, a.peak_tflops)
    torch_device = _torch_device(a.torch_device)
    start = time.perf_counter()
    table = run(size, a.dtype, common.batch_sizes(a.batch), a.length, layers, a.region_size, a.reps, peak,
                torch_device)
    device = jax.devices()[0]
    print(f"machine: {common.machine()}\ndevice: {device.device_kind} ({device.platform}); dtype {a.dtype}; "
          f"peak {peak or 'unknown'} TFLOP/s; torch on {torch_device or 'none'}\n"
          f"size: {dataclasses.asdict(size)}\nBlink layers {layers}, r={a.region_size}\n\n{table}\n\n"
          f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
