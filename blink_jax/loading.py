"""`load_pretrained`: a runnable model from a converted orbax directory or a Hugging Face LLaVA directory, on
one device or with every parameter born sharded on a device mesh, or from a Hugging Face Qwen2.5-VL directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax import sharding
from blink_jax.config import ConfigError, LlavaConfig
from blink_jax.hub import resolve_model_dir
from blink_jax.model.llava import LlavaModel
from blink_jax.model.qwen2_5_vl.loading import load_pretrained as load_qwen
from blink_jax.model.qwen2_5_vl.runtime import Qwen
from blink_jax.runtime import Llava
from blink_jax.weights import hf_reader, orbax_io
from blink_jax.weights.params import abstract_model, check_finite, model_from_params, np_dtype


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    rules=sharding.LOGICAL_RULES) -> Llava | Qwen:
    """A runnable model from a directory (or Hub id): `blink_jax.Llava` for a converted orbax directory or a Hugging
    Face LLaVA directory, `Qwen` for a Hugging Face Qwen2.5-VL directory (its `config.json` model_type says which).

    With `mesh`, every LLaVA parameter is created already sharded as `rules` (`blink_jax.sharding`) say; see
    `load_model`. Qwen2.5-VL loads on one device.
    """
    path = resolve_model_dir(path)
    if model_type(path) == "qwen2_5_vl":
        if mesh is not None and mesh.devices.size > 1:
            raise ConfigError(f"{path} is a Qwen2.5-VL model, which loads on one device for now: leave mesh= out")
        _, model = load_qwen(path, dtype)
        return Qwen(model, model_dir=path)
    return Llava(load_model(path, dtype, mesh, rules), model_dir=path, mesh=mesh)


def model_type(path: str | os.PathLike) -> str | None:
    """The `model_type` of a model directory's config.json (None when it has none or cannot be read)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def inference_mesh(path: str | os.PathLike, spec: str | None, dtype=jnp.float32, rules=sharding.LOGICAL_RULES, *,
                   memory: int | None = None) -> jax.sharding.Mesh:
    """The mesh `--mesh spec` names (None: every device on the data axis, when the model fits one device), checked
    against the model at `path` from its config alone: a mesh that does not fit fails before any weight is read.
    `memory`: bytes per device (default: what the device reports)."""
    cfg = LlavaConfig.from_json(resolve_model_dir(path))
    _, abstract = nnx.split(abstract_model(cfg, dtype))
    shapes = {p: jax.ShapeDtypeStruct(var.shape, var.dtype) for p, var in nnx.to_flat_state(abstract)}
    return sharding.inference_mesh(spec, shapes, rules=rules, memory=memory)


def load_model(path: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
               rules=sharding.LOGICAL_RULES) -> LlavaModel:
    """The `LlavaModel` stored at `path` (converted or HF), its parameters cast to `dtype`.

    No mesh: the whole model is read into host memory, then put on the default device. With a mesh, no
    parameter ever exists whole on one device: a converted directory is restored by orbax straight into each
    parameter's sharding (each host reads only what its devices hold); an HF directory is read one tensor at a
    time, each tensor placed in its sharding before the next is read. `path` may be a Hugging Face Hub id.
    """
    path = resolve_model_dir(path)  # a directory, or a Hugging Face Hub id
    if not path.is_dir():
        raise FileNotFoundError(f"model directory '{path}' does not exist: give a Hugging Face LLaVA directory or "
                                f"one written by `python -m checkpoints_conversion.hf_to_orbax`")
    if mesh is None:
        if orbax_io.is_converted_dir(path):
            cfg, params = orbax_io.read_params(path)
        else:
            cfg = LlavaConfig.from_json(path)
            params = hf_reader.read_params(path, cfg)
        return model_from_params(cfg, params, dtype)

    cfg = LlavaConfig.from_json(path)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
    flat = nnx.to_flat_state(abstract)
    targets = {p: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding.named(
        mesh, sharding.param_logical_axes(p, len(var.shape)), var.shape, rules)) for p, var in flat}
    if orbax_io.is_converted_dir(path):
        arrays = orbax_io.restore_sharded(path, targets)
        for p, array in arrays.items():
            check_finite(p, array)
    else:
        arrays = {}
        for p, value in hf_reader.iter_params(path, cfg, np_dtype(jnp.dtype(dtype).name)):  # validated first
            check_finite(p, value)
            arrays[p] = jax.make_array_from_callback(value.shape, targets[p].sharding, lambda index, v=value: v[index])
            del value  # freed before the next tensor is read
    return nnx.merge(graphdef, nnx.from_flat_state([(p, var.replace(arrays[p])) for p, var in flat]))
