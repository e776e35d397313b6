"""Pure forward passes of LLaVA: prefill (builds the KV cache) and one decode step.

Every function here takes the model and arrays and returns arrays, so the runner can jit them with
`nnx.split`/`nnx.merge`. The prefill reserves no decode room in the cache; `extend_cache` adds it.

Einsum letters: B batch, T prompt length, S cache length, K kv heads, H head dim, D model dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from blink_jax.model.llava import LlavaModel


@struct.dataclass
class KVCache:
    """Per-layer keys/values and which slots hold a real token, for decoding after a prefill.

    `valid` is per layer because Blink's SR tokens are in some layers' caches and not others.
    """
    k: tuple  # L x [B, S, K, H]
    v: tuple  # L x [B, S, K, H]
    valid: tuple  # L x [B, S] bool
    index: jax.Array  # [] int32: the next slot to write
    next_position: jax.Array  # [B] int32: position id of the next token


def position_ids(attention_mask: jax.Array) -> jax.Array:
    """[B, T] {0,1} -> [B, T] int32: 0, 1, 2, ... over real tokens (left padding gets 0), as HF generate."""
    pos = jnp.cumsum(attention_mask, axis=1) - 1
    return jnp.where(attention_mask > 0, pos, 0).astype(jnp.int32)


def causal_mask(order: jax.Array, valid: jax.Array) -> jax.Array:
    """Who may attend to whom, from each slot's causal rank and validity.

    order/valid: [B, S] -> [B, S, S] bool: query i sees key j iff j is valid and order[j] <= order[i].
    Every slot sees itself, so fully padded rows stay finite.
    """
    sees = (order[:, None, :] <= order[:, :, None]) & valid[:, None, :]
    return sees | jnp.eye(order.shape[1], dtype=bool)[None]


def prefill(model: LlavaModel, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array, *,
            all_logits: bool = True):
    """Vanilla LLaVA prefill. -> (logits [B, T, V] float32, KVCache with S = T).

    `all_logits=False` computes the logits of the last position only ([B, 1, V]), all that generation needs:
    the LM head over every prompt position is a large share of a prefill (XLA does not slice through it).
    """
    h = model.embed_multimodal(input_ids, pixel_values)
    valid = attention_mask > 0
    positions = position_ids(attention_mask)
    b, t = input_ids.shape
    mask = causal_mask(jnp.broadcast_to(jnp.arange(t), (b, t)), valid)
    ks, vs = [], []
    for layer in model.language_model.layers:
        h, _, k, v = layer(h, positions, mask, causal=True)
        ks.append(k)
        vs.append(v)
    logits = model.language_model.logits(h if all_logits else h[:, -1:])
    cache = KVCache(k=tuple(ks), v=tuple(vs), valid=(valid,) * len(ks), index=jnp.int32(t),
                    next_position=positions[:, -1] + 1)
    return logits, cache


def extend_cache(cache: KVCache, extra: int) -> KVCache:
    """Adds `extra` empty slots at the end of every layer's cache, for decoding."""
    pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    pad_valid = lambda x: jnp.pad(x, ((0, 0), (0, extra)))
    return cache.replace(k=tuple(map(pad_kv, cache.k)), v=tuple(map(pad_kv, cache.v)),
                         valid=tuple(map(pad_valid, cache.valid)))


def decode_step(model: LlavaModel, tokens: jax.Array, cache: KVCache):
    """One token per example. tokens: [B] int -> (logits [B, V] float32, updated cache)."""
    h = model.language_model.embed(tokens[:, None])  # [B, 1, D]
    positions = cache.next_position[:, None]
    ks, vs, valids = [], [], []
    for layer, k_cache, v_cache, valid in zip(model.language_model.layers, cache.k, cache.v, cache.valid):
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((valid.shape[0], 1), bool), cache.index, axis=1)
        h, _, k, v = layer(h, positions, valid[:, None, :], past=(k_cache, v_cache, cache.index))
        ks.append(k)
        vs.append(v)
        valids.append(valid)
    logits = model.language_model.logits(h)[:, 0]
    return logits, KVCache(k=tuple(ks), v=tuple(vs), valid=tuple(valids), index=cache.index + 1,
                           next_position=cache.next_position + 1)


def greedy_decode(model: LlavaModel, last_logits: jax.Array, cache: KVCache, *, max_new_tokens: int,
                  eos_token_id: int, pad_token_id: int) -> jax.Array:
    """Greedy continuation from the prefill's last logits [B, V]. -> tokens [B, max_new_tokens] int32.

    After an example emits EOS it is padded with `pad_token_id` (HF generate's convention).
    """
    cache = extend_cache(cache, max_new_tokens)
    b = last_logits.shape[0]

    def step(i, carry):
        logits, cache, finished, out = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        token = jnp.where(finished, pad_token_id, token)
        out = out.at[:, i].set(token)
        finished = finished | (token == eos_token_id)
        logits, cache = decode_step(model, token, cache)
        return logits, cache, finished, out

    init = (last_logits, cache, jnp.zeros((b,), bool), jnp.zeros((b, max_new_tokens), jnp.int32))
    return jax.lax.fori_loop(0, max_new_tokens, step, init)[3]
