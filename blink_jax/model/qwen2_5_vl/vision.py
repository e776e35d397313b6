"""Qwen2.5-VL's vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`).

Patches come flattened and in the processor's order: image by image, frame by frame, 2x2 blocks of patches
(one merged token each) in row-major order over the merged grid. transformers permutes them into windows
and back; attention only sees which keys share a window, so here every block attends in the original order
under a mask built from segment ids (`VisionLayout`), and the merged tokens come out in the processor's
order without any permutation.

Einsum letters: P patches (all images of a batch, packed), N heads, H head dim, D vision width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from blink_jax.model.llama import MLP
from blink_jax.model.ops import RMSNorm, attention, gelu_exact
from blink_jax.model.qwen2_5_vl.config import QwenVisionConfig
from blink_jax.model.qwen2_5_vl.rope import rotate, vision_angles


@struct.dataclass
class VisionLayout:
    """Where each packed patch sits, from `image_grid_thw` alone (host-side, see `vision_layout`)."""
    hw: jax.Array  # [P, 2] int32: the patch's (row, column) in its image, for the 2-D rotary
    frame: jax.Array  # [P] int32: one id per (image, frame): the full-attention blocks attend within it
    window: jax.Array  # [P] int32: one id per (image, frame, window): the other blocks attend within it


def vision_layout(grid_thw: np.ndarray, cfg: QwenVisionConfig) -> VisionLayout:
    """grid_thw [I, 3] (patches per image along t, h, w) -> the layout of their P = sum(t*h*w) patches."""
    m, wc = cfg.spatial_merge_size, cfg.window_cells
    hw, frame, window = [], [], []
    n_frames = n_windows = 0
    for t, h, w in np.asarray(grid_thw, np.int64).tolist():
        if h % m or w % m:
            raise ValueError(f"image grid {h}x{w} patches is not a multiple of spatial_merge_size={m}: resize the "
                             f"image to multiples of {m * cfg.patch_size} px (the processor's smart resize does)")
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        rows, cols = block(rows), block(cols)
        windows_across = -(-(w // m) // wc)
        win = (rows // m // wc) * windows_across + (cols // m // wc)
        per_frame = -(-(h // m) // wc) * windows_across
        for f in range(t):
            hw.append(np.stack([rows, cols], axis=-1))
            frame.append(np.full(h * w, n_frames))
            window.append(win + n_windows)
            n_frames += 1
            n_windows += per_frame
    cat = lambda xs: jnp.asarray(np.concatenate(xs).astype(np.int32))
    return VisionLayout(hw=cat(hw), frame=cat(frame), window=cat(window))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.rope_theta = cfg.num_heads, cfg.rope_theta
        self.qkv = nnx.Linear(d, 3 * d, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(d, d, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array) -> jax.Array:
        """x [P, D], angles [P, H/2] float32, mask [P, P] bool -> [P, D]."""
        p, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.num_heads, -1), 1, 0)  # 3 x [P, N, H]
        # transformers rotates in float32 whatever the weights' dtype.
        q = rotate(q.astype(jnp.float32), angles).astype(x.dtype)
        k = rotate(k.astype(jnp.float32), angles).astype(x.dtype)
        out = attention(q[None], k[None], v[None], mask[None])[0]  # [P, N, H]
        return self.proj(out.reshape(p, d))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, angles, mask):
        x = x + self.attn(self.norm1(x), angles, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 block of patches (consecutive in the packed order) -> one LLM-width token."""

    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.group = cfg.spatial_merge_size ** 2
        wide = cfg.hidden_size * self.group
        self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.fc1 = nnx.Linear(wide, wide, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(wide, cfg.out_hidden_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [P, D] -> [P / 4, out_hidden_size]
        x = self.ln_q(x).reshape(x.shape[0] // self.group, -1)
        return self.fc2(gelu_exact(self.fc1(x)))


class VisionTower(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        # transformers' Conv3d has kernel = stride = the whole flattened patch: a linear map of it.
        self.patch_embed = nnx.Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, param_dtype=param_dtype,
                                      rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_values [P, patch_dim] (the processor's flattened patches) -> merged tokens [P / 4, D_text]."""
        cfg = self.config
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))
        angles = vision_angles(layout.hw, cfg.head_dim, cfg.rope_theta)
        full = layout.frame[:, None] == layout.frame[None, :]  # [P, P]
        windowed = layout.window[:, None] == layout.window[None, :]
        for i, block in enumerate(self.blocks):
            x = block(x, angles, full if i in cfg.fullatt_block_indexes else windowed)
        return self.merger(x)
