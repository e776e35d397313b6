"""LLaVA-1.5: CLIP vision tower -> projector -> image features spliced into the Llama token sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax.config import LlavaConfig
from blink_jax.model.clip import VisionTower
from blink_jax.model.llama import LanguageModel
from blink_jax.model.projector import Projector


class LlavaModel(nnx.Module):
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
        """Text embeddings with the `<image>` placeholder run replaced by the image tokens, in order. -> [B, T, D]"""
        text = self.language_model.embed(input_ids)
        image = self.image_features(pixel_values).astype(text.dtype)  # [B, P, D]
        is_image = input_ids == self.config.image_token_index  # [B, T]
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image.shape[1] - 1)  # [B, T]
        spliced = jnp.take_along_axis(image, slot[..., None], axis=1)
        return jnp.where(is_image[..., None], spliced, text)
