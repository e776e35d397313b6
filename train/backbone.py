"""The frozen LLaVA backbone, loaded one tensor at a time straight into its shardings, and its fingerprint.

`blink_jax.load_pretrained` puts the whole model on one device, which a 7B model in float32 does not fit
on a 16 GiB chip; here each tensor goes from the checkpoint reader to `make_array_from_callback` with the
sharding that `train.sharding` assigns to its path, so no device ever holds more than its shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blink_jax.config import LlavaConfig
from blink_jax.hub import resolve_model_dir
from blink_jax.loading import CheckpointError, abstract_model
from train import sharding


@dataclasses.dataclass(frozen=True)
class Backbone:
    config: LlavaConfig
    graphdef: nnx.GraphDef
    params: nnx.State  # sharded jax Arrays; never updated, never donated
    fingerprint: str  # identifies the weights (and dtype) for the teacher cache


def load_backbone(model_dir: str | os.PathLike, mesh: jax.sharding.Mesh, dtype=jnp.float32,
                  rules=sharding.LOGICAL_RULES) -> Backbone:
    """The LLaVA at `model_dir` (HF or converted) with every parameter born sharded on `mesh`."""
    from checkpoints_conversion import hf_reader, orbax_io

    model_dir = resolve_model_dir(model_dir)  # a directory, or a Hugging Face Hub id
    cfg = LlavaConfig.from_json(model_dir)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
    targets = dict(nnx.to_flat_state(abstract))
    np_dtype = hf_reader.np_dtype(jnp.dtype(dtype).name)
    if orbax_io.is_converted_dir(model_dir):
        pairs = (item for group in orbax_io.iter_groups(model_dir) for item in group.items())
    else:
        pairs = hf_reader.iter_params(model_dir, cfg)
    arrays = {}
    for path, value in pairs:
        if path not in targets:
            raise CheckpointError(f"checkpoint parameter '{sharding.path_str(path)}' is not in the model")
        var = targets[path]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"parameter '{sharding.path_str(path)}' has shape {tuple(value.shape)}, "
                                  f"expected {tuple(var.shape)}")
        value = np.asarray(value).astype(np_dtype, copy=False)
        shard = sharding.named(mesh, sharding.param_logical_axes(path, value.ndim), value.shape, rules)
        arrays[path] = jax.make_array_from_callback(value.shape, shard, lambda index, v=value: v[index])
    missing = sorted(set(targets) - set(arrays), key=str)
    if missing:
        raise CheckpointError(f"{model_dir}: missing parameters {[sharding.path_str(p) for p in missing]}")
    state = nnx.from_flat_state([(path, var.replace(arrays[path])) for path, var in targets.items()])
    return Backbone(cfg, graphdef, state, fingerprint(model_dir, dtype))


def fingerprint(model_dir: str | os.PathLike, dtype, sample: int = 1 << 16) -> str:
    """A hash of the model directory's files (name, size, first and last 64 KiB) and the compute dtype.

    Cheap on a 14 GB checkpoint, and two random test models of the same shapes still differ.
    """
    h = hashlib.sha256(jnp.dtype(dtype).name.encode())
    root = Path(model_dir)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        h.update(f"{file.relative_to(root)}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(sample))
            if size > sample:
                f.seek(max(sample, size - sample))
                h.update(f.read(sample))
    return h.hexdigest()[:16]
