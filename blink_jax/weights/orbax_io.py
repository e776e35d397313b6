"""This project's converted checkpoint directory: written streaming and atomically, read back validated.

On disk (`out/`):

    blink_jax_checkpoint.json    marker: format, version, model_type, dtype, groups (written last)
    config.json, generation_config.json, tokenizer*.json, ...   copied from the HF directory
    params/<group>/              one orbax PyTree checkpoint per group, e.g. params/language_model.layers.0.mlp.up_proj/

A group is one module: the parameters that share a path up to their own name (a kernel and its bias, a
norm's scale and bias, `language_model.embed_tokens`). Each group is saved as soon as its last tensor
arrives and then dropped, so converting holds one weight (plus a bias) in memory at a time. Inside a group
the pytree is a nested dict of the path below the group, e.g. `{"kernel": array, "bias": array}`; arrays are
numpy (bf16 as `ml_dtypes.bfloat16`). Readers take the groups from the marker, so directories written with
coarser groups (one per layer, by earlier versions) read the same.

Orbax is told not to copy the arrays it saves (its numpy handler deep-copies by default) and not to
compress (OCDBT keeps an array's compressed chunks in memory until the save commits; weights compress by a
few percent). Arrays are saved as one chunk each: smaller chunks that are not contiguous in memory (orbax
splits the largest axis first) are copied, and held, until the save commits. Each save then adds nothing
to the array it writes.

Any model family (`family.Family`: LLaVA, Qwen2.5-VL) is written the same way; the marker names its `model_type`
(a marker without one, from before Qwen2.5-VL, is LLaVA's) and a reader for another family refuses it.

Atomicity: everything is written into a hidden sibling `.{name}.tmp-<pid>` and renamed into place at the
end, so a crash or kill never leaves a directory that `is_converted_dir` accepts; the next write to the same
place removes what a killed one left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import jax
import numpy as np

from blink_jax.weights.family import LLAVA, Family
from blink_jax.weights.params import CheckpointError, check_finite, np_dtype, param_shapes, path_str

MARKER = "blink_jax_checkpoint.json"
# The format's name predates other families; it stays so that converted LLaVA directories keep loading.
FORMAT, VERSION = "blink-jax-llava-orbax", 1
PARAMS_DIR = "params"
# Everything besides weights that `from_pretrained` / the processor read from an HF directory.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "preprocessor_config.json",
             "processor_config.json", "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja")


def group_of(path: tuple) -> tuple:
    """The group a parameter path is saved in: its module (the path without the parameter's own name)."""
    return path[:-1]


def saving_checkpointer():
    """A synchronous orbax checkpointer that neither copies nor compresses the numpy arrays it saves."""
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                               (jax.Array, th.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


# ------------------------------------------------------------------------------------------- atomic dir


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raises FileExistsError if `out_dir` holds anything and `overwrite` is False. -> absolute path."""
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output '{out}' exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory '{out}' is not empty: choose another --out, or pass "
                              f"--overwrite (overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling directory to fill; on success it replaces `out_dir`, on error it is removed."""
    out = check_out_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stranded(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stranded(out: Path) -> list[Path]:
    """Removes what a killed writer of `out` left beside it (`.{name}.tmp-<pid>` / `.{name}.old-<pid>` of a
    process that no longer runs: up to the model's size). -> the removed paths."""
    removed = []
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = leftover.name[len(out.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)  # `out` was checked: empty, or overwrite=True
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def copy_aux_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copies config, generation config and tokenizer/processor files that exist. -> their names."""
    copied = []
    for name in AUX_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------- writing


class _GroupWriter:
    """Collects parameters and saves each group as soon as it is complete."""

    def __init__(self, root: Path, shapes: dict[tuple, tuple], dtype):
        self.root, self.shapes, self.dtype = root, shapes, dtype
        self.members: dict[tuple, set] = {}
        for path in shapes:
            self.members.setdefault(group_of(path), set()).add(path)
        self.pending: dict[tuple, dict] = {}
        self.written: list[tuple] = []
        self.seen: set = set()
        self.dtypes: set = set()
        self.checkpointer = saving_checkpointer()  # synchronous: save returns when the files are final

    def add(self, path: tuple, array: np.ndarray) -> None:
        if path not in self.shapes:
            raise CheckpointError(f"parameter '{path_str(path)}' is not a parameter of this config's model")
        if path in self.seen:
            raise CheckpointError(f"parameter '{path_str(path)}' was given twice")
        if tuple(array.shape) != self.shapes[path]:
            raise CheckpointError(f"parameter '{path_str(path)}' has shape {tuple(array.shape)}, expected "
                                  f"{self.shapes[path]}")
        check_finite(path, array)
        if self.dtype is not None:
            array = array.astype(self.dtype, copy=False)
        self.seen.add(path)
        self.dtypes.add(_dtype_name(array.dtype))
        group = group_of(path)
        self.pending.setdefault(group, {})[path] = np.ascontiguousarray(array)
        if len(self.pending[group]) == len(self.members[group]):
            self._save(group, self.pending.pop(group))

    def _save(self, group: tuple, params: dict[tuple, np.ndarray]) -> None:
        tree: dict = {}
        for path, array in params.items():
            node = tree
            for part in path[len(group):-1]:
                node = node.setdefault(str(part), {})
            node[str(path[-1])] = array
        self.checkpointer.save(self.root / path_str(group), tree)
        self.written.append(group)

    def finish(self) -> None:
        missing = sorted(set(self.shapes) - self.seen, key=str)
        if missing:
            raise CheckpointError(f"conversion ended without {len(missing)} parameter(s): "
                                  f"{[path_str(p) for p in missing]}")


def write_converted(out_dir: str | os.PathLike, cfg_source_dir: str | os.PathLike,
                    tensors_iter: Iterable[tuple[tuple, np.ndarray]], dtype=None, *, overwrite: bool = False,
                    family: Family = LLAVA) -> Path:
    """Writes a converted directory from (our path, array) pairs, streaming and atomically. -> its path.

    `cfg_source_dir` holds the HF `config.json` of a `family` model (and tokenizer, processor and chat template
    files, copied along). `dtype` casts every array (None keeps each as given). Every parameter of the config's
    model must come exactly once.
    """
    cfg = family.config(cfg_source_dir)
    dtype = np_dtype(dtype)
    with atomic_dir(out_dir, overwrite) as tmp:
        copy_aux_files(cfg_source_dir, tmp)
        writer = _GroupWriter((tmp / PARAMS_DIR).absolute(), param_shapes(cfg, family.model_class), dtype)
        for path, array in tensors_iter:
            writer.add(path, array)
            del array  # freed now, not when the next tensor (already read by then) replaces it
        writer.finish()
        marker = {"format": FORMAT, "version": VERSION, "model_type": family.model_type,
                  "dtype": _dtype_name(dtype) if dtype is not None else "as-stored",
                  "dtypes": sorted(writer.dtypes),
                  "groups": [{"name": path_str(g), "prefix": list(g)} for g in writer.written]}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return Path(out_dir).absolute()


# --------------------------------------------------------------------------------------------- reading


def is_converted_dir(model_dir: str | os.PathLike) -> bool:
    """True iff `model_dir` holds a complete converted checkpoint (its marker is written last)."""
    try:
        return read_marker(model_dir)["format"] == FORMAT
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_marker(model_dir: str | os.PathLike) -> dict:
    return json.loads((Path(model_dir) / MARKER).read_text())


def check_family(model_dir: str | os.PathLike, family: Family) -> None:
    """Raises CheckpointError if the converted directory holds another family's model than `family`."""
    stored = read_marker(model_dir).get("model_type", LLAVA.model_type)
    if stored != family.model_type:
        raise CheckpointError(f"converted checkpoint '{model_dir}' holds a {stored!r} model, not {family.name} "
                              f"({family.model_type!r}): read it as the model its {MARKER} names")


def _groups(model_dir: str | os.PathLike) -> Iterator[tuple[tuple, Path]]:
    """(prefix, folder) of each saved group, after checking the marker's format and version."""
    d = Path(model_dir).absolute()
    marker = read_marker(d)
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise CheckpointError(f"'{d / MARKER}' is format {marker.get('format')!r} version {marker.get('version')!r}; "
                              f"this code reads {FORMAT!r} version {VERSION}: re-run the conversion")
    for group in marker["groups"]:
        yield tuple(group["prefix"]), d / PARAMS_DIR / group["name"]


def iter_groups(model_dir: str | os.PathLike) -> Iterator[dict[tuple, np.ndarray]]:
    """Yields each group's {our path: array}, one group in memory at a time."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    for prefix, folder in _groups(model_dir):
        try:
            tree = checkpointer.restore(folder)
        except Exception as e:
            raise CheckpointError(f"cannot restore parameter group '{folder}': {e}; re-run the conversion") from None
        yield {prefix + rel: np.asarray(x) for rel, x in _flatten(tree)}


def group_metadata(folder: Path) -> dict[tuple, tuple[tuple, np.dtype]]:
    """Relative path -> (shape, dtype) of one saved group, from orbax metadata (no array data read)."""
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(folder)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in _flatten(dict(tree))}


def restore_sharded(model_dir: str | os.PathLike,
                    targets: dict[tuple, jax.ShapeDtypeStruct]) -> dict[tuple, jax.Array]:
    """Our path -> jax.Array with the shape, dtype and sharding of `targets[path]`, for every parameter.

    Orbax reads each array's shards straight into the devices that hold them, so a host reads only the parts of
    the checkpoint its own devices need. The checkpoint must hold exactly the parameters of `targets`, with
    their shapes: checked from orbax metadata before any array is read.
    """
    import orbax.checkpoint as ocp

    groups = []  # (prefix, folder, the group's paths relative to prefix)
    for prefix, folder in _groups(model_dir):
        try:
            groups.append((prefix, folder, {rel: shape for rel, (shape, _) in group_metadata(folder).items()}))
        except Exception as e:
            raise CheckpointError(f"cannot read parameter group '{folder}': {e}; re-run the conversion") from None
    stored = {prefix + rel: shape for prefix, _, shapes in groups for rel, shape in shapes.items()}
    check_params(stored, {path: tuple(t.shape) for path, t in targets.items()}, model_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    params: dict[tuple, jax.Array] = {}
    for prefix, folder, shapes in groups:
        restore_args: dict = {}
        for rel in shapes:
            node = restore_args
            for part in rel[:-1]:
                node = node.setdefault(str(part), {})
            t = targets[prefix + rel]
            node[str(rel[-1])] = ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=tuple(t.shape), dtype=t.dtype)
        try:
            tree = checkpointer.restore(folder, restore_args=restore_args)
        except Exception as e:
            raise CheckpointError(f"cannot restore parameter group '{folder}': {e}; re-run the conversion") from None
        params.update({prefix + rel: x for rel, x in _flatten(tree)})
    return params


def _flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    for key, value in tree.items():
        part = int(key) if key.isdigit() else key
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (part,))
        else:
            yield prefix + (part,), value


def read_params(model_dir: str | os.PathLike, family: Family = LLAVA) -> tuple[object, dict[tuple, np.ndarray]]:
    """(config, our path -> numpy array) of a converted directory of a `family` model, checked against the
    config."""
    if not is_converted_dir(model_dir):
        raise CheckpointError(f"'{model_dir}' is not a converted blink-jax checkpoint (no valid {MARKER}); "
                              f"convert it with `python -m checkpoints_conversion.hf_to_orbax`")
    check_family(model_dir, family)
    cfg = family.config(model_dir)
    params: dict[tuple, np.ndarray] = {}
    for group in iter_groups(model_dir):
        params.update(group)
    check_params(params, param_shapes(cfg, family.model_class), model_dir)
    return cfg, params


def check_params(params: dict[tuple, np.ndarray | tuple], shapes: dict[tuple, tuple], where) -> None:
    """One CheckpointError naming every missing, unexpected and misshapen parameter. `params` maps each path to
    its array or its shape."""
    params = {p: tuple(getattr(x, "shape", x)) for p, x in params.items()}
    problems = [f"missing parameter '{path_str(p)}'" for p in sorted(set(shapes) - set(params), key=str)]
    problems += [f"unexpected parameter '{path_str(p)}'" for p in sorted(set(params) - set(shapes), key=str)]
    problems += [f"parameter '{path_str(p)}' has shape {params[p]}, expected {shapes[p]}"
                 for p in shapes if p in params and params[p] != shapes[p]]
    if problems:
        raise CheckpointError(f"converted checkpoint '{where}' does not match its config.json; re-run the "
                              f"conversion:\n  " + "\n  ".join(problems))
