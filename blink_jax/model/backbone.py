"""The backbone protocol: the few things Blink, training and eval need from a vision-language model.

A model family (LLaVA-1.5 in `llava.py`, Qwen2.5-VL in `qwen2_5_vl/`) implements it; everything above talks
only to it (`LanguageModelBackbone` below writes the language-model half for a llama-style decoder):

- `prompt(input_ids, pixel_values, attention_mask, **inputs) -> Prompt`: the multimodal prompt embedded, as
  the decoder's first `Stream`, with where the visual grid sits in each row and its shape (Gh, Gw); a model
  that needs more inputs than these three (Qwen2.5-VL: the vision layout and M-RoPE positions) takes them by
  keyword;
- `decoder_layers`: the layers `decoder.walk` runs; each is called as
  `layer(h, positions, mask, past=None, causal=False, tail=0, attend=None) -> (h, q, k, v)`, with q and k the
  attention's queries and keys after the position encoding (what SGS reads);
- `embed_tokens(ids) -> h` and `logits(h) -> float32 logits`: the ends of the language model;
- `hidden_size`, `num_layers`.

Position ids are `[B, S]` here; a model with multi-dimensional positions (M-RoPE) uses `[C, B, S]` with the
slot axis last, which is what the Blink mechanics index along.

Letters: B batch, T prompt length, D model dim, V visual tokens (Gh * Gw).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
from flax import struct

from blink_jax.model.decoder import Stream


@struct.dataclass
class Prompt:
    """An embedded multimodal prompt: the decoder's input stream and the layout of its visual grid."""
    stream: Stream  # h [B, T, D], positions, order, valid
    visual_index: jax.Array  # [B, V] int32: slot of each grid token, row-major
    visual_end: jax.Array  # [B] int32: slot of the image run's last token (SR tokens rank right after it)
    grid: tuple[int, int] | None = struct.field(pytree_node=False, default=None)  # (Gh, Gw); None: rows differ


@runtime_checkable
class Backbone(Protocol):
    hidden_size: int
    num_layers: int

    @property
    def decoder_layers(self) -> Sequence: ...

    def prompt(self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array, **inputs) -> Prompt:
        ...

    def embed_tokens(self, ids: jax.Array) -> jax.Array: ...

    def logits(self, h: jax.Array) -> jax.Array: ...


class LanguageModelBackbone:
    """The protocol's language-model half for a model holding a `blink_jax.model.llama.LanguageModel` (or a
    subclass) as `self.language_model`: mix it into the model class and write only `prompt`."""

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.language_model.config.num_hidden_layers

    @property
    def decoder_layers(self) -> Sequence:
        return self.language_model.layers

    def embed_tokens(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return self.language_model.embed(ids)

    def logits(self, h: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] float32
        return self.language_model.logits(h)
