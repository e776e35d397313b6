"""LLaVA-1.5's `mlp2x_gelu` multimodal projector: linear -> activation -> linear."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from blink_jax.config import LlavaConfig
from blink_jax.model.ops import activation


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        d_out = cfg.text.hidden_size
        bias = cfg.multimodal_projector_bias
        self.act = activation(cfg.projector_hidden_act)
        self.linear_1 = nnx.Linear(d_in, d_out, use_bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(d_out, d_out, use_bias=bias, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):  # [B, P, Dv * len(feature_layers)] -> [B, P, D]
        return self.linear_2(self.act(self.linear_1(x)))
