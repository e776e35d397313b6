"""Qwen2.5-VL's vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`).

Patches come flattened and in the processor's order: image by image, frame by frame, 2x2 blocks of patches
(one merged token each) in row-major order over the merged grid. Attention runs within groups of patches:
windows of `window_cells x window_cells` merged cells, or whole frames in the `fullatt_block_indexes`
blocks. `VisionLayout` lists each group's patch indices (host-side, from `image_grid_thw`); a block gathers
its groups, attends within each (cost ~ P x group size, not P^2) and scatters back, so the residual stream
and the merged tokens stay in the processor's order (transformers permutes into windows and back instead).

Einsum letters: G groups, S patches per group, P patches (all images of a batch, packed), N heads, H head dim,
D vision width.
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
    """Where each packed patch sits, from `image_grid_thw` alone (host-side, see `vision_layout`).

    Groups hold patch indices in increasing order, padded at the end with P (no patch)."""
    hw: jax.Array  # [P, 2] int32: the patch's (row, column) in its image, for the 2-D rotary
    frames: jax.Array  # [G, S] int32: the patches of each (image, frame), for the full-attention blocks
    windows: jax.Array  # [G', S'] int32: the patches of each window, for the other blocks


def _groups(ids: np.ndarray) -> jax.Array:
    """Group id per patch [P] -> [G, S] patch indices per group, padded with P."""
    order = np.argsort(ids, kind="stable")
    _, counts = np.unique(ids, return_counts=True)
    out = np.full((counts.size, counts.max()), ids.size, np.int32)
    for g, members in enumerate(np.split(order, np.cumsum(counts)[:-1])):
        out[g, :members.size] = members
    return jnp.asarray(out)


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
    return VisionLayout(hw=jnp.asarray(np.concatenate(hw).astype(np.int32)), frames=_groups(np.concatenate(frame)),
                        windows=_groups(np.concatenate(window)))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.rope_theta = cfg.num_heads, cfg.rope_theta
        self.qkv = nnx.Linear(d, 3 * d, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(d, d, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, angles: jax.Array, groups: jax.Array) -> jax.Array:
        """x [P, D], angles [P, H/2] float32, groups [G, S] patch indices (P = padding) -> [P, D]."""
        p, d = x.shape
        g, s = groups.shape
        members = jnp.minimum(groups, p - 1)
        xg = self.qkv(x)[members]  # [G, S, 3D]
        q, k, v = jnp.moveaxis(xg.reshape(g, s, 3, self.num_heads, -1), 2, 0)  # 3 x [G, S, N, H]
        # transformers rotates in float32 whatever the weights' dtype.
        q = rotate(q.astype(jnp.float32), angles[members]).astype(x.dtype)
        k = rotate(k.astype(jnp.float32), angles[members]).astype(x.dtype)
        # Groups pack every patch once; only if some are shorter than S are padded keys to hide.
        mask = None if g * s == p else jnp.broadcast_to((groups < p)[:, None, :], (g, s, s))
        out = attention(q, k, v, mask).reshape(g * s, d)  # [G*S, D]
        out = jnp.zeros((p + 1, d), out.dtype).at[groups.reshape(-1)].set(out)[:p]  # padding lands in row P
        return self.proj(out)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, angles, groups):
        x = x + self.attn(self.norm1(x), angles, groups)
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
        for i, block in enumerate(self.blocks):
            x = block(x, angles, layout.frames if i in cfg.fullatt_block_indexes else layout.windows)
        return self.merger(x)
