"""Shared pieces of the benchmarks: the mid-size random LLaVA, weight sharing with transformers, timing.

Every comparison is interleaved (A, B, A, B, ...) in one process and reported as medians and ratios.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Size:
    vision_width: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    text_width: int = 1024
    text_layers: int = 8
    text_heads: int = 16
    text_kv_heads: int = 16
    text_ffn: int = 2816
    vocab: int = 32064
    image_size: int = 336
    patch: int = 14


MID = Size()
TINY = Size(vision_width=32, vision_layers=2, vision_heads=4, text_width=48, text_layers=3, text_heads=6,
            text_kv_heads=3, text_ffn=61, vocab=128, image_size=84)
SIZES = {"mid": MID, "tiny": TINY}  # --size choices of the timing scripts (tiny: for the smoke test)
# 7B-shaped (LLaVA-1.5-7B), for accelerator runs.
LLAVA_7B = Size(vision_width=1024, vision_layers=24, vision_heads=16, text_width=4096, text_layers=32,
                text_heads=32, text_kv_heads=32, text_ffn=11008, vocab=32064)
# LLaVA-1.5-13B: Vicuna-13B with the same CLIP; vocabulary padded to 32064 as in the 7B (llava-hf checkpoints).
LLAVA_13B = Size(vision_width=1024, vision_layers=24, vision_heads=16, text_width=5120, text_layers=40,
                 text_heads=40, text_kv_heads=40, text_ffn=13824, vocab=32064)
ALL_SIZES = {**SIZES, "7b": LLAVA_7B, "13b": LLAVA_13B}  # for scripts that can run it (accelerators, or compile-only)


def add_model_args(p, *, batch: str | None = "1,8", sizes=None) -> None:
    """The timing scripts' shared flags: --size (of `sizes`, default SIZES), --length and (unless batch is None)
    --batch "1,8"."""
    p.add_argument("--size", choices=sorted(sizes or SIZES), default="mid", help="model size (tiny: for the smoke test)")
    p.add_argument("--length", type=int, default=650, help="prompt length in tokens (576 of them image tokens)")
    if batch is not None:
        p.add_argument("--batch", default=batch, help="comma-separated batch sizes")


def batch_sizes(text: str) -> list[int]:
    return [int(b) for b in text.split(",")]


def hf_config(size: Size):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=size.text_width, intermediate_size=size.text_ffn,
                       num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
                       num_key_value_heads=size.text_kv_heads, vocab_size=size.vocab, max_position_embeddings=4096,
                       pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=size.vision_width, intermediate_size=4 * size.vision_width,
                              num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                              image_size=size.image_size, patch_size=size.patch, projection_dim=size.vision_width)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=size.vocab - 1)


def make_models(size: Size, seed: int = 0, with_torch: bool = True):
    """(transformers model or None, our `Llava`) with the same random fp32 weights."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from blink_jax.config import LlavaConfig
    from blink_jax.weights.params import model_from_params, param_shapes
    from blink_jax.runtime import Llava
    from blink_jax.weights.param_mapping import build_mapping, canonical_key

    torch.manual_seed(seed)
    cfg = hf_config(size)
    cfg._attn_implementation = "sdpa"
    hf = LlavaForConditionalGeneration(cfg).eval()
    ours_cfg = LlavaConfig.from_hf_config(cfg)
    sd = {canonical_key(k): v.detach().numpy() for k, v in hf.state_dict().items()}
    shapes = param_shapes(ours_cfg)
    params = {e.path: e.transform.to_ours(sd[e.hf_key], shapes[e.path]) for e in build_mapping(ours_cfg)}
    ours = Llava(model_from_params(ours_cfg, params))
    del sd, params
    return (hf if with_torch else None), ours


def prompt_batch(ours, batch: int, length: int, seed: int = 0):
    """Random prompts of `length` tokens with one image run after a 35-token prefix; no padding."""
    cfg = ours.config
    if length < 36 + cfg.num_image_tokens:
        raise ValueError(f"--length {length} cannot hold the 35-token prefix, {cfg.num_image_tokens} image tokens "
                         f"and one text token: use at least {36 + cfg.num_image_tokens}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, cfg.text.vocab_size - 2, (batch, length))
    ids[:, 35:35 + cfg.num_image_tokens] = cfg.image_token_index
    mask = np.ones_like(ids)
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids, pixels, mask


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each callable, `reps` times, round-robin, after `warmup` untimed rounds.

    With `cpu` (a dict), also records each call's process CPU seconds (all threads) there: on a shared,
    oversubscribed host, CPU time is much less disturbed by the other jobs than wall time (they take turns on
    the cores), so it is the better measure between two programs of one runtime (XLA vs XLA).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    if cpu is not None:
        cpu.update({name: [] for name in fns})
    for _ in range(reps):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu[name].append(time.process_time() - start_cpu)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a[i] / b[i]: each pair ran back to back, so slow drifts of the host's load
    cancel."""
    return median([x / y for x, y in zip(a, b)])


def raw_line(label, times: dict[str, list[float]]) -> str:
    """One line with every repetition's seconds, for the record under a table of medians."""
    return f"{label}: " + "; ".join(f"{name} {[round(x, 3) for x in xs]}" for name, xs in times.items())


def median(xs):
    return statistics.median(xs)


def machine() -> str:
    import jax

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
            f"({jax.devices()[0].platform}), {datetime.date.today().isoformat()}")
