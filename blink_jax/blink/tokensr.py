"""TokenSR (BLINK.md §4): upsample an r x r grid of hidden states to (s r) x (s r).

Layout NHWC throughout (flax convs, kernels HWIO). Letters: B batch, r region side, s scale, D model
dim, C bottleneck channels.

Parameter paths (stable, for orbax and optax), in a `TokenSRBank`:
  layer_{L}/conv1/{kernel,bias}   [3, 3, D, C], [C]
  layer_{L}/conv2/{kernel,bias}   [3, 3, C, C], [C]
  layer_{L}/conv3/{kernel,bias}   [3, 3, C, D], [D]   (zero-initialised)
The "interp" kind has no parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax.blink.config import TOKENSR_KINDS, BlinkConfig, BlinkStatic


def bilinear_upsample(x: jax.Array, scale: int) -> jax.Array:  # [B, r, r, D] -> [B, s r, s r, D]
    """Half-pixel-centred bilinear resize, as torch `interpolate(bilinear, align_corners=False)`."""
    b, h, w, d = x.shape
    return jax.image.resize(x, (b, scale * h, scale * w, d), "bilinear")


class TokenSR(nnx.Module):
    """TokenSR_L for one layer: `interp` U = bilinear(X), or `conv` U + f(U) with f zero at init."""

    def __init__(
        self,
        dim: int,
        *,
        region_size: int,
        scale: int,
        kind: str = "interp",
        channels: int = 512,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if kind not in TOKENSR_KINDS:
            raise ValueError(f"TokenSR kind={kind!r} is unknown; use one of {TOKENSR_KINDS}")
        self.dim, self.region_size, self.scale, self.kind = dim, region_size, scale, kind
        self.dtype = dtype
        if kind == "conv":
            conv = lambda i, o, **kw: nnx.Conv(
                i, o, (3, 3), padding="SAME", use_bias=True, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs, **kw,
            )
            self.conv1 = conv(dim, channels)
            self.conv2 = conv(channels, channels)
            # Zero kernel and bias: an untrained conv TokenSR is exactly Blink-interp.
            self.conv3 = conv(channels, dim, kernel_init=nnx.initializers.zeros_init(),
                              bias_init=nnx.initializers.zeros_init())

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, r, r, D] -> [B, s r, s r, D] in `dtype`
        if x.shape[1:] != (self.region_size, self.region_size, self.dim):
            raise ValueError(
                f"TokenSR input has shape {x.shape}, expected [B, {self.region_size}, {self.region_size}, {self.dim}]"
            )
        u = bilinear_upsample(x.astype(self.dtype), self.scale)
        if self.kind == "interp":
            return u
        f = jax.nn.relu(self.conv1(u))
        f = jax.nn.relu(self.conv2(f))
        return u + self.conv3(f)


class TokenSRBank(nnx.Module):
    """One `TokenSR` per participating layer, as attributes `layer_{L}`."""

    def __init__(
        self,
        config: BlinkConfig | BlinkStatic,
        dim: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.layers = tuple(config.layers)
        for layer in self.layers:
            setattr(self, f"layer_{layer}", TokenSR(
                dim, region_size=config.region_size, scale=config.scale, kind=config.tokensr_kind,
                channels=config.tokensr_channels, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
            ))

    def for_layer(self, layer: int) -> TokenSR:
        if layer not in self.layers:
            raise KeyError(f"no TokenSR for layer {layer}; this bank covers layers {self.layers}")
        return getattr(self, f"layer_{layer}")

    def __getitem__(self, layer: int) -> TokenSR:
        return self.for_layer(layer)
