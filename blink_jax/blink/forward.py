"""Blink's prefill: LLaVA's forward pass with saliency-guided scanning and dynamic token resolution.

One program serves every decision pattern. From the first participating layer on, the sequence is a
fixed-capacity buffer `[prompt (T); SR slots (P)]`: the SR slots sit physically after the prompt but
take their causal rank between the visual tokens and the text, so attention runs in the order
`[prefix; visual; SR; text]` of BLINK.md §3. Expand, keep and drop only change the slots' contents,
position ids and validity: no shapes change, nothing leaves the device. Layers up to and including the
first participating layer run on the prompt alone (no SR token can exist before its decision).

Letters: B batch, T prompt length, P SR slots ((s r)^2), L buffer length (T + P), D model dim,
G grid side, V visual tokens (G*G).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from blink_jax.blink import dtr
from blink_jax.blink.config import BlinkStatic, Thresholds
from blink_jax.blink.saliency import saliency_guided_scan
from blink_jax.blink.tokensr import TokenSRBank
from blink_jax.model.forward import KVCache, causal_mask, position_ids
from blink_jax.model.llava import LlavaModel


@struct.dataclass
class Trace:
    """Per participating layer (leading axis, in `BlinkConfig.layers` order) and example."""
    rho: jax.Array  # [Lp, B] float32
    region: jax.Array  # [Lp, B] int32: r* at that layer (the random region under the w/o-SGS ablation)
    action: jax.Array  # [Lp, B] int32: dtr.NONE / EXPAND / KEEP / DROP
    expanded_region: jax.Array  # [Lp, B] int32: the region whose SR tokens enter layer L+1, or dtr.NO_REGION
    attention: jax.Array | None = None  # [Lp, B, G, G] float32: S_v, when requested


def visual_layout(input_ids: jax.Array, attention_mask: jax.Array, image_token_index: int, num_image_tokens: int,
                  grid: int):
    """Where the visual grid sits in each (left-padded) row.

    -> visual_index [B, V] (buffer index of grid token v, row-major; with the "full" strategy the CLS
       token that leads the image run is not part of the grid), vis_end [B] (index of the last image token).
    """
    is_image = (input_ids == image_token_index) & (attention_mask > 0)
    start = jnp.argmax(is_image, axis=1).astype(jnp.int32)  # first image token
    first_grid = start + (num_image_tokens - grid * grid)
    visual_index = first_grid[:, None] + jnp.arange(grid * grid, dtype=jnp.int32)[None]
    return visual_index, start + num_image_tokens - 1


def buffer_order(t: int, num_sr: int, vis_end: jax.Array) -> jax.Array:
    """Causal rank of each buffer slot [B, T + P]: prompt tokens after the image move up by P, SR slots
    take the ranks right after the last image token."""
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    prompt = jnp.where(idx > vis_end[:, None], idx + num_sr, idx)
    sr = vis_end[:, None] + 1 + jnp.arange(num_sr, dtype=jnp.int32)[None]
    return jnp.concatenate([prompt, sr], axis=1)


def blink_prefill(model: LlavaModel, bank: TokenSRBank, input_ids: jax.Array, pixel_values: jax.Array,
                  attention_mask: jax.Array, static: BlinkStatic, thresholds: Thresholds, key: jax.Array, *,
                  all_logits: bool = True):
    """-> (logits [B, T, V] float32 at the prompt's positions, KVCache of length T + P, Trace).

    `all_logits=False`: the last prompt position's logits only ([B, 1, V]), for generation."""
    cfg = model.config
    grid = cfg.vision.grid
    b, t = input_ids.shape
    num_sr, r, s = static.num_sr_tokens, static.region_size, static.scale
    first = static.layers[0]

    h = model.embed_multimodal(input_ids, pixel_values)
    prompt_valid = attention_mask > 0
    positions = position_ids(attention_mask)
    visual_index, vis_end = visual_layout(input_ids, attention_mask, cfg.image_token_index,
                                          cfg.num_image_tokens, grid)
    visual_pos = jnp.take_along_axis(positions, visual_index, axis=1)  # [B, V]
    order = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    state = dtr.init_state(b)
    sr_h = jnp.zeros((b, num_sr, h.shape[-1]), h.dtype)
    sr_pos = jnp.zeros((b, num_sr), jnp.int32)
    trace = []
    ks, vs, valids = [], [], []

    for index, layer in enumerate(model.language_model.layers):
        carries_sr = index > first  # no SR token can exist before the first decision
        valid = jnp.concatenate([prompt_valid, jnp.broadcast_to(state.expanded[:, None], (b, num_sr))],
                                axis=1) if carries_sr else prompt_valid
        buffer_pos = jnp.concatenate([positions, sr_pos], axis=1) if carries_sr else positions
        # The prompt is in causal order; the SR slots sit physically last, causally between visual and text.
        h, q, k, v = layer(h, buffer_pos, causal_mask(order, valid), causal=True, tail=num_sr if carries_sr else 0)
        ks.append(k)
        vs.append(v)
        valids.append(valid)
        if index == first:  # from here on the buffer carries the SR slots
            h = jnp.concatenate([h, sr_h], axis=1)
            order = buffer_order(t, num_sr, vis_end)
        if index not in static.layers:
            continue

        rho, r_star, s_v = saliency_guided_scan(q[:, t - 1], k, valid, visual_index, grid=grid, region_size=r)
        if static.random_region:
            r_star = dtr.random_regions(dtr.fold_in(key, index), b, static.num_regions(grid))
        action, state = dtr.step(state, rho, r_star, thresholds, static)
        low_res = dtr.gather_region(dtr.gather_visual(h, visual_index, grid), state.region, r)  # [B, r, r, D]
        fresh = bank.for_layer(index)(low_res).astype(h.dtype).reshape(b, num_sr, -1)
        sr_now = dtr.select_on_expand(action, fresh, h[:, t:])
        h = jnp.concatenate([h[:, :t], sr_now], axis=1)
        sr_pos = dtr.select_on_expand(action, dtr.sr_position_ids(visual_pos, state.region, grid, r, s), sr_pos)
        trace.append((rho, r_star, action, state.region, s_v.reshape(b, grid, grid)))

    logits = model.language_model.logits(h[:, :t] if all_logits else h[:, t - 1:t])
    # Layers up to the first participating one get the SR slots too, always empty, so that every layer's
    # cache has one length and decoding writes at one index.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, num_sr)) + ((0, 0),) * (x.ndim - 2))
    ks = [k if i > first else pad(k) for i, k in enumerate(ks)]
    vs = [v if i > first else pad(v) for i, v in enumerate(vs)]
    valids = [m if i > first else pad(m) for i, m in enumerate(valids)]
    cache = KVCache(k=tuple(ks), v=tuple(vs), valid=tuple(valids), index=jnp.int32(t + num_sr),
                    next_position=positions[:, -1] + 1)
    stack = lambda i: jnp.stack([entry[i] for entry in trace])
    out_trace = Trace(rho=stack(0), region=stack(1), action=stack(2), expanded_region=stack(3),
                      attention=stack(4) if static.return_attention else None)
    return logits, cache, out_trace
