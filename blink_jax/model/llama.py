"""Llama decoder (Vicuna in LLaVA-1.5): pre-norm blocks with RoPE, RMSNorm, SwiGLU and grouped-query attention.

Layers take explicit positions and an explicit attention mask so the same code serves the vanilla
prefill, Blink's buffers (SR slots out of physical order) and decoding against a KV cache.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, H head dim, D model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax.config import TextConfig
from blink_jax.model.ops import RMSNorm, activation, apply_rope, attention


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.rope_theta = cfg.rope_theta
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (d, n, h), (n, h) if bias else None, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), (k, h) if bias else None, param_dtype=param_dtype, rngs=rngs)
        self.v_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), (k, h) if bias else None, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (n, h, d), (d,) if bias else None, param_dtype=param_dtype, rngs=rngs)

    def project(self, x: jax.Array, positions: jax.Array):
        """x: [B, T, D], positions: [B, T] -> q [B, T, N, H], k [B, T, K, H] (RoPE applied), v [B, T, K, H]."""
        q = apply_rope(self.q_proj(x), positions, self.rope_theta)
        k = apply_rope(self.k_proj(x), positions, self.rope_theta)
        return q, k, self.v_proj(x)

    def output(self, q, k, v, mask, causal: bool = False, tail: int = 0, attend=None) -> jax.Array:  # -> [B, T, D]
        out = attend(q, k, v) if attend is not None else attention(q, k, v, mask, causal=causal, tail=tail)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.act = activation(cfg.hidden_act)
        self.gate_proj = nnx.Linear(d, f, use_bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.up_proj = nnx.Linear(d, f, use_bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = nnx.Linear(f, d, use_bias=bias, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    attention_class = Attention  # a model family with other projections or rotary (Qwen2) subclasses it

    def __init__(self, cfg: TextConfig, *, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = self.attention_class(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array, positions: jax.Array, mask: jax.Array, past: tuple | None = None,
                 causal: bool = False, tail: int = 0, attend=None):
        """One block.

        h: [B, T, D]; positions: [B, T]; mask: [B, T, S] over the keys attended to, which are this call's own
        T keys, or with `past = (k_cache, v_cache, write_index)` the cache after writing them at write_index.
        `causal=True` (no `past`) promises that `mask` hides every later slot but the last `tail` ones, so
        attention skips those keys (see `ops.attention`). `attend(q, k, v) -> [B, T, N, H]` replaces the masked
        attention (then `mask` is unused).
        Returns (h [B, T, D], q [B, T, N, H], k, v) with k/v the keys attended to ([B, S, K, H]).
        """
        q, k, v = self.self_attn.project(self.input_layernorm(h), positions)
        if past is not None:
            k_cache, v_cache, index = past
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        causal = causal and past is None
        h = h + self.self_attn.output(q, k, v, mask, causal=causal, tail=tail if causal else 0, attend=attend)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, q, k, v


class LanguageModel(nnx.Module):
    """Token embeddings, decoder layers, final norm and the LM head (absent when tied to the embeddings)."""
    layer_class = DecoderLayer

    def __init__(self, cfg: TextConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([self.layer_class(cfg, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, param_dtype=param_dtype,
                                      rngs=rngs)

    def embed(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return self.embed_tokens(ids)

    def logits(self, h: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] in float32
        h = self.norm(h)
        if self.config.tie_word_embeddings:
            out = jnp.einsum("BTD,VD->BTV", h, self.embed_tokens.embedding[...])
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)
