"""LLaVA-1.5: CLIP vision tower -> projector -> image features spliced into the Llama token sequence.

`LlavaModel` implements the backbone protocol (`blink_jax.model.backbone`). Letters: B batch, T prompt length,
D model dim, G grid side, V visual tokens (G*G).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax.config import LlavaConfig
from blink_jax.model.backbone import LanguageModelBackbone, Prompt
from blink_jax.model.clip import VisionTower
from blink_jax.model.decoder import prompt_stream
from blink_jax.model.llama import LanguageModel
from blink_jax.model.projector import Projector


def position_ids(attention_mask: jax.Array) -> jax.Array:
    """[B, T] {0,1} -> [B, T] int32: 0, 1, 2, ... over real tokens (left padding gets 0), as HF generate."""
    pos = jnp.cumsum(attention_mask, axis=1) - 1
    return jnp.where(attention_mask > 0, pos, 0).astype(jnp.int32)


def visual_layout(input_ids: jax.Array, attention_mask: jax.Array, image_token_index: int, num_image_tokens: int,
                  grid: int) -> tuple[jax.Array, jax.Array]:
    """Where the visual grid sits in each (left-padded) row.

    -> visual_index [B, V] (slot of grid token v, row-major; with the "full" strategy the CLS token that leads
       the image run is not part of the grid), visual_end [B] (slot of the last image token).
    """
    is_image = (input_ids == image_token_index) & (attention_mask > 0)
    start = jnp.argmax(is_image, axis=1).astype(jnp.int32)  # first image token
    first_grid = start + (num_image_tokens - grid * grid)
    visual_index = first_grid[:, None] + jnp.arange(grid * grid, dtype=jnp.int32)[None]
    return visual_index, start + num_image_tokens - 1


class LlavaModel(LanguageModelBackbone, nnx.Module):
    """Parameters of LLaVA-1.5 and the stateless pieces of its forward pass (see `blink_jax.model.forward`)."""

    def __init__(self, cfg: LlavaConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.vision_tower = VisionTower(cfg.vision, param_dtype=param_dtype, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, param_dtype=param_dtype, rngs=rngs)
        self.language_model = LanguageModel(cfg.text, param_dtype=param_dtype, rngs=rngs)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, C, Hpx, Wpx] -> projected image tokens [B, P, D] (P = config.num_image_tokens)."""
        states = self.vision_tower.hidden_states(pixel_values, self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(jnp.concatenate(states, axis=-1))

    def embed_multimodal(self, input_ids: jax.Array, pixel_values: jax.Array) -> jax.Array:
        """Text embeddings with the `<image>` placeholder runs replaced by the image tokens, in order. -> [B, T, D]

        pixel_values [B, C, H, W] (one image run per row) or [B, N, C, H, W] (N runs per row, filled in order)."""
        text = self.language_model.embed(input_ids)
        if pixel_values.ndim == 5:
            b, n = pixel_values.shape[:2]
            image = self.image_features(pixel_values.reshape(b * n, *pixel_values.shape[2:]))  # [B N, P, D]
            image = image.reshape(b, n * image.shape[1], -1).astype(text.dtype)  # [B, N P, D]
        else:
            image = self.image_features(pixel_values).astype(text.dtype)  # [B, P, D]
        is_image = input_ids == self.config.image_token_index  # [B, T]
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image.shape[1] - 1)  # [B, T]
        spliced = jnp.take_along_axis(image, slot[..., None], axis=1)
        return jnp.where(is_image[..., None], spliced, text)

    # ---------------------------------------------------------------------------- the backbone protocol
    def prompt(self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array) -> Prompt:
        """input_ids/attention_mask [B, T] (left padded), pixel_values [B, C, H, W] or [B, N, C, H, W] -> the
        embedded prompt; with N images its visual grid is the first image's."""
        cfg = self.config
        h = self.embed_multimodal(input_ids, pixel_values)
        stream = prompt_stream(h, position_ids(attention_mask), attention_mask > 0)
        visual_index, visual_end = visual_layout(input_ids, attention_mask, cfg.image_token_index,
                                                 cfg.num_image_tokens, cfg.vision.grid)
        return Prompt(stream, visual_index, visual_end, grid=(cfg.vision.grid, cfg.vision.grid))
