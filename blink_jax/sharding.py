"""Meshes and the logical-axis rules table, after maxtext: parameters and activations carry logical axis names,
one table maps each name to mesh axes, and meshes come as named presets. One table for inference
(`blink_jax.load_pretrained(..., mesh=...)`) and training (`train.tokensr --mesh`).

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel whose members also split the weights) and
`tensor` (tensor parallel: heads, MLP width, vocabulary, TokenSR channels). The batch is split over
`data` x `fsdp`; the frozen backbone's weights over `fsdp` (model width) and `tensor`.

A dimension that the mapped mesh axes do not divide stays whole (e.g. the tiny test models' width 61 on
4 devices): sharding is a layout choice, never a reason to fail.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from blink_jax.weights.params import path_str

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """A mesh that cannot be built on this machine, naming the mesh and the fix."""


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    platform: str  # "cpu" | "gpu" | "tpu"
    axes: Mapping[str, int]

    @property
    def num_devices(self) -> int:
        return math.prod(self.axes.values())


PRESETS: dict[str, MeshPreset] = {
    "cpu": MeshPreset("cpu", {"data": 1}),
    "cpu_8": MeshPreset("cpu", {"data": 2, "fsdp": 4}),  # 8 simulated host devices
    "gpu_1": MeshPreset("gpu", {"data": 1}),
    "gpu_8": MeshPreset("gpu", {"fsdp": 8}),
    "tpu_v4_8": MeshPreset("tpu", {"fsdp": 4}),  # a v4-8 slice shows 4 chips (megacore)
    "tpu_v5e_8": MeshPreset("tpu", {"fsdp": 8}),  # 16 GiB per chip: the backbone must be split
}

# Logical axis name -> mesh axes (None: not split). The one place where a layout is decided.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("channels", "tensor"),  # TokenSR bottleneck C
    ("channels_in", None),
    ("head_dim", None),
    ("norm", None),
    ("conv", None),
    ("positions", None),
    ("layers", None),
    ("grid", None),
    ("hidden", None),
)

# Parameter path (dot-joined) -> logical axes, first match wins. Covers LlavaModel and TokenSRBank;
# an unmatched parameter is an error so that a new parameter never silently lands replicated.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed_tokens\.embedding$", ("vocab", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
    (r"self_attn\.q_proj\.kernel$", ("embed", "heads", "head_dim")),
    (r"self_attn\.[kv]_proj\.kernel$", ("embed", "kv_heads", "head_dim")),
    (r"self_attn\.q_proj\.bias$", ("heads", "head_dim")),
    (r"self_attn\.[kv]_proj\.bias$", ("kv_heads", "head_dim")),
    (r"self_attn\.(o_proj|out_proj)\.kernel$", ("heads", "head_dim", "embed")),
    (r"self_attn\.(o_proj|out_proj)\.bias$", ("norm",)),
    (r"mlp\.(gate_proj|up_proj|fc1)\.kernel$", ("embed", "mlp")),
    (r"mlp\.(gate_proj|up_proj|fc1)\.bias$", ("mlp",)),
    (r"mlp\.(down_proj|fc2)\.kernel$", ("mlp", "embed")),
    (r"mlp\.(down_proj|fc2)\.bias$", ("norm",)),
    (r"multi_modal_projector\.linear_1\.kernel$", ("embed", "mlp")),
    (r"multi_modal_projector\.linear_1\.bias$", ("mlp",)),
    (r"multi_modal_projector\.linear_2\.kernel$", ("mlp", "embed")),
    (r"multi_modal_projector\.linear_2\.bias$", ("norm",)),
    (r"patch_embedding\.kernel$", ("conv", "conv", "conv", "embed")),
    (r"class_embedding$", ("norm",)),
    (r"position_embedding\.embedding$", ("positions", "embed")),
    (r"(norm|layrnorm|layer_norm\d?)\.(scale|bias)$", ("norm",)),
    # TokenSR: conv kernels are HWIO
    (r"conv1\.kernel$", ("conv", "conv", "embed", "channels")),
    (r"conv2\.kernel$", ("conv", "conv", "channels_in", "channels")),
    (r"conv3\.kernel$", ("conv", "conv", "channels", "embed")),
    (r"conv[12]\.bias$", ("channels",)),
    (r"conv3\.bias$", ("norm",)),
    # TokenSR mlp: per-token dense layers
    (r"dense1\.kernel$", ("embed", "channels")),
    (r"dense2\.kernel$", ("channels_in", "channels")),
    (r"dense3\.kernel$", ("channels", "embed")),
    (r"dense[12]\.bias$", ("channels",)),
    (r"dense3\.bias$", ("norm",)),
)

# Activations that cross jit boundaries.
STUDENT_AXES = ("layers", "batch", "grid", "grid", "hidden")  # [Lp, B, r, r, D] and targets [Lp, B, sr, sr, D]
REGION_AXES = ("layers", "batch")  # [Lp, B]
IMAGE_AXES = ("batch", None, None, None)  # pixel values [B, 3, H, W]
TOKEN_AXES = ("batch", None)  # input ids / mask [B, T]


# ----------------------------------------------------------------------------------------------- meshes


def parse_mesh(spec: str) -> tuple[str | None, dict[str, int]]:
    """'cpu_8' -> ('cpu', {'data': 2, 'fsdp': 4}); 'data:2,fsdp:4' -> (None, {...}). One size may be -1 (the rest)."""
    spec = spec.strip()
    if spec in PRESETS:
        preset = PRESETS[spec]
        return preset.platform, dict(preset.axes)
    if ":" not in spec:
        raise MeshError(f"--mesh={spec!r} is neither a preset ({', '.join(PRESETS)}) nor axis sizes like "
                        f"'data:2,fsdp:4' (axes {', '.join(MESH_AXES)})")
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, _, size = part.partition(":")
        name = name.strip()
        if name not in MESH_AXES:
            raise MeshError(f"--mesh={spec!r}: axis {name!r} is unknown; use {', '.join(MESH_AXES)}")
        if name in axes:
            raise MeshError(f"--mesh={spec!r}: axis {name!r} is given twice")
        try:
            axes[name] = int(size)
        except ValueError:
            raise MeshError(f"--mesh={spec!r}: size {size!r} of axis {name!r} is not an integer") from None
        if axes[name] == 0 or axes[name] < -1:
            raise MeshError(f"--mesh={spec!r}: axis {name!r} has size {axes[name]}; use a positive size or -1")
    if list(axes.values()).count(-1) > 1:
        raise MeshError(f"--mesh={spec!r}: only one axis may be -1 (all remaining devices)")
    return None, axes


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh named by `spec` over all devices (of every host). Device count and platform must match."""
    devices = list(jax.devices() if devices is None else devices)
    platform, axes = parse_mesh(spec)
    n = len(devices)
    kind = devices[0].platform
    if platform is not None and kind != platform:
        raise MeshError(f"--mesh={spec} is a {platform} preset but this machine's devices are {n} x {kind}; "
                        f"use --mesh={_suggest(kind, n)} or an explicit --mesh=data:{n}")
    if -1 in axes.values():
        known = math.prod(v for v in axes.values() if v != -1)
        if n % known:
            raise MeshError(f"--mesh={spec}: {n} devices do not divide into the fixed axes' {known}")
        axes = {k: (n // known if v == -1 else v) for k, v in axes.items()}
    want = math.prod(axes.values())
    if want != n:
        hint = ""
        if platform == "cpu" and want > 1:
            hint = (f"; simulate {want} host devices with XLA_FLAGS=--xla_force_host_platform_device_count={want} "
                    f"set before JAX starts")
        raise MeshError(f"--mesh={spec} needs {want} devices ({_axes_str(axes)}) but this machine has {n} {kind} "
                        f"device(s): use --mesh={_suggest(kind, n)} or an explicit mesh whose sizes multiply to "
                        f"{n}{hint}")
    shape = tuple(axes.get(a, 1) for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _axes_str(axes: Mapping[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in axes.items())


def _suggest(kind: str, n: int) -> str:
    for name, preset in PRESETS.items():
        if preset.platform == kind and preset.num_devices == n:
            return name
    return f"data:{n}"


# ------------------------------------------------------------------------------------------ logical axes


def mesh_axes_for(logical: str | None, rules=LOGICAL_RULES):
    if logical is None:
        return None
    for name, mesh_axes in rules:
        if name == logical:
            return mesh_axes
    raise KeyError(f"logical axis {logical!r} has no rule in LOGICAL_RULES; add one")


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES) -> P:
    """PartitionSpec for an array of `shape` with these logical axes: each dim gets its rule's mesh axes,
    minus axes already used and axes of size 1; a dim they do not divide stays whole."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        mesh_axes = mesh_axes_for(name, rules)
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def named(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int], rules=LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def batch_sharding(mesh: Mesh, logical: Sequence[str | None], rules=LOGICAL_RULES) -> NamedSharding:
    """Sharding of an activation whose `batch` axis must split evenly (checked by `check_batch`)."""
    spec = []
    for name in logical:
        axes = mesh_axes_for(name, rules) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(*spec))


def batch_divisor(mesh: Mesh, rules=LOGICAL_RULES) -> int:
    axes = mesh_axes_for("batch", rules)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def check_batch(batch_size: int, mesh: Mesh, rules=LOGICAL_RULES) -> None:
    d = batch_divisor(mesh, rules)
    if batch_size % d or batch_size % jax.process_count():
        raise MeshError(f"--batch-size={batch_size} must be a multiple of the mesh's batch axes (data x fsdp = {d}) "
                        f"and of the number of hosts ({jax.process_count()}); e.g. --batch-size="
                        f"{math.lcm(d, jax.process_count()) * max(1, batch_size // d)}")


def param_logical_axes(path: Sequence, ndim: int, table=PARAM_AXES) -> tuple[str, ...]:
    name = path_str(path)
    for pattern, axes in table:
        if re.search(pattern, name):
            if len(axes) != ndim:
                raise ValueError(f"parameter '{name}' has {ndim} dims but rule {pattern!r} names {len(axes)}: "
                                 f"fix PARAM_AXES in blink_jax/sharding.py")
            return axes
    raise ValueError(f"parameter '{name}' matches no rule in PARAM_AXES (blink_jax/sharding.py): add its logical axes")


def param_shardings(tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding for every array leaf (arrays or ShapeDtypeStructs) of a parameter pytree, by its path."""
    def one(path, leaf):
        return named(mesh, param_logical_axes(path, len(leaf.shape)), leaf.shape, rules)
    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
    return f"mesh {_axes_str(dict(mesh.shape))} over {mesh.devices.size} {np.ravel(mesh.devices)[0].platform} device(s)"


# ------------------------------------------------------------------------------------- host <-> global


def to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This host's rows of a batch -> the global array (one host: a plain `device_put`)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    from jax.experimental import multihost_utils
    return multihost_utils.host_local_array_to_global_array(local, sharding.mesh, sharding.spec)


def to_local(x: jax.Array, sharding: NamedSharding) -> np.ndarray:
    """The inverse of `to_global`: this host's rows, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, sharding.mesh, sharding.spec))


def max_over_hosts(n: int) -> int:
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))
