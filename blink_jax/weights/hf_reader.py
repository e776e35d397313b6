"""Find, validate and read the weights of a Hugging Face directory of any model family (`family.Family`: LLaVA,
Qwen2.5-VL), one tensor at a time.

Accepted weight files, in this order of preference: `model.safetensors.index.json` (sharded safetensors),
`model.safetensors`, `pytorch_model.bin.index.json` (sharded torch pickles), `pytorch_model.bin`.
Keys may be in any layout the family accepts (LLaVA: the three of BLINK.md §1); they are reduced to its key
map's layout by `family.canonical_key`.

Everything is checked from file headers before any tensor data is read (`plan`): the key set against
`family.build_mapping(cfg)`, every shape against the model's parameter shapes (through the inverse transform, i.e.
in torch's layout) and that every tensor is floating point. One `CheckpointError` lists every problem.

Keys that are not parameters and are ignored, as transformers ignores them (`Family.ignored`):
- buffers that older transformers versions saved (`*.position_ids`, `*.rotary_emb.inv_freq`, ...);
- the LM head when the config ties word embeddings: the model reuses `embed_tokens`, as transformers
  does, so a stored head (equal or not) is never read.

bf16 tensors are read as `ml_dtypes.bfloat16` numpy arrays (bit-exact, no up-cast); numpy alone has no bf16.

Memory: safetensors data is read with plain positional reads, not a memory map (mapped pages a reader has
touched stay in the process's resident set until the file is closed, i.e. the whole checkpoint), straight
into the array in our layout: a transpose or a dtype cast goes through one small block at a time
(`BLOCK_BYTES`). Converting therefore holds one tensor, in its final layout, at a time. Torch pickles are
memory-mapped, and only one weight file is kept open at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import jax
import ml_dtypes
import numpy as np

from blink_jax.weights.family import LLAVA, Family
from blink_jax.weights.orbax_io import is_converted_dir
from blink_jax.weights.param_mapping import Entry
from blink_jax.weights.params import CheckpointError, np_dtype, param_shapes

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# safetensors dtype tags -> numpy dtypes (bf16 through ml_dtypes)
# Granularity of reads that cast or transpose: bounds the memory used besides the output array itself.
BLOCK_BYTES = 8 << 20
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one stored tensor lives, from the file header only."""
    key: str  # the key as stored in the file (any layout)
    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None = None  # safetensors: byte offset of the tensor's data in the file; None for torch files


