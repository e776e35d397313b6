"""`load_pretrained`: a runnable model from a converted orbax directory or a Hugging Face directory, of any model
family (LLaVA-1.5, Qwen2.5-VL: `blink_jax.families`), on one device or with every parameter born sharded on a
device mesh."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax import sharding
from blink_jax.families import QWEN2_5_VL, family_of
from blink_jax.hub import resolve_model_dir
from blink_jax.model.qwen2_5_vl.runtime import Qwen
from blink_jax.runtime import Llava
from blink_jax.weights import hf_reader, orbax_io
from blink_jax.weights.params import abstract_model, check_finite, model_from_params, np_dtype


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    rules=sharding.LOGICAL_RULES) -> Llava | Qwen:
    """A runnable model from a directory (or Hub id), Hugging Face or converted: `blink_jax.Llava` for LLaVA, `Qwen`
    for Qwen2.5-VL (the `model_type` of its `config.json` says which).

    With `mesh`, every parameter is created already sharded as `rules` (`blink_jax.sharding`) say; see
    `load_model`.
    """
    path = resolve_model_dir(path)
    model = load_model(path, dtype, mesh, rules)
    if family_of(path) is QWEN2_5_VL:
        return Qwen(model, model_dir=path, mesh=mesh)
    return Llava(model, model_dir=path, mesh=mesh)


def inference_mesh(path: str | os.PathLike, spec: str | None, dtype=jnp.float32, rules=sharding.LOGICAL_RULES, *,
                   memory: int | None = None) -> jax.sharding.Mesh:
    """The mesh `--mesh spec` names (None: every device on the data axis, when the model fits one device), checked
    against the model at `path` from its config alone: a mesh that does not fit fails before any weight is read.
    `memory`: bytes per device (default: what the device reports)."""
    path = resolve_model_dir(path)
    family = family_of(path)
    _, abstract = nnx.split(abstract_model(family.config(path), dtype, family.model_class))
    shapes = {p: jax.ShapeDtypeStruct(var.shape, var.dtype) for p, var in nnx.to_flat_state(abstract)}
    return sharding.inference_mesh(spec, shapes, rules=rules, memory=memory)


def load_model(path: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
               rules=sharding.LOGICAL_RULES):
    """The model stored at `path` (converted or HF; `LlavaModel` or `Qwen25VLModel` by its family), its parameters
    cast to `dtype`.

    No mesh: the whole model is read into host memory, then put on the default device. With a mesh, no
    parameter ever exists whole on one device: a converted directory is restored by orbax straight into each
    parameter's sharding (each host reads only what its devices hold); an HF directory is read one tensor at a
    time, each tensor placed in its sharding before the next is read. `path` may be a Hugging Face Hub id.
    """
    path = resolve_model_dir(path)  # a directory, or a Hugging Face Hub id
    if not path.is_dir():
        raise FileNotFoundError(f"model directory '{path}' does not exist: give a Hugging Face model directory or "
                                f"one written by `python -m checkpoints_conversion.hf_to_orbax`")
    family = family_of(path)
    converted = orbax_io.is_converted_dir(path)
    if mesh is None:
        if converted:
            cfg, params = orbax_io.read_params(path, family)
        else:
            cfg = family.config(path)
            params = hf_reader.read_params(path, cfg, family=family)
        return model_from_params(cfg, params, dtype, family.model_class)

    cfg = family.config(path)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, family.model_class))
    flat = nnx.to_flat_state(abstract)
    targets = {p: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding.named(
        mesh, sharding.param_logical_axes(p, len(var.shape)), var.shape, rules)) for p, var in flat}
    if converted:
        orbax_io.check_family(path, family)
        arrays = orbax_io.restore_sharded(path, targets)
        for p, array in arrays.items():
            check_finite(p, array)
    else:
        arrays = {}
        for p, value in hf_reader.iter_params(path, cfg, np_dtype(jnp.dtype(dtype).name), family):  # validated first
            check_finite(p, value)
            arrays[p] = jax.make_array_from_callback(value.shape, targets[p].sharding, lambda index, v=value: v[index])
            del value  # freed before the next tensor is read
    return nnx.merge(graphdef, nnx.from_flat_state([(p, var.replace(arrays[p])) for p, var in flat]))
