"""The model's parameter set: its abstract structure and shapes, a `LlavaModel` from a flat dict and back."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from blink_jax.model.llava import LlavaModel


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the key(s) and what is wrong."""


def check_finite(path, value) -> None:
    """Raise `CheckpointError` naming the parameter if `value` (numpy or jax) holds NaN or infinity: such weights
    load and run, and every answer comes out empty (a silent wrong number)."""
    finite = np.asarray(jnp.isfinite(value)) if isinstance(value, jax.Array) else np.isfinite(np.asarray(value))
    if not finite.all():
        bad = int(finite.size - finite.sum())
        raise CheckpointError(f"parameter '{path_str(path)}' holds {bad} NaN or infinite value(s) of {finite.size}: "
                              f"the checkpoint is corrupt; download or convert it again")


def abstract_model(cfg, dtype=jnp.float32, model_class=LlavaModel):
    """The model's structure with `ShapeDtypeStruct` leaves: no memory, no random init. `model_class` is the
    backbone built from `cfg` (`LlavaModel` by default; any model package's class taking (cfg, param_dtype, rngs))."""
    return nnx.eval_shape(lambda: model_class(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=8)
def param_shapes(cfg, model_class=LlavaModel) -> dict[tuple, tuple]:
    """Our parameter path -> shape, for validating a checkpoint before reading it. Cached (tracing the model's
    shapes takes a while): do not mutate the result."""
    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg, model_class=model_class), nnx.Param))
    return {path: tuple(var.shape) for path, var in flat}


def model_from_params(cfg, params: dict[tuple, np.ndarray | jax.Array], dtype=jnp.float32, model_class=LlavaModel):
    """A model (`model_class`, LLaVA by default) whose parameters are exactly `params` (path -> array), cast to
    `dtype`. Every parameter must be given with its exact shape and finite values; nothing is randomly initialised.
    """
    model = abstract_model(cfg, dtype, model_class)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    expected = {path for path, _ in flat}
    missing = sorted(expected - set(params), key=str)
    extra = sorted(set(params) - expected, key=str)
    if missing or extra:
        raise CheckpointError(f"parameters do not match the model: missing {[path_str(p) for p in missing]}, "
                              f"unexpected {[path_str(p) for p in extra]}")
    leaves = []
    for path, var in flat:
        value = params[path]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"parameter '{path_str(path)}' has shape {tuple(value.shape)}, "
                                  f"expected {tuple(var.shape)}")
        check_finite(path, value)
        leaves.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def flat_params(model: LlavaModel) -> dict[tuple, jax.Array]:
    """The inverse of `model_from_params`."""
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def np_dtype(dtype) -> np.dtype | None:
    """None, a name ('bfloat16', 'float32', ...) or a numpy/jax dtype -> numpy dtype (bf16 via ml_dtypes)."""
    if dtype is None:
        return None
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) in ("bfloat16", "bf16") else np.dtype(dtype)


def path_str(path) -> str:
    """("language_model", "layers", 0, "mlp") -> "language_model.layers.0.mlp"; jax tree paths (DictKey,
    SequenceKey, ...) read the same."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
