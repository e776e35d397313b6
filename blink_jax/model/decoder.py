"""The one walk over the decoder layers, with per-layer hooks.

Every forward pass of the project is this loop: the vanilla prefill and decode step, Blink's prefill (its
SGS + DTR is a hook at each participating layer), the saliency probe of training and calibration (a hook that
records and stops early) and the demo trainer's packed forward (its own attention and a grounding hook).

What flows from layer to layer is a `Stream` (the carry): hidden states, position ids, each slot's causal rank
and validity, and whatever state a hook keeps (`aux`). A hook runs after its layer and returns the stream the
next layer sees, plus a record that the walk collects:

    hooks = {12: blink_step, 13: blink_step, ...}        # layer index -> hook(index, stream, q, k)
    stream, kv, records = walk(layers, stream, hooks=hooks)

Einsum letters: B batch, S slots (prompt length, plus Blink's SR slots), D model dim, K kv heads, H head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct


@struct.dataclass
class Stream:
    """The carry between decoder layers.

    `order` is the causal rank of each slot: a slot sees the valid slots of lower or equal rank. Slots are
    in physical order except the last `tail` (Blink's SR slots: physically last, causally between the
    visual tokens and the text), which lets attention skip what a causal mask hides (`ops.attention`).
    """
    h: jax.Array  # [B, S, D]
    positions: jax.Array  # [B, S] int32 position ids
    order: jax.Array  # [B, S] int32 causal rank
    valid: jax.Array  # [B, S] bool: the slot holds a token
    aux: Any = None  # hook-owned state (Blink's DTR state, SR positions, ...)
    tail: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class LayerKV:
    """One layer's keys and values as attended to, and which slots were valid: a KV cache entry."""
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]
    valid: jax.Array  # [B, S] bool


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

    @classmethod
    def from_layers(cls, kv: Sequence[LayerKV], next_position: jax.Array) -> "KVCache":
        length = kv[0].k.shape[1]
        if any(entry.k.shape[1] != length for entry in kv):
            raise ValueError(f"cache lengths differ across layers: {[entry.k.shape[1] for entry in kv]}")
        return cls(k=tuple(e.k for e in kv), v=tuple(e.v for e in kv), valid=tuple(e.valid for e in kv),
                   index=jnp.int32(length), next_position=next_position)


# hook(layer index, stream after the layer, q [B, S, N, H], k [B, S, K, H]) -> (stream for the next layer, record)
Hook = Callable[[int, Stream, jax.Array, jax.Array], tuple[Stream, Any]]
# attend(q [B, S, N, H], k, v [B, S, K, H]) -> [B, S, N, H]: replaces the masked causal attention
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def causal_mask(order: jax.Array, valid: jax.Array) -> jax.Array:
    """Who may attend to whom, from each slot's causal rank and validity.

    order/valid: [B, S] -> [B, S, S] bool: query i sees key j iff j is valid and order[j] <= order[i].
    Every slot sees itself, so fully padded rows stay finite.
    """
    sees = (order[:, None, :] <= order[:, :, None]) & valid[:, None, :]
    return sees | jnp.eye(order.shape[1], dtype=bool)[None]


def prompt_stream(h: jax.Array, positions: jax.Array, valid: jax.Array) -> Stream:
    """The stream of a prompt in physical order: h [B, T, D], positions [B, T], valid [B, T]."""
    b, t = valid.shape
    return Stream(h=h, positions=positions, order=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                  valid=valid)


def walk(layers: Sequence, stream: Stream, *, hooks: Mapping[int, Hook] | None = None, stop: int | None = None,
         attend: Attend | None = None, cache: KVCache | None = None, scan: bool = False
         ) -> tuple[Stream, list[LayerKV], list[Any]]:
    """Runs `layers[:stop]` over `stream`. -> (final stream, each layer's LayerKV, the hooks' records in order).

    Without `cache` the stream is a whole prompt (causal attention over its own slots); with `cache` it is the
    next token of each example, attending to the cache with its own keys written at `cache.index`.
    `attend` replaces the masked attention of a prompt (the demo trainer's packed rows).
    `scan=True` runs each stretch of two or more hook-free layers of a prompt as one `jax.lax.scan` over their
    stacked parameters (one compiled layer body instead of one per layer); hooked layers stay unrolled.
    """
    hooks = hooks or {}
    layers = list(layers)[:stop]
    unknown = sorted(set(hooks) - set(range(len(layers))))
    if unknown:
        raise ValueError(f"hooks at layers {unknown}, but the walk runs layers 0..{len(layers) - 1}")
    kv, records = [], []
    index = 0
    while index < len(layers):
        run = _hook_free_run(index, len(layers), hooks) if scan and cache is None and attend is None else 1
        if run > 1:
            stream, run_kv = _scan_layers(layers[index:index + run], stream)
            kv.extend(run_kv)
            index += run
            continue
        layer = layers[index]
        if cache is None:
            mask = None if attend is not None else causal_mask(stream.order, stream.valid)
            valid = stream.valid
            h, q, k, v = layer(stream.h, stream.positions, mask, causal=True, tail=stream.tail, attend=attend)
        else:
            valid = jax.lax.dynamic_update_slice_in_dim(
                cache.valid[index], jnp.ones((stream.h.shape[0], 1), bool), cache.index, axis=1)
            h, q, k, v = layer(stream.h, stream.positions, valid[:, None, :],
                               past=(cache.k[index], cache.v[index], cache.index))
        kv.append(LayerKV(k, v, valid))
        stream = stream.replace(h=h)
        if index in hooks:
            stream, record = hooks[index](index, stream, q, k)
            records.append(record)
        index += 1
    return stream, kv, records


def _hook_free_run(start: int, stop: int, hooks: Mapping[int, Hook]) -> int:
    """How many layers from `start` on have no hook."""
    end = start
    while end < stop and end not in hooks:
        end += 1
    return end - start


def _scan_layers(layers: Sequence, stream: Stream) -> tuple[Stream, list[LayerKV]]:
    """Hook-free prompt layers as one scan over stacked parameters: the same numbers as running them in turn."""
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers])
    mask = causal_mask(stream.order, stream.valid)

    def body(h, state):
        h, _, k, v = nnx.merge(graphdef, state)(h, stream.positions, mask, causal=True, tail=stream.tail)
        return h, (k, v)

    h, (ks, vs) = jax.lax.scan(body, stream.h, stacked)
    return stream.replace(h=h), [LayerKV(ks[i], vs[i], stream.valid) for i in range(len(layers))]
