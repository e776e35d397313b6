"""Blink's prefill: LLaVA's forward pass with saliency-guided scanning and dynamic token resolution.

One program serves every decision pattern. From the first participating layer on, the sequence is a
fixed-capacity buffer `[prompt (T); SR slots (P)]`: the SR slots sit physically after the prompt but
take their causal rank between the visual tokens and the text, so attention runs in the order
`[prefix; visual; SR; text]` of BLINK.md §3. Expand, keep and drop only change the slots' contents,
position ids and validity: no shapes change, nothing leaves the device. Layers up to and including the
first participating layer run on the prompt alone (no SR token can exist before its decision).

It is the model's one decoder loop (`blink_jax.model.decoder.walk`) with `blink_hook` at each participating
layer, over any backbone of the protocol (`blink_jax.model.backbone`).

Letters: B batch, T prompt length, P SR slots ((s r)^2), L buffer length (T + P), D model dim,
Gh x Gw the visual grid, V visual tokens (Gh*Gw).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from blink_jax.blink import dtr
from blink_jax.blink.config import BlinkStatic, Thresholds
from blink_jax.blink.saliency import saliency_guided_scan
from blink_jax.blink.tokensr import TokenSRBank
from blink_jax.model import forward
from blink_jax.model.backbone import Backbone, Prompt
from blink_jax.model.decoder import Hook, Stream


@struct.dataclass
class Trace:
    """Per participating layer (leading axis, in `BlinkConfig.layers` order) and example."""
    rho: jax.Array  # [Lp, B] float32
    region: jax.Array  # [Lp, B] int32: r* at that layer (the random region under the w/o-SGS ablation)
    action: jax.Array  # [Lp, B] int32: dtr.NONE / EXPAND / KEEP / DROP
    expanded_region: jax.Array  # [Lp, B] int32: the region whose SR tokens enter layer L+1, or dtr.NO_REGION
    attention: jax.Array | None = None  # [Lp, B, Gh, Gw] float32: S_v, when requested


def buffer_order(t: int, num_sr: int, vis_end: jax.Array) -> jax.Array:
    """Causal rank of each buffer slot [B, T + P]: prompt tokens after the image move up by P, SR slots
    take the ranks right after the last image token."""
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    prompt = jnp.where(idx > vis_end[:, None], idx + num_sr, idx)
    sr = vis_end[:, None] + 1 + jnp.arange(num_sr, dtype=jnp.int32)[None]
    return jnp.concatenate([prompt, sr], axis=1)


@struct.dataclass
class _Carry:
    """Blink's state in the stream (`Stream.aux`) from the first participating layer on."""
    dtr: dtr.DTRState
    sr_positions: jax.Array  # [..., B, P]: position ids of the SR slots (M-RoPE's leading axis of 3 first)


def blink_hook(prompt: Prompt, bank: TokenSRBank, static: BlinkStatic, thresholds: Thresholds,
               key: jax.Array) -> Hook:
    """SGS + DTR after a participating layer L (BLINK.md §2-3): decides from layer L's attention and shapes the
    stream entering layer L+1. Its record is (rho, r*, action, expanded region, S_v [B, Gh, Gw]).

    At the first participating layer the stream becomes the buffer `[prompt (T); SR slots (P)]`. Position ids may
    carry leading axes (M-RoPE's [3, B, T]); with `sr_positions="fractional"` they become float32 from there on.
    """
    grid = visual_grid(prompt)
    b, t = prompt.stream.valid.shape
    num_sr, r, s = static.num_sr_tokens, static.region_size, static.scale
    visual_index = prompt.visual_index
    positions = prompt.stream.positions  # [..., B, T]
    if static.sr_positions == "fractional":
        positions = positions.astype(jnp.float32)
    visual_pos = dtr.take_slots(positions, visual_index)  # [..., B, V]

    def open_buffer(stream: Stream) -> Stream:
        h = stream.h
        return stream.replace(
            h=jnp.concatenate([h, jnp.zeros((b, num_sr, h.shape[-1]), h.dtype)], axis=1),
            order=buffer_order(t, num_sr, prompt.visual_end), tail=num_sr,
            aux=_Carry(dtr.init_state(b), jnp.zeros(positions.shape[:-1] + (num_sr,), positions.dtype)))

    def hook(index: int, stream: Stream, q: jax.Array, k: jax.Array):
        rho, r_star, s_v = saliency_guided_scan(q[:, t - 1], k, stream.valid, visual_index, grid=grid, region_size=r)
        if stream.aux is None:  # the first participating layer: no SR token could exist before its decision
            stream = open_buffer(stream)
        if static.random_region:
            r_star = dtr.random_regions(dtr.fold_in(key, index), b, static.num_regions(grid))
        action, state = dtr.step(stream.aux.dtr, rho, r_star, thresholds, static)
        h = stream.h
        low_res = dtr.gather_region(dtr.gather_visual(h, visual_index, grid), state.region, r)  # [B, r, r, D]
        fresh = bank.for_layer(index)(low_res).astype(h.dtype).reshape(b, num_sr, -1)
        sr_now = dtr.select_on_expand(action, fresh, h[:, t:])
        fresh_pos = dtr.sr_position_ids(visual_pos, state.region, grid, r, s, static.sr_positions)
        sr_pos = jnp.where((action == dtr.EXPAND)[:, None], fresh_pos, stream.aux.sr_positions)  # [..., B, P]
        stream = stream.replace(
            h=jnp.concatenate([h[:, :t], sr_now], axis=1),
            positions=jnp.concatenate([positions, sr_pos], axis=-1),
            valid=jnp.concatenate([prompt.stream.valid, jnp.broadcast_to(state.expanded[:, None], (b, num_sr))],
                                  axis=1),
            aux=_Carry(state, sr_pos))
        return stream, (rho, r_star, action, state.region, s_v.reshape(b, *grid))

    return hook


def visual_grid(prompt: Prompt) -> tuple[int, int]:
    """The visual grid (Gh, Gw) that every row of the prompt shares (Blink's mechanics run on one grid per batch)."""
    if prompt.grid is None:
        raise ValueError("Blink needs one visual grid shape per batch, but this prompt's rows differ (or it has no "
                         "grid): give every example an image of one size (Qwen2.5-VL: pass grid= to its prompt, "
                         "with images resized to one grid shape by the processor)")
    return tuple(prompt.grid)


def blink_prefill(model: Backbone, bank: TokenSRBank, input_ids: jax.Array, pixel_values: jax.Array,
                  attention_mask: jax.Array, static: BlinkStatic, thresholds: Thresholds, key: jax.Array, *,
                  all_logits: bool = True, scan: bool = False, **inputs):
    """-> (logits [B, T, V] float32 at the prompt's positions, KVCache of length T + P, Trace).

    `all_logits=False`: the last prompt position's logits only ([B, 1, V]), for generation. `scan=True`: the
    layers outside the participating ones run as scans (`decoder.walk`). `inputs`: what the model's `prompt` takes
    beyond the three arrays (Qwen2.5-VL: layout, positions and the batch's grid)."""
    prompt = model.prompt(input_ids, pixel_values, attention_mask, **inputs)
    hook = blink_hook(prompt, bank, static, thresholds, key)
    logits, cache, records = forward.prefill_with_hooks(model, prompt, {layer: hook for layer in static.layers},
                                                        all_logits=all_logits, scan=scan)
    stack = lambda i: jnp.stack([record[i] for record in records])
    trace = Trace(rho=stack(0), region=stack(1), action=stack(2), expanded_region=stack(3),
                  attention=stack(4) if static.return_attention else None)
    return logits, cache, trace
