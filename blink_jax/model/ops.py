"""Small numerical building blocks shared by the vision tower and the language model.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, Q query rows of one block
(g x block rows, g = N / K query heads per kv head: a size in the code, not an einsum letter), H head dim,
D model dim.
"""

from __future__ import annotations

import functools
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


# Query rows per attention block on CPU. Materialising every [T, S] logit at once makes attention bound by
# memory traffic (each softmax pass streams B*N*T*S floats); a block of queries keeps its logits in cache,
# and under a causal mask it skips the keys after the block (about half the work). Tuned on a 2-core x86 host
# for T ~ 650 (bench/RESULTS.md); accelerators get one block (XLA fuses there).
CPU_QUERY_BLOCK = 64
CPU_QUERY_BLOCK_CAUSAL = 128


def query_block(platform: str, t: int, *, causal: bool) -> int:
    """Query rows per attention block in a program lowered for `platform` ('cpu', 'tpu', 'cuda', 'rocm')."""
    if platform == "cpu":
        return min(t, CPU_QUERY_BLOCK_CAUSAL if causal else CPU_QUERY_BLOCK)
    return t


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, causal: bool = False,
              tail: int = 0) -> jax.Array:
    """Softmax attention with grouped kv heads.

    q: [B, T, N, H], k/v: [B, S, K, H], mask: [B, T, S] bool (True = may attend) or None -> [B, T, N, H].
    `causal=True` promises (S == T) that the mask hides from each of the first T - tail queries every later
    key among the first T - tail; the last `tail` slots (Blink's SR slots: physically last, causally before
    the text) are unconstrained. Keys that a block of queries cannot see are then never computed.
    A query row with no visible key (left padding) gets a uniform, finite output instead of NaN.
    """
    t, s = q.shape[1], k.shape[1]
    if causal and s != t:
        raise ValueError(f"causal attention needs as many keys as queries, got {s} keys for {t} queries")
    if not 0 <= tail <= t or (tail and not causal):
        raise ValueError(f"tail={tail} needs causal=True and 0 <= tail <= {t}")
    # The platform the program is lowered for decides the blocks, not the process's default backend: a program
    # exported from a CPU host for TPU (`jax.export`, bench/lower.py) gets the TPU's one block. Both forms are
    # traced; only the target's is lowered, so the compiler never sees a conditional.
    cpu_block = query_block("cpu", t, causal=causal)
    whole = functools.partial(_attention, causal=causal, tail=tail, block=t)
    if cpu_block == t:  # one block on every platform: nothing to choose
        return whole(q, k, v, mask)
    blocked = functools.partial(_attention, causal=causal, tail=tail, block=cpu_block)
    return jax.lax.platform_dependent(q, k, v, mask, cpu=blocked, default=whole)


def _attention(q, k, v, mask, *, causal: bool, tail: int, block: int) -> jax.Array:
    """`attention` in query blocks of `block` rows (the Blink tail in blocks of its own)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    # Heads-major layouts make both products plain batched matmuls over (B, K).
    qh = jnp.transpose((q * (1.0 / math.sqrt(h))).reshape(b, t, kv, g, h), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    kh = jnp.transpose(k, (0, 2, 1, 3))  # [B, K, S, H]
    vh = jnp.transpose(v, (0, 2, 1, 3))  # [B, K, S, H]
    head = t - tail if causal else t  # rows whose visible keys end at the row itself (plus the tail)
    starts = list(range(0, head, block)) + list(range(head, t, block))
    outs = []
    for start in starts:
        stop = min(start + block, head if start < head else t)
        rows = stop - start
        m_b = None if mask is None else mask[:, start:stop]  # [B, rows, S]
        if causal and stop <= head:  # keys [0, stop) and the tail
            k_b, v_b = _key_slots(kh, 2, stop, head), _key_slots(vh, 2, stop, head)
            m_b = None if m_b is None else _key_slots(m_b, 2, stop, head)
        else:
            k_b, v_b = kh, vh
        q_b = qh[:, :, :, start:stop].reshape(b, kv, g * rows, h)
        logits = jnp.einsum("BKQH,BKSH->BKQS", q_b, k_b, preferred_element_type=jnp.float32)
        logits = logits.reshape(b, kv, g, rows, -1)
        if m_b is not None:
            logits = jnp.where(m_b[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, g * rows, -1)
        outs.append(jnp.einsum("BKQS,BKSH->BKQH", probs, v_b).reshape(b, kv, g, rows, h))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [B, K, G, T, H]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


def _key_slots(x: jax.Array, axis: int, stop: int, head: int) -> jax.Array:
    """`x` along `axis` restricted to the slots [0, stop) and the tail [head, end)."""
    first = jax.lax.slice_in_dim(x, 0, stop, axis=axis)
    if head == x.shape[axis]:
        return first
    return jnp.concatenate([first, jax.lax.slice_in_dim(x, head, x.shape[axis], axis=axis)], axis=axis)
