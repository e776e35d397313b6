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


def check_state(blink: BlinkConfig | BlinkStatic, dim: int, state: nnx.State) -> None:
    """Raise `ValueError` unless a bare TokenSR state has the parameter paths and shapes of
    `TokenSRBank(blink, dim)`. Scale and region size leave no trace in the shapes: they are trusted to `blink`."""
    bank = nnx.eval_shape(lambda: TokenSRBank(blink, dim, rngs=nnx.Rngs(0)))
    expected = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(bank, nnx.Param))}
    given = {p: tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    if given != expected:
        wrong = sorted(set(given.items()) ^ set(expected.items()), key=str)[:4]
        raise ValueError(f"the TokenSR state does not fit BlinkConfig(layers={blink.layers}, tokensr_channels="
                         f"{blink.tokensr_channels}) on a model of hidden size {dim} (first differences, "
                         f"path and shape: {wrong}): pass the config it was trained with (load_tokensr returns "
                         f"both)")


def check_geometry(blink: BlinkConfig | BlinkStatic, dim: int, bank: TokenSRBank) -> None:
    """Raise `ValueError` unless `bank` was built for `blink`'s layers, region size, scale, TokenSR kind and
    channels, on a model of hidden size `dim`: the one check that a TokenSR bank fits a Blink run."""
    if tuple(bank.layers) != tuple(blink.layers):
        raise ValueError(f"the TokenSR parameters cover layers {tuple(bank.layers)} but BlinkConfig.layers="
                         f"{tuple(blink.layers)}: train TokenSR for these layers or use its layers")
    for layer in bank.layers:
        module = bank.for_layer(layer)
        if module.dim != dim:
            raise ValueError(f"the TokenSR of layer {layer} was trained for hidden size {module.dim} but this model's "
                             f"is {dim}: it belongs to another model; train TokenSR for this one")
        built = {"region_size": module.region_size, "scale": module.scale, "tokensr_kind": module.kind}
        if module.kind == "conv":
            built["tokensr_channels"] = module.conv1.out_features
        for field, value in built.items():
            if getattr(blink, field) != value:
                raise ValueError(f"the TokenSR of layer {layer} was built with {field}={value!r} but BlinkConfig."
                                 f"{field}={getattr(blink, field)!r}: use the config it was trained with "
                                 f"(`load_tokensr` returns it) or train TokenSR for this one")
