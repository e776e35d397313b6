"""TokenSR (BLINK.md §4): upsample an r x r grid of hidden states to (s r) x (s r).

Every kind is U + f(U), U the bilinear upsampling and f a learned residual (none for `interp`) whose last layer is
zero-initialised, so an untrained TokenSR is exactly Blink-interp. The kinds are the rows of `KINDS`: adding one
is a build function (its parameters), a residual function, its name in `config.TOKENSR_KINDS` and its parameter
axes in `blink_jax.sharding.PARAM_AXES` (docs/ARCHITECTURE.md).

Layout NHWC throughout (flax convs, kernels HWIO). Letters: B batch, r region side, s scale, D model
dim, C bottleneck channels.

Parameter paths (stable, for orbax and optax), in a `TokenSRBank`:
  conv   layer_{L}/conv1/{kernel,bias}    [3, 3, D, C], [C]
         layer_{L}/conv2/{kernel,bias}    [3, 3, C, C], [C]
         layer_{L}/conv3/{kernel,bias}    [3, 3, C, D], [D]   (zero-initialised)
  mlp    layer_{L}/dense1/{kernel,bias}   [D, C], [C]          (the same per token: 1 x 1 "convolutions")
         layer_{L}/dense2/{kernel,bias}   [C, C], [C]
         layer_{L}/dense3/{kernel,bias}   [C, D], [D]          (zero-initialised)
The "interp" kind has no parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax.blink.config import TOKENSR_KINDS, BlinkConfig, BlinkStatic


def bilinear_upsample(x: jax.Array, scale: int) -> jax.Array:  # [B, r, r, D] -> [B, s r, s r, D]
    """Half-pixel-centred bilinear resize, as torch `interpolate(bilinear, align_corners=False)`."""
    b, h, w, d = x.shape
    return jax.image.resize(x, (b, scale * h, scale * w, d), "bilinear")


def _build_conv(m: "TokenSR", dim: int, channels: int, **kw) -> None:
    conv = lambda i, o, **init: nnx.Conv(i, o, (3, 3), padding="SAME", use_bias=True, **kw, **init)
    m.conv1 = conv(dim, channels)
    m.conv2 = conv(channels, channels)
    m.conv3 = conv(channels, dim, kernel_init=nnx.initializers.zeros_init(), bias_init=nnx.initializers.zeros_init())


def _conv_residual(m: "TokenSR", u: jax.Array) -> jax.Array:  # [B, s r, s r, D] -> same
    return m.conv3(jax.nn.relu(m.conv2(jax.nn.relu(m.conv1(u)))))


def _build_mlp(m: "TokenSR", dim: int, channels: int, **kw) -> None:
    dense = lambda i, o, **init: nnx.Linear(i, o, use_bias=True, **kw, **init)
    m.dense1 = dense(dim, channels)
    m.dense2 = dense(channels, channels)
    m.dense3 = dense(channels, dim, kernel_init=nnx.initializers.zeros_init(),
                     bias_init=nnx.initializers.zeros_init())


def _mlp_residual(m: "TokenSR", u: jax.Array) -> jax.Array:  # [B, s r, s r, D] -> same, token by token
    return m.dense3(jax.nn.relu(m.dense2(jax.nn.relu(m.dense1(u)))))


class Kind(NamedTuple):
    """A TokenSR kind: how to build its parameters on a `TokenSR` and its residual f(U); None for no parameters."""
    build: Callable[..., None] | None
    residual: Callable[["TokenSR", jax.Array], jax.Array] | None


KINDS: dict[str, Kind] = {
    "interp": Kind(None, None),
    "conv": Kind(_build_conv, _conv_residual),
    "mlp": Kind(_build_mlp, _mlp_residual),
}
if tuple(KINDS) != TOKENSR_KINDS:
    raise ImportError(f"TokenSR kinds {tuple(KINDS)} and config.TOKENSR_KINDS {TOKENSR_KINDS} differ: keep one list")


def trained(kind: str) -> bool:
    """Whether a TokenSR kind has parameters (is trained), e.g. conv and mlp; interp has none."""
    return KINDS[kind].build is not None


class TokenSR(nnx.Module):
    """TokenSR_L for one layer: U = bilinear(X), plus the kind's residual f(U) (zero at init)."""

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
        if kind not in KINDS:
            raise ValueError(f"TokenSR kind={kind!r} is unknown; use one of {tuple(KINDS)}")
        self.dim, self.region_size, self.scale, self.kind = dim, region_size, scale, kind
        self.dtype = dtype
        self.channels = channels if trained(kind) else None  # the bottleneck C built
        if trained(kind):
            KINDS[kind].build(self, dim, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, r, r, D] -> [B, s r, s r, D] in `dtype`
        if x.shape[1:] != (self.region_size, self.region_size, self.dim):
            raise ValueError(
                f"TokenSR input has shape {x.shape}, expected [B, {self.region_size}, {self.region_size}, {self.dim}]"
            )
        u = bilinear_upsample(x.astype(self.dtype), self.scale)
        residual = KINDS[self.kind].residual
        return u if residual is None else u + residual(self, u)


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
        if module.channels is not None:
            built["tokensr_channels"] = module.channels
        for field, value in built.items():
            if getattr(blink, field) != value:
                raise ValueError(f"the TokenSR of layer {layer} was built with {field}={value!r} but BlinkConfig."
                                 f"{field}={getattr(blink, field)!r}: use the config it was trained with "
                                 f"(`load_tokensr` returns it) or train TokenSR for this one")
