"""Build a `LlavaModel` from a flat parameter dict, and `load_pretrained` for converted or HF directories."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blink_jax.config import LlavaConfig
from blink_jax.hub import resolve_model_dir
from blink_jax.model.llava import LlavaModel


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the key(s) and what is wrong."""


def abstract_model(cfg: LlavaConfig, dtype=jnp.float32) -> LlavaModel:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory, no random init."""
    return nnx.eval_shape(lambda: LlavaModel(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)))


def param_shapes(cfg: LlavaConfig) -> dict[tuple, tuple]:
    """Our parameter path -> shape, for validating a checkpoint before reading it."""
    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))
    return {path: tuple(var.shape) for path, var in flat}


def model_from_params(cfg: LlavaConfig, params: dict[tuple, np.ndarray | jax.Array], dtype=jnp.float32) -> LlavaModel:
    """A `LlavaModel` whose parameters are exactly `params` (path -> array), cast to `dtype`.

    Every parameter must be given with its exact shape; nothing is randomly initialised.
    """
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    expected = {path for path, _ in flat}
    missing = sorted(expected - set(params), key=str)
    extra = sorted(set(params) - expected, key=str)
    if missing or extra:
        raise CheckpointError(f"parameters do not match the model: missing {[_p(p) for p in missing]}, "
                              f"unexpected {[_p(p) for p in extra]}")
    leaves = []
    for path, var in flat:
        value = params[path]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"parameter '{_p(path)}' has shape {tuple(value.shape)}, expected {tuple(var.shape)}")
        leaves.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def flat_params(model: LlavaModel) -> dict[tuple, jax.Array]:
    """The inverse of `model_from_params`."""
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _p(path) -> str:
    return ".".join(str(x) for x in path)


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32):
    """A runnable model (`blink_jax.Llava`) from a converted orbax directory or a Hugging Face LLaVA directory."""
    from blink_jax.runtime import Llava
    from checkpoints_conversion import hf_reader, orbax_io

    path = resolve_model_dir(path)  # a directory, or a Hugging Face Hub id
    if not path.is_dir():
        raise FileNotFoundError(f"model directory '{path}' does not exist: give a Hugging Face LLaVA directory or "
                                f"one written by `python -m checkpoints_conversion.hf_to_orbax`")
    if orbax_io.is_converted_dir(path):
        cfg, params = orbax_io.read_params(path)
    else:
        cfg = LlavaConfig.from_json(path)
        params = hf_reader.read_params(path, cfg)
    return Llava(model_from_params(cfg, params, dtype), model_dir=path)
