"""Pure forward passes of Qwen2.5-VL: prefill (builds the KV cache) and greedy generation.

Decoding is LLaVA's (`blink_jax.model.forward.decode_step` / `greedy_decode`): the Qwen2 language model has the
same `embed` / `layers` / `logits`, and a decode step's positions [B, 1] are broadcast to the three M-RoPE axes
as transformers does; they continue from `next_position` (the prompt's largest position + 1, i.e. transformers'
`rope_deltas` plus the number of real tokens).

`prepare_inputs` does the host-side part (M-RoPE positions and the vision layout from `image_grid_thw`); the
rest are pure functions of the model and arrays, to be jitted with `nnx.split` / `nnx.merge`.

Einsum letters: B batch, T prompt length, S cache length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from blink_jax.model import forward
from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.model.qwen2_5_vl.model import Qwen25VLModel
from blink_jax.model.qwen2_5_vl.positions import rope_index
from blink_jax.model.qwen2_5_vl.vision import VisionLayout, vision_layout


@struct.dataclass
class QwenInputs:
    input_ids: jax.Array  # [B, T] int32, left padded
    attention_mask: jax.Array  # [B, T] int32
    pixel_values: jax.Array  # [P, patch_dim]: every image's flattened patches, in prompt order
    layout: VisionLayout  # of the P patches
    positions: jax.Array  # [3, B, T] int32 M-RoPE positions
    next_position: jax.Array  # [B] int32


def prepare_inputs(cfg: Qwen25VLConfig, input_ids, attention_mask, pixel_values, image_grid_thw) -> QwenInputs:
    """The processor's outputs -> `QwenInputs`; checks that they agree with each other and the config."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, T]")
    if (attention_mask[:, :-1] > attention_mask[:, 1:]).any():
        raise ValueError("attention_mask has padding after a real token: pad on the left")
    if (input_ids == cfg.video_token_id).any():
        raise ValueError(f"input_ids hold the video token {cfg.video_token_id}: videos are not supported")
    patches = int(grid.prod(-1).sum())
    if tuple(pixel_values.shape) != (patches, cfg.vision.patch_dim):
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected ({patches}, "
                         f"{cfg.vision.patch_dim}) for image_grid_thw {grid.tolist()}")
    positions, next_position = rope_index(input_ids, attention_mask, grid, image_token_id=cfg.image_token_id,
                                          spatial_merge_size=cfg.vision.spatial_merge_size)
    return QwenInputs(input_ids=jnp.asarray(input_ids, jnp.int32),
                      attention_mask=jnp.asarray(attention_mask, jnp.int32), pixel_values=jnp.asarray(pixel_values),
                      layout=vision_layout(grid, cfg.vision),
                      positions=jnp.asarray(positions), next_position=jnp.asarray(next_position))


def prefill(model: Qwen25VLModel, inputs: QwenInputs, *, all_logits: bool = True):
    """-> (logits [B, T, V] float32, or [B, 1, V] of the last position with `all_logits=False`; KVCache, S = T).
    The backbone-generic prefill (`blink_jax.model.forward`) on this model's prompt."""
    logits, cache = forward.prefill(model, inputs.input_ids, inputs.pixel_values, inputs.attention_mask,
                                    all_logits=all_logits, layout=inputs.layout, positions=inputs.positions)
    return logits, cache.replace(next_position=inputs.next_position)


def generate(model: Qwen25VLModel, inputs: QwenInputs, *, max_new_tokens: int, eos_token_id: int,
             pad_token_id: int) -> jax.Array:
    """Greedy continuation (transformers' `generate(do_sample=False)`). -> [B, max_new_tokens] int32."""
    logits, cache = prefill(model, inputs, all_logits=False)
    return forward.greedy_decode(model, logits[:, 0], cache, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id)
