"""Analytic model FLOPs of LLaVA-1.5 (matmuls only, 2 per multiply-add): the work a question asks of the model,
independent of padding, batching and the device. Causal attention is counted as half the square.

`Dims` names the few sizes the count needs; `Dims.from_config` reads them from a `LlavaConfig` (bench's
`common.Size` has the same fields, so it can be passed as is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from blink_jax.config import LlavaConfig


@dataclasses.dataclass(frozen=True)
class Dims:
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    vocab: int
    image_size: int
    patch: int

    @classmethod
    def from_config(cls, cfg: LlavaConfig) -> "Dims":
        v, t = cfg.vision, cfg.text
        return cls(vision_width=v.hidden_size, vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
                   text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
                   text_kv_heads=t.num_key_value_heads, text_ffn=t.intermediate_size, vocab=t.vocab_size,
                   image_size=v.image_size, patch=v.patch_size)


def decoder_layer_flops(size: Dims, tokens: int, keys: int) -> float:
    """One Llama layer over `tokens` queries, each seeing `keys` keys on average."""
    d, f = size.text_width, size.text_ffn
    head = d // size.text_heads
    proj = d * head * (2 * size.text_heads + 2 * size.text_kv_heads)  # q, o, k, v
    return 2 * tokens * (proj + 3 * d * f) + 2 * 2 * tokens * keys * d


def image_flops(size: Dims, *, feature_layer: int = -2) -> float:
    """One image through CLIP up to `feature_layer` (patch embedding included) and the projector."""
    grid = size.image_size // size.patch
    patches, dv = grid * grid, size.vision_width
    vision_layers = size.vision_layers + feature_layer + 1 if feature_layer < 0 else feature_layer
    vision = 2 * patches * 3 * size.patch ** 2 * dv  # patch embedding
    vision += vision_layers * (2 * (patches + 1) * (4 * dv * dv + 8 * dv * dv) + 4 * (patches + 1) ** 2 * dv)
    projector = 2 * patches * (dv * size.text_width + size.text_width ** 2)
    return vision + projector


def prefill_flops(size: Dims, batch: int, length: int, *, feature_layer: int = -2,
                  sr_tokens: int = 0, sr_layers: int = 0) -> float:
    """Model FLOPs of one prefill: CLIP up to `feature_layer`, projector, decoder with causal attention (each
    query sees half the prompt on average), LM head at every position. `sr_tokens` extra tokens (Blink's SR
    slots) run through `sr_layers` decoder layers; they see the prefix and image before them and the text after
    them sees them, counted as seeing the whole prompt."""
    decoder = size.text_layers * decoder_layer_flops(size, length, length // 2)
    decoder += sr_layers * (decoder_layer_flops(size, sr_tokens, length) + 2 * 2 * length * sr_tokens * size.text_width)
    head = 2 * length * size.text_width * size.vocab
    return batch * (image_flops(size, feature_layer=feature_layer) + decoder + head)


def generate_flops(size: Dims, length: int, new_tokens: int, *, images: int = 1, layers: int | None = None,
                   feature_layer: int = -2, sr_tokens: int = 0, sr_layers: int = 0) -> float:
    """Model FLOPs of one example's greedy answer: `images` images through CLIP and the projector, the prefill of
    its `length` prompt tokens through the first `layers` decoder layers (default: all), and `new_tokens`
    answer tokens (their logits, and a decode step for each but the last, over the prompt and the tokens before
    it)."""
    layers = size.text_layers if layers is None else layers
    total = images * image_flops(size, feature_layer=feature_layer)
    total += layers * decoder_layer_flops(size, length, length // 2)
    total += sr_layers * (decoder_layer_flops(size, sr_tokens, length) + 2 * 2 * length * sr_tokens * size.text_width)
    head = 2 * size.text_width * size.vocab
    total += new_tokens * head
    for i in range(1, new_tokens):  # token i attends to the prompt (and SR tokens left at the end) and i tokens
        total += size.text_layers * decoder_layer_flops(size, 1, length + i)
    return float(total)


def probe_flops(size: Dims, length: int, layer: int, *, feature_layer: int = -2) -> float:
    """Model FLOPs of a saliency probe at `layer` (the crop mode's pass 1): the image, layers 0..layer-1, and of
    `layer` only the queries and keys the last token's attention needs (its output is never used)."""
    head = size.text_width // size.text_heads
    qk = 2 * length * size.text_width * head * (size.text_heads + size.text_kv_heads)
    scores = 2 * size.text_width * length  # the last token's attention over the prompt
    return generate_flops(size, length, 0, layers=layer, feature_layer=feature_layer) + qk + scores


def sr_layers_of(decision_layers: Sequence[int], expanded: Sequence[bool], num_layers: int) -> int:
    """How many decoder layers carry Blink's SR tokens: a decision after layer L_j acts on the layers from L_j + 1
    until the next decision, the last one's until the end."""
    total = 0
    bounds = list(decision_layers[1:]) + [num_layers - 1]
    for layer, until, on in zip(decision_layers, bounds, expanded):
        total += (until - layer) if on else 0
    return total