# ---------------------------------------------------------------------------------------------- files


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of an HF directory, validated against their index file if there is one."""
    d = Path(model_dir)
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (TORCH_BIN_INDEX, TORCH_BIN)):
        if (d / index).is_file():
            return _files_from_index(d / index)
        if (d / single).is_file():
            return [d / single]
    if is_converted_dir(d):
        raise CheckpointError(f"'{d}' is already a converted blink-jax directory (no Hugging Face weights to read): "
                              f"blink_jax.load_pretrained and eval.run read it as it is; "
                              f"checkpoints_conversion.orbax_to_hf turns it back into an HF directory")
    raise CheckpointError(f"no weights in '{d}': expected {SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, "
                          f"{TORCH_BIN} or {TORCH_BIN_INDEX} with its shards")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"index file '{index}' is not a valid HF index (needs a 'weight_map'): {e!r}") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"index file '{index}' names shard(s) that do not exist: {absent}; re-download them")
    return files


def _header(file: Path) -> dict[str, TensorRef]:
    """Stored key -> TensorRef, reading only the file's header (safetensors) or mapping it (torch zip)."""
    try:
        if file.suffix == ".safetensors":
            return _st_header(file)
        return {k: TensorRef(k, file, tuple(t.shape), _torch_np_dtype(t.dtype)) for k, t in _torch_load(file).items()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors / pickle errors have no common base class
        raise CheckpointError(f"cannot read weight file '{file}' (corrupt or truncated?): {e}. "
                              f"Re-download or re-save it.") from None


def _st_header(file: Path) -> dict[str, TensorRef]:
    """Stored key -> TensorRef from a safetensors header (an 8-byte little-endian size, then JSON; the data
    follows), checked against the file's size and the dtype's item size. Needs no deep-learning framework."""
    file_size = file.stat().st_size
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= file_size - 8:
            raise ValueError(f"header size {size} does not fit in the file's {file_size} bytes")
        header = json.loads(f.read(size))
    refs = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        tag, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        if tag not in _ST_DTYPES:
            raise CheckpointError(f"checkpoint key '{key}' in '{file}' has dtype {tag}, which this converter "
                                  f"cannot read")
        dtype = np.dtype(_ST_DTYPES[tag])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + size + end > file_size:
            raise ValueError(f"tensor '{key}' (bytes {begin}..{end}) does not match its shape {shape} and dtype "
                             f"{tag}, or runs past the end of the file")
        refs[key] = TensorRef(key, file, shape, dtype, offset=8 + size + int(begin))
    return refs


TORCH_HINT = ("pip install torch (the CPU build is enough: pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu)")


def _torch_load(file: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"'{file}' is a PyTorch pickle, which needs PyTorch to read: {TORCH_HINT}, or re-save "
                              f"the checkpoint as safetensors (save_pretrained(..., safe_serialization=True))") from None
    try:  # zip-format pickles can be memory-mapped: metadata now, data on access
        state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        state = torch.load(str(file), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    if not isinstance(state, dict):
        raise CheckpointError(f"weight file '{file}' holds a {type(state).__name__}, expected a state_dict")
    return state


def _torch_np_dtype(torch_dtype) -> np.dtype:
    import torch
    return np.dtype(ml_dtypes.bfloat16) if torch_dtype == torch.bfloat16 else np.dtype(
        torch.empty((), dtype=torch_dtype).numpy().dtype)


def _to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, bf16 kept bit-exact as ml_dtypes.bfloat16."""
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# --------------------------------------------------------------------------------------- public API


def list_tensors(model_dir: str | os.PathLike, family: Family = LLAVA) -> dict[str, TensorRef]:
    """Canonical key -> TensorRef for every tensor in the directory's weight files (no tensor data read).

    Two stored keys that reduce to the same canonical key (e.g. `vision_tower.x` and
    `vision_tower.vision_model.x`), in one file or across shards, are an error.
    """
    refs: dict[str, TensorRef] = {}
    clashes = []
    for file in weight_files(model_dir):
        for key, ref in _header(file).items():
            canon = family.canonical_key(key)
            if canon in refs:
                other = refs[canon]
                clashes.append(f"'{key}' in '{file.name}' and '{other.key}' in '{other.file.name}' are both "
                               f"'{canon}'")
            refs[canon] = ref
    if clashes:
        raise CheckpointError(f"duplicate keys in '{model_dir}' (the same parameter stored twice, in different "
                              f"key layouts or shards); keep one of each:\n  " + "\n  ".join(clashes))
    return refs


def iter_tensors(source: str | os.PathLike | dict[str, TensorRef], keys: Iterable[str] | None = None,
                 family: Family = LLAVA) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (canonical key, numpy array as stored) one at a time, in the order of `keys` (default: all).

    `source` is a directory (of `family`) or the result of `list_tensors`.
    """
    refs = source if isinstance(source, dict) else list_tensors(source, family)
    keys = list(refs) if keys is None else list(keys)
    unknown = [k for k in keys if k not in refs]
    if unknown:
        raise CheckpointError(f"keys not in the checkpoint: {unknown}")
    with _Readers() as readers:
        for key in keys:
            yield key, _read(readers.get(refs[key].file), refs[key])


class _SafetensorsFile:
    """Unbuffered positional reads of one safetensors file into caller-owned arrays (no memory map)."""

    def __init__(self, file: Path):
        self.file = file
        self.f = open(file, "rb", buffering=0)

    def close(self) -> None:
        self.f.close()

    def _read_bytes(self, ref: TensorRef, position: int, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        self.f.seek(position)
        done = 0
        while done < len(view):
            n = self.f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"tensor '{ref.key}' in '{self.file}' ends early: the file is truncated; "
                                      f"re-download it")
            done += n

    def fill(self, ref: TensorRef, out: np.ndarray, transpose: bool = False) -> None:
        """Reads `ref` into the contiguous array `out` (any float dtype): `out` holds the stored tensor reshaped,
        or with `transpose` the stored 2-D matrix transposed. A cast or a transpose goes block by block."""
        if not transpose and out.dtype == ref.dtype:
            self._read_bytes(ref, ref.offset, out)
            return
        if transpose and len(ref.shape) != 2:
            raise CheckpointError(f"tensor '{ref.key}' has shape {ref.shape}: only 2-D tensors are transposed")
        rows = ref.shape[0] if ref.shape else 1
        row_items = int(np.prod(ref.shape[1:], dtype=np.int64)) if ref.shape else 1
        row_bytes = row_items * ref.dtype.itemsize
        per_block = max(1, BLOCK_BYTES // max(row_bytes, 1))
        block = np.empty((min(per_block, rows), row_items), ref.dtype)
        dest = out.reshape(row_items, rows) if transpose else out.reshape(rows, row_items)
        for start in range(0, rows, per_block):
            n = min(per_block, rows - start)
            self._read_bytes(ref, ref.offset + start * row_bytes, block[:n])
            if transpose:
                dest[:, start:start + n] = block[:n].T
            else:
                dest[start:start + n] = block[:n]


class _Readers:
    """The open weight file, one at a time: a memory-mapped torch file's touched pages count as resident
    until it is closed, so the previous file is closed before the next one is opened."""

    def __init__(self):
        self.file, self.reader = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close()

    def _close(self) -> None:
        if isinstance(self.reader, _SafetensorsFile):
            self.reader.close()
        self.file, self.reader = None, None

    def get(self, file: Path):
        if file != self.file:
            self._close()
            self.reader, self.file = _open(file), file
        return self.reader


def _open(file: Path):
    try:
        if file.suffix == ".safetensors":
            return _SafetensorsFile(file)
        return _torch_load(file)
    except Exception as e:
        raise CheckpointError(f"cannot read weight file '{file}': {e}") from None


def _read(reader, ref: TensorRef) -> np.ndarray:
    """The stored tensor as a numpy array of its stored dtype."""
    if isinstance(reader, _SafetensorsFile):
        out = np.empty(ref.shape, ref.dtype)
        try:
            reader.fill(ref, out)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor '{ref.key}' from '{ref.file}' (corrupt file?): {e}") from None
        return out
    try:
        array = _to_numpy(reader[ref.key])
    except Exception as e:
        raise CheckpointError(f"cannot read tensor '{ref.key}' from '{ref.file}' (corrupt file?): {e}") from None
    if array.shape != ref.shape:
        raise CheckpointError(f"tensor '{ref.key}' in '{ref.file}' has shape {array.shape}, its header says "
                              f"{ref.shape}: the file is corrupt")
    return array


def _read_ours(reader, step: "Step", dtype: np.dtype | None) -> np.ndarray:
    """One parameter in our layout and `dtype` (None: as stored), as a contiguous array of its own."""
    ref, transform = step.ref, step.entry.transform
    if isinstance(reader, _SafetensorsFile) and transform.layout in ("reshape", "transpose"):
        out = np.empty(step.shape, ref.dtype if dtype is None else dtype)
        try:
            reader.fill(ref, out, transpose=transform.layout == "transpose")
        except OSError as e:
            raise CheckpointError(f"cannot read tensor '{ref.key}' from '{ref.file}' (corrupt file?): {e}") from None
        return out
    x = _read(reader, ref)
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    return np.ascontiguousarray(transform.to_ours(x, step.shape))


@dataclasses.dataclass(frozen=True)
class Step:
    """One parameter to produce: the mapping entry, our shape, and where the tensor is stored."""
    entry: Entry
    shape: tuple[int, ...]
    ref: TensorRef


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch-layout shape that `entry.transform.to_ours` turns into our `shape` (no data touched)."""
    return _hf_shape(entry.transform, tuple(shape))


@functools.lru_cache(maxsize=4096)
def _hf_shape(transform, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(jax.eval_shape(transform.to_hf, jax.ShapeDtypeStruct(shape, np.float32)).shape)


def plan(model_dir: str | os.PathLike, cfg, family: Family = LLAVA) -> list[Step]:
    """Validates the checkpoint against the config (of `family`) from headers alone; -> the steps to read it.

    Raises one CheckpointError naming every missing key, unexpected key, wrong shape and wrong dtype.
    """
    refs = list_tensors(model_dir, family)
    shapes = param_shapes(cfg, family.model_class)
    entries = family.build_mapping(cfg)
    expected = {e.hf_key for e in entries}
    problems, steps = [], []
    for entry in entries:
        ref = refs.get(entry.hf_key)
        if ref is None:
            problems.append(f"missing key '{entry.hf_key}' (shape {hf_shape(entry, shapes[entry.path])})")
            continue
        want = hf_shape(entry, shapes[entry.path])
        if ref.shape != want:
            problems.append(f"checkpoint key '{ref.key}' has shape {ref.shape}, expected {want}")
        elif not np.issubdtype(ref.dtype, np.floating) and ref.dtype != ml_dtypes.bfloat16:
            problems.append(f"checkpoint key '{ref.key}' has dtype {ref.dtype}, expected a floating-point type")
        else:
            steps.append(Step(entry, shapes[entry.path], ref))
    for canon, ref in refs.items():
        if canon not in expected and not family.ignored(canon, cfg):
            problems.append(f"unexpected key '{ref.key}' (shape {ref.shape}) in '{ref.file.name}'")
    if problems:
        raise CheckpointError(
            f"checkpoint '{model_dir}' does not match its {family.name} config.json ({len(problems)} problem(s); "
            f"missing keys are named in {family.layout}); check that the weights and config.json come from the "
            f"same model:\n  " + "\n  ".join(problems))
    return steps


def iter_plan(steps: list[Step], dtype=None) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (our parameter path, array in our layout) one at a time, cast to `dtype` (None: as stored).

    Nothing here keeps a yielded array: once the consumer drops it, it is freed before the next is read.
    """
    dtype = np_dtype(dtype)
    with _Readers() as readers:
        for step in steps:
            yield step.entry.path, _read_ours(readers.get(step.ref.file), step, dtype)


def iter_params(model_dir: str | os.PathLike, cfg, dtype=None, family: Family = LLAVA
                ) -> Iterator[tuple[tuple, np.ndarray]]:
    """Validates everything first (before the first yield is requested), then yields (path, array)."""
    return iter_plan(plan(model_dir, cfg, family), dtype)


def read_params(model_dir: str | os.PathLike, cfg, dtype=None, family: Family = LLAVA) -> dict[tuple, np.ndarray]:
    """Our parameter path -> numpy array for the whole model, validated before any tensor is read."""
    return dict(iter_params(model_dir, cfg, dtype, family))
