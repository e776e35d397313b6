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

MESH_HELP = (f"device mesh: a preset ({', '.join(PRESETS)}) or axis sizes, e.g. data:2,fsdp:4 (axes "
             f"{', '.join(MESH_AXES)}; one size may be -1: the remaining devices)")

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
    # Qwen2.5-VL's vision attention fuses q|k|v (and its heads) on one axis: a tensor split would cut across the
    # q/k/v boundary and reshard at the reshape into heads, so it stays whole (fsdp splits the embed axis).
    ("fused_heads", None),
    ("head_dim", None),
    ("norm", None),
    ("conv", None),
    ("positions", None),
    ("layers", None),
    ("grid", None),
    ("hidden", None),
)

# Parameter path (dot-joined) -> logical axes, first match wins. Covers LlavaModel, Qwen25VLModel and TokenSRBank;
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
    # Qwen2.5-VL's vision tower: the patch embedding as a linear map of the flattened patch, fused attention,
    # the 2x2 patch merger (MLP on 4 concatenated patches -> the LLM's width)
    (r"visual\.patch_embed\.kernel$", ("conv", "embed")),
    (r"attn\.qkv\.kernel$", ("embed", "fused_heads")),
    (r"attn\.qkv\.bias$", ("fused_heads",)),
    (r"attn\.proj\.kernel$", ("fused_heads", "embed")),
    (r"attn\.proj\.bias$", ("norm",)),
    (r"merger\.fc1\.kernel$", ("embed", "mlp")),
    (r"merger\.fc1\.bias$", ("mlp",)),
    (r"merger\.fc2\.kernel$", ("mlp", "embed")),
    (r"merger\.fc2\.bias$", ("norm",)),
    (r"(norm\d?|layrnorm|layer_norm\d?|ln_q)\.(scale|bias)$", ("norm",)),
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


# ------------------------------------------------------------------------------------ meshes for inference

# The parameters may take at most this share of a device's memory: the rest is for activations and the KV cache.
PARAM_MEMORY_SHARE = 0.9


def device_memory(device: jax.Device) -> int | None:
    """Bytes one device holds; None when unknown (a CPU's host memory: assumed to be enough)."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    return (stats or {}).get("bytes_limit")


def param_bytes_per_device(abstract: Mapping[tuple, jax.ShapeDtypeStruct], mesh: Mesh, rules=LOGICAL_RULES) -> int:
    """Bytes of parameters on each device of `mesh`, exact from their shardings; `abstract`: path -> shape/dtype."""
    total = 0
    for path, leaf in abstract.items():
        shard = named(mesh, param_logical_axes(path, len(leaf.shape)), leaf.shape, rules).shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def inference_mesh(spec: str | None, abstract: Mapping[tuple, jax.ShapeDtypeStruct],
                   devices: Sequence[jax.Device] | None = None, rules=LOGICAL_RULES, *,
                   memory: int | None = None) -> Mesh:
    """The mesh of an eval command's `--mesh spec`, checked against the model before any weight is read.

    No spec: every device on the `data` axis (pure data parallel) when the parameters fit one device, else a
    `MeshError` naming a preset that splits them. A given spec whose parameter shards do not fit a device is an
    error too. `abstract`: parameter path -> ShapeDtypeStruct (the model's shapes at its dtype); `memory`: bytes
    per device (default: what the device reports; a CPU's is not checked).
    """
    devices = list(jax.devices() if devices is None else devices)
    memory = device_memory(devices[0]) if memory is None else memory
    mesh = make_mesh(f"data:{len(devices)}" if spec is None else spec, devices)
    if memory is None:
        return mesh
    need = param_bytes_per_device(abstract, mesh, rules)
    if need <= PARAM_MEMORY_SHARE * memory:
        return mesh
    kind, n = devices[0].platform, len(devices)
    fits = [name for name, preset in PRESETS.items() if preset.platform == kind and preset.num_devices == n
            and param_bytes_per_device(abstract, make_mesh(name, devices), rules) <= PARAM_MEMORY_SHARE * memory]
    if not fits and n > 1 and param_bytes_per_device(abstract, make_mesh(f"fsdp:{n}", devices), rules) <= \
            PARAM_MEMORY_SHARE * memory:
        fits = [f"fsdp:{n}"]
    fix = (f"use --mesh={fits[0]}, which splits them over fsdp" if fits else
           f"no mesh of these {n} device(s) holds them: use more devices or a smaller --dtype")
    given = "--mesh " + spec if spec is not None else "the default mesh (every device on the data axis)"
    raise MeshError(f"the model's parameters take {need / 2**30:.2f} GiB per device under {given}, more than "
                    f"{PARAM_MEMORY_SHARE:.0%} of one {kind} device's {memory / 2**30:.2f} GiB: {fix}")


def check_eval_batch(batch_size: int, mesh: Mesh, rules=LOGICAL_RULES) -> None:
    """An eval batch (padded to `batch_size` rows) must split evenly over the mesh's batch axes and the hosts."""
    d = batch_divisor(mesh, rules)
    hosts = jax.process_count()
    if batch_size % d or batch_size % hosts:
        step = math.lcm(d, hosts)
        raise MeshError(f"--batch-size {batch_size} does not split over {describe(mesh)} (batch axes data x fsdp = "
                        f"{d}{f', {hosts} hosts' if hosts > 1 else ''}): use a multiple of {step}, e.g. --batch-size "
                        f"{step * max(1, -(-batch_size // step))}")


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


def put_rows(x, mesh: Mesh, logical: Sequence[str | None]) -> jax.Array:
    """This host's rows of a batch-leading input -> the global array on `mesh`. One host: the batch is split over
    the batch axes where they divide it and stays whole where not (one prompt on 8 devices); several hosts: each
    gives its own rows, which must split evenly."""
    if jax.process_count() == 1:
        return jax.device_put(x, named(mesh, logical, np.shape(x)))
    return to_global(np.asarray(x), batch_sharding(mesh, logical))


def host_rows(x: jax.Array, mesh: Mesh, logical: Sequence[str | None]) -> np.ndarray:
    """The inverse of `put_rows` for an output with the same batch axis: this host's rows, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    target = batch_sharding(mesh, logical)
    if not x.sharding.is_equivalent_to(target, x.ndim):  # XLA chose another layout: bring it to the rows' one
        x = jax.jit(lambda v: v, out_shardings=target)(x)
    return to_local(x, target)


def replicate(x, mesh: Mesh) -> jax.Array:
    """A value every host holds alike (TokenSR weights, thresholds) -> one array replicated over `mesh`."""
    if jax.process_count() == 1:
        return jax.device_put(x, replicated(mesh))
    return to_global(np.asarray(x), replicated(mesh))


def max_over_hosts(n: int) -> int:
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))
