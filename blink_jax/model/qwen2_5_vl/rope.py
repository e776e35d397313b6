"""Rotary embeddings of Qwen2.5-VL: M-RoPE in the decoder, axial 2-D RoPE in the vision tower.

Both rotate the half-split layout of `ops.apply_rope`; only the angle of each frequency differs:
- M-RoPE: positions are [3, B, T] (temporal, height, width); frequency j takes its position from the axis
  whose `mrope_section` holds j. Text tokens have three equal positions, i.e. plain RoPE.
- vision: a patch at (h, w) uses h for the first quarter of the frequencies and w for the second.

Einsum letters: B batch, T length, N heads, H head dim, P patches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blink_jax.model.ops import rope_frequencies


def rotate(x: jax.Array, angles: jax.Array) -> jax.Array:
    """x: [..., T, N, H] rotated by angles [..., T, H/2] (float32), in HF's half-split layout."""
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def mrope_axes(mrope_section: tuple[int, ...]) -> np.ndarray:  # [H/2] int: the position axis of each frequency
    return np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)]).astype(np.int32)


def mrope_angles(positions: jax.Array, head_dim: int, theta: float,
                 mrope_section: tuple[int, ...]) -> jax.Array:
    """positions [3, B, T] (or [B, T]: one position for all axes, as transformers broadcasts) -> [B, T, H/2]."""
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
    chosen = jnp.moveaxis(positions[mrope_axes(mrope_section)], 0, -1)  # [B, T, H/2]
    return chosen.astype(jnp.float32) * rope_frequencies(head_dim, theta)


def vision_angles(hw: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """hw [P, 2] int patch coordinates -> [P, H/2]: h-angles then w-angles, each over H/4 frequencies."""
    freqs = rope_frequencies(head_dim // 2, theta)  # [H/4]
    angles = hw.astype(jnp.float32)[..., None] * freqs  # [P, 2, H/4]
    return angles.reshape(hw.shape[0], -1)
