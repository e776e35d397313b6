"""Saliency-guided scanning (SGS, BLINK.md §2): which visual region the last prompt token looks at.

Pure, jit-able, batched functions with static shapes. Einsum letters:
  B batch, S key positions (the whole padded buffer), N query heads, K kv heads,
  Q query heads per kv head (N // K), H head dim, V visual tokens (Gh*Gw), Gh x Gw the grid, R regions.

The attention here is a separate `q_t . K` product for one query row per example, so the layer's
main attention can stay a fused kernel; it must see the same keys as the layer (RoPE applied,
same validity mask), so that its probabilities are the ones the layer uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blink_jax.blink.config import grid_shape


def last_token_attention(
    q_last: jax.Array,  # [B, N, H] query of the last prompt token, RoPE applied
    keys: jax.Array,  # [B, S, K, H] the layer's keys, RoPE applied
    key_valid: jax.Array,  # [B, S] bool: keys the last prompt token attends to
    *,
    scale: float | None = None,
) -> jax.Array:  # [B, N, S] float32
    """Per-head softmax(q_t . k / sqrt(H)) over the valid keys, in float32, with GQA.

    Query head n reads kv head n // (N // K). `key_valid` must be exactly the set of keys the layer
    lets token t see (no padding, no unfilled capacity slots, nothing after t; SR tokens included
    while expanded). Invalid keys get probability exactly 0; a row with no valid key is all zeros.
    """
    b, n, h = q_last.shape
    k = keys.shape[2]
    if n % k:
        raise ValueError(f"query heads N={n} are not a multiple of kv heads K={k}")
    scale = h**-0.5 if scale is None else scale
    q = q_last.astype(jnp.float32).reshape(b, k, n // k, h)
    logits = jnp.einsum("BKQH,BSKH->BKQS", q, keys.astype(jnp.float32), precision="highest") * scale
    logits = logits.reshape(b, n, -1)  # [B, N, S], head n = kv * Q + q
    valid = key_valid[:, None, :]
    # A finite fill (not -inf) keeps an all-invalid row free of NaN; the final `where` zeroes it.
    logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
    return jnp.where(valid, jax.nn.softmax(logits, axis=-1), 0.0)


def visual_saliency(
    probs: jax.Array,  # [B, N, S]
    visual_index: jax.Array,  # [B, V] int: buffer position of visual token v (row-major grid order)
) -> jax.Array:  # [B, V] float32: S_v
    """S_v: head-mean attention probability on each original visual token.

    Visual positions differ per example (left padding), hence the per-example gather.
    """
    mean = jnp.mean(probs.astype(jnp.float32), axis=1)  # [B, S]; mean and gather commute
    return jnp.take_along_axis(mean, visual_index.astype(jnp.int32), axis=1)


def region_scores(
    s_v: jax.Array,  # [B, Gh*Gw] row-major over the grid
    grid: int | tuple[int, int],
    region_size: int,
) -> jax.Array:  # [B, R]
    """S_r: sum-pool S_v over r x r blocks; region index = (i // r) * (Gw // r) + (j // r). `grid`: G (square)
    or (Gh, Gw)."""
    gh, gw = grid_shape(grid)
    if gh % region_size or gw % region_size:
        raise ValueError(f"region_size={region_size} does not divide the grid {gh} x {gw}")
    b = s_v.shape[0]
    blocks = s_v.reshape(b, gh // region_size, region_size, gw // region_size, region_size)
    return blocks.sum(axis=(2, 4)).reshape(b, -1)


def saliency_ratio(s_r: jax.Array) -> tuple[jax.Array, jax.Array]:  # [B, R] -> ([B], [B] int32)
    """(rho, r*): rho = max_r S_r / sum_r S_r in [1/R, 1], r* = argmax_r S_r.

    An example whose visual tokens get no attention at all (sum 0, e.g. a padding row of the batch)
    gets rho = 0, so it never expands, instead of NaN.
    """
    total = jnp.sum(s_r, axis=-1)
    best = jnp.max(s_r, axis=-1)
    rho = jnp.where(total > 0, best / jnp.where(total > 0, total, 1.0), 0.0)
    return rho, jnp.argmax(s_r, axis=-1).astype(jnp.int32)


def saliency_guided_scan(
    q_last: jax.Array,  # [B, N, H]
    keys: jax.Array,  # [B, S, K, H]
    key_valid: jax.Array,  # [B, S] bool
    visual_index: jax.Array,  # [B, V] int
    *,
    grid: int | tuple[int, int],
    region_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # rho [B], r* [B] int32, S_v [B, V]
    """The four steps above in one call."""
    s_v = visual_saliency(last_token_attention(q_last, keys, key_valid), visual_index)
    rho, region = saliency_ratio(region_scores(s_v, grid, region_size))
    return rho, region, s_v
