"""The Qwen2 decoder of Qwen2.5-VL: Llama's block with q/k/v biases (none on o_proj) and M-RoPE.

Only the parameters and the rotary differ from `blink_jax.model.llama`, so the classes here subclass it:
a layer is called exactly like a Llama layer, `layer(h, positions, mask, past=..., causal=..., tail=...)
-> (h, q, k, v)`, with positions [3, B, T] (temporal, height, width) or [B, T] for text-only steps,
and the language model offers the same `embed` / `layers` / `logits`, so one decoder loop drives both.

Einsum letters: B batch, T query length, N query heads, K kv heads, H head dim, D model dim.
"""

from __future__ import annotations

import jax
from flax import nnx

from blink_jax.model import llama
from blink_jax.model.qwen2_5_vl.config import QwenTextConfig
from blink_jax.model.qwen2_5_vl.rope import mrope_angles, rotate


class Attention(llama.Attention):
    def __init__(self, cfg: QwenTextConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_theta, self.mrope_section = cfg.rope_theta, cfg.mrope_section
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (d, n, h), (n, h), param_dtype=param_dtype, rngs=rngs)
        self.k_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), (k, h), param_dtype=param_dtype, rngs=rngs)
        self.v_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), (k, h), param_dtype=param_dtype, rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (n, h, d), None, param_dtype=param_dtype, rngs=rngs)

    def project(self, x: jax.Array, positions: jax.Array):
        """x: [B, T, D], positions: [3, B, T] or [B, T] -> q [B, T, N, H], k [B, T, K, H] (rotated), v."""
        q, k = self.q_proj(x), self.k_proj(x)
        angles = mrope_angles(positions, q.shape[-1], self.rope_theta, self.mrope_section)  # [B, T, H/2]
        return rotate(q, angles), rotate(k, angles), self.v_proj(x)


class DecoderLayer(llama.DecoderLayer):
    attention_class = Attention


class LanguageModel(llama.LanguageModel):
    """Token embeddings, Qwen2 layers, final norm and the LM head (absent when tied to the embeddings)."""
    layer_class = DecoderLayer
