"""Qwen2.5-VL: the vision tower's merged tokens spliced into the Qwen2 decoder's token sequence.

`Qwen25VLModel` implements the backbone protocol (`blink_jax.model.backbone`), so `blink_jax.model.forward`'s
prefill and decoding (the one decoder walk) run it. Letters: B batch, T prompt length, D model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax.model.backbone import LanguageModelBackbone, Prompt
from blink_jax.model.decoder import prompt_stream
from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.model.qwen2_5_vl.text import LanguageModel
from blink_jax.model.qwen2_5_vl.vision import VisionLayout, VisionTower


class Qwen25VLModel(LanguageModelBackbone, nnx.Module):
    """Parameters of Qwen2.5-VL and the stateless pieces of its forward pass (see `qwen2_5_vl.forward`)."""

    def __init__(self, cfg: Qwen25VLConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.visual = VisionTower(cfg.vision, param_dtype=param_dtype, rngs=rngs)
        self.language_model = LanguageModel(cfg.text, param_dtype=param_dtype, rngs=rngs)

    def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_values [P, patch_dim] of all images, packed -> merged tokens [P / 4, D] in prompt order."""
        return self.visual(pixel_values, layout)

    def embed_multimodal(self, input_ids: jax.Array, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """Text embeddings with the image-token slots filled by the merged tokens, in batch-major order
        (transformers' `masked_scatter`). -> [B, T, D]"""
        text = self.language_model.embed(input_ids)
        image = self.image_features(pixel_values, layout).astype(text.dtype)  # [M, D]
        is_image = input_ids == self.config.image_token_id  # [B, T]
        slot = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
        spliced = image[jnp.clip(slot, 0, image.shape[0] - 1)]  # [B, T, D]
        return jnp.where(is_image[..., None], spliced, text)

    # ---------------------------------------------------------------------------- the backbone protocol
    def prompt(self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array, *,
               layout: VisionLayout, positions: jax.Array, grid: tuple[int, int] | None = None) -> Prompt:
        """input_ids/attention_mask [B, T] (left padded), pixel_values [P, patch_dim] packed, M-RoPE positions
        [3, B, T] -> the embedded prompt. `grid` (Gh, Gw): every row's one image has this merged grid, which
        places the visual grid at the row's image run; without it the prompt has no grid (no Blink)."""
        h = self.embed_multimodal(input_ids, pixel_values, layout)
        stream = prompt_stream(h, positions, attention_mask > 0)
        b = input_ids.shape[0]
        if grid is None:
            return Prompt(stream, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32), grid=None)
        is_image = (input_ids == self.config.image_token_id) & (attention_mask > 0)
        start = jnp.argmax(is_image, axis=1).astype(jnp.int32)
        count = grid[0] * grid[1]
        return Prompt(stream, start[:, None] + jnp.arange(count, dtype=jnp.int32)[None], start + count - 1,
                      grid=tuple(grid))
