"""Pure forward passes of a backbone (`blink_jax.model.backbone`): prefill, one decode step, greedy decoding.

Every function takes the model and arrays and returns arrays, so the runtime can jit them with
`nnx.split`/`nnx.merge`; each is `decoder.walk` with the hooks it needs (`hooks=None` is vanilla). The prefill
reserves no decode room in the cache; `extend_cache` adds it.

Letters: B batch, T prompt length, S cache length, K kv heads, H head dim, D model dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from blink_jax.model.backbone import Backbone, Prompt
from blink_jax.model.decoder import Hook, KVCache, Stream, causal_mask, walk  # noqa: F401  (the decoder's API)
from blink_jax.model.llava import position_ids  # noqa: F401


def prefill(model: Backbone, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array, *,
            all_logits: bool = True, scan: bool = False, **inputs):
    """Vanilla prefill. -> (logits [B, T, V] float32, KVCache with S = T).

    `all_logits=False` computes the logits of the last position only ([B, 1, V]), all that generation needs:
    the LM head over every prompt position is a large share of a prefill (XLA does not slice through it).
    `scan=True` runs the layers as one `jax.lax.scan` (`decoder.walk`): same numbers, a smaller program.
    `inputs`: what the model's `prompt` takes beyond the three arrays (Qwen2.5-VL's layout and positions).
    """
    logits, cache, _ = prefill_with_hooks(model, model.prompt(input_ids, pixel_values, attention_mask, **inputs),
                                          all_logits=all_logits, scan=scan)
    return logits, cache


def prefill_with_hooks(model: Backbone, prompt: Prompt, hooks: Mapping[int, Hook] | None = None, *,
                       all_logits: bool = True, prompt_length: int | None = None, scan: bool = False):
    """The prefill of an embedded prompt with per-layer hooks. -> (logits, KVCache, the hooks' records).

    Logits are taken at the first `prompt_length` slots (default: the prompt's own; hooks may append slots,
    e.g. Blink's SR slots). Layers whose cache is shorter than the last layer's (hooks that grow the stream) are
    padded with empty slots at the end, so that every layer's cache has one length and decoding writes at one
    index.
    """
    t = prompt.stream.h.shape[1] if prompt_length is None else prompt_length
    stream, kv, records = walk(model.decoder_layers, prompt.stream, hooks=hooks, scan=scan)
    logits = model.logits(stream.h[:, :t] if all_logits else stream.h[:, t - 1:t])
    length = kv[-1].k.shape[1]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    kv = [entry if entry.k.shape[1] == length else jax.tree.map(pad, entry) for entry in kv]
    next_position = prompt.stream.positions[..., t - 1] + 1
    return logits, KVCache.from_layers(kv, next_position), records


def extend_cache(cache: KVCache, extra: int) -> KVCache:
    """Adds `extra` empty slots at the end of every layer's cache, for decoding."""
    pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    pad_valid = lambda x: jnp.pad(x, ((0, 0), (0, extra)))
    return cache.replace(k=tuple(map(pad_kv, cache.k)), v=tuple(map(pad_kv, cache.v)),
                         valid=tuple(map(pad_valid, cache.valid)))


def decode_step(model: Backbone, tokens: jax.Array, cache: KVCache):
    """One token per example. tokens: [B] int -> (logits [B, V] float32, updated cache)."""
    positions = cache.next_position[..., None]  # [B, 1]
    one = tokens.shape + (1,)  # [B, 1]: order is unused against a cache
    stream = Stream(h=model.embed_tokens(tokens[:, None]), positions=positions, order=jnp.zeros(one, jnp.int32),
                    valid=jnp.ones(one, bool))
    stream, kv, _ = walk(model.decoder_layers, stream, cache=cache)
    logits = model.logits(stream.h)[:, 0]
    return logits, KVCache(k=tuple(e.k for e in kv), v=tuple(e.v for e in kv), valid=tuple(e.valid for e in kv),
                           index=cache.index + 1, next_position=cache.next_position + 1)


def greedy_decode(model: Backbone, last_logits: jax.Array, cache: KVCache, *, max_new_tokens: int,
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
