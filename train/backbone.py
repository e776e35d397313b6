"""The frozen backbone, its parameters born sharded on the training mesh, and its fingerprint.

Loading is the library's (`blink_jax.loading.load_model` with a mesh: no device ever holds more than its
shard; a Qwen2.5-VL directory loads on the mesh's one device); training keeps the split pure-function form and a
fingerprint of the weights for the teacher cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from blink_jax import sharding
from blink_jax.hub import resolve_model_dir
from blink_jax.families import model_type
from blink_jax.loading import load_model
from train.config import TrainConfigError


@dataclasses.dataclass(frozen=True)
class Backbone:
    config: object  # LlavaConfig or Qwen25VLConfig
    graphdef: nnx.GraphDef
    params: nnx.State  # sharded jax Arrays; never updated, never donated
    fingerprint: str  # identifies the weights (and dtype) for the teacher cache


def load_backbone(model_dir: str | os.PathLike, mesh: jax.sharding.Mesh, dtype=jnp.float32,
                  rules=sharding.LOGICAL_RULES) -> Backbone:
    """The LLaVA at `model_dir` (HF or converted) with every parameter born sharded on `mesh`; a Qwen2.5-VL (HF)
    on the mesh's one device."""
    model_dir = resolve_model_dir(model_dir)  # a directory, or a Hugging Face Hub id
    if model_type(model_dir) == "qwen2_5_vl":
        from blink_jax.model.qwen2_5_vl.loading import load_pretrained as load_qwen

        if mesh.devices.size > 1:
            raise TrainConfigError(f"{model_dir} is a Qwen2.5-VL model, which trains on one device for now: use --mesh cpu "
                             f"or gpu_1")
        with jax.default_device(mesh.devices.flat[0]):
            _, model = load_qwen(model_dir, dtype)
    else:
        model = load_model(model_dir, dtype, mesh, rules)
    graphdef, params = nnx.split(model)
    return Backbone(model.config, graphdef, params, fingerprint(model_dir, dtype))


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
