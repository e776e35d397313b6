"""CLIP ViT vision tower (transformers' `CLIPVisionModel`), returning the hidden states LLaVA selects.

Einsum letters: B batch, P patches (+1 for CLS), N heads, H head dim, D vision width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax.config import VisionConfig
from blink_jax.model.ops import activation, attention


def _layer_norm(dim: int, eps: float, param_dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, param_dtype=param_dtype, rngs=rngs)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, (cfg.patch_size,) * 2, strides=cfg.patch_size,
                                        padding="VALID", use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype))
        self.position_embedding = nnx.Embed(cfg.num_patches + 1, d, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [B, C, Hpx, Wpx] -> [B, P+1, D]
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.patch_embedding.kernel.dtype)
        patches = self.patch_embedding(x)  # [B, G, G, D]
        b, g, _, d = patches.shape
        patches = patches.reshape(b, g * g, d)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, d)).astype(patches.dtype)
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...][None]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        proj = lambda: nnx.Einsum("BPD,DNH->BPNH", (d, n, h), (n, h), param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = proj(), proj(), proj()
        self.out_proj = nnx.Einsum("BPNH,NHD->BPD", (n, h, d), (d,), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, P, D]
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask=None)
        return self.out_proj(out)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.act = activation(cfg.hidden_act)
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype, rngs)
        self.self_attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype, rngs)
        self.mlp = VisionMLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([VisionLayer(cfg, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])


class VisionTower(nnx.Module):
    """CLIP vision transformer. `post_layernorm` is kept only so checkpoints round-trip: LLaVA never uses it."""

    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg, param_dtype=param_dtype, rngs=rngs)
        self.pre_layrnorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype, rngs)
        self.encoder = VisionEncoder(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_layernorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype, rngs)

    def hidden_states(self, pixel_values: jax.Array, layers: tuple[int, ...]) -> list[jax.Array]:
        """HF's `hidden_states[i]` for each i in `layers` (0 = embeddings after pre_layrnorm), each [B, P+1, D].

        Only the encoder layers up to the deepest requested one are run.
        """
        n = self.config.num_hidden_layers
        wanted = [i % (n + 1) for i in layers]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)]):
            x = layer(x)
            states[i + 1] = x
        return [states[i] for i in wanted]
