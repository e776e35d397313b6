"""Small numerical building blocks shared by the vision tower and the language model.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, H head dim, D model dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# Module-level functions (not lambdas), so two models of one config have equal graphdefs and share programs.
_ACTIVATIONS = {"gelu": gelu_exact, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh,
                "quick_gelu": quick_gelu, "silu": jax.nn.silu, "relu": jax.nn.relu}


def activation(name: str):
    """The activation of an HF config string, with HF's exact definitions."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale (the order HF uses)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):  # [..., D]
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:  # [H/2]
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in HF Llama's half-split layout. x: [B, T, N, H], positions: [B, T] int."""
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention with grouped kv heads.

    q: [B, T, N, H], k/v: [B, S, K, H], mask: [B, T, S] bool (True = may attend) or None -> [B, T, N, H].
    A query row with no visible key (left padding) gets a uniform, finite output instead of NaN.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)
