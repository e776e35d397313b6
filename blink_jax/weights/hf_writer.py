"""Export a converted directory back to a Hugging Face directory (`model.safetensors` + config + tokenizer and
processor files) of its model family (LLaVA, Qwen2.5-VL); its command line is
`python -m checkpoints_conversion.orbax_to_hf`.

Keys are written in the layout transformers 5 `save_pretrained` writes (`family.saved_key`), each
tensor through `transform.to_hf` in the dtype it is stored in, so HF -> orbax -> HF is bit-exact and
transformers' `from_pretrained(out)` (`LlavaForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`)
loads with no missing or unexpected keys.

`model.safetensors` is written streaming: the header is computed from orbax metadata, then one group at a
time is restored and its tensors appended, so memory holds about one group (module). The output appears atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from blink_jax.weights import orbax_io
from blink_jax.weights.family import LLAVA, Family
from blink_jax.weights.hf_reader import SAFETENSORS, hf_shape
from blink_jax.weights.params import CheckpointError

_ST_TAGS = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(ml_dtypes.bfloat16): "BF16"}


def _layout(converted_dir: Path, cfg, family: Family) -> list[tuple[str, tuple, np.dtype, tuple]]:
    """(saved key, HF shape, dtype, our path) per tensor, in the order they will be written."""
    entries = {e.path: e for e in family.build_mapping(cfg)}
    rows = []
    for group in orbax_io.read_marker(converted_dir)["groups"]:
        prefix = tuple(group["prefix"])
        for rel, (shape, dtype) in orbax_io.group_metadata(converted_dir / orbax_io.PARAMS_DIR / group["name"]).items():
            entry = entries.get(prefix + rel)
            if entry is None:
                raise CheckpointError(f"'{converted_dir}' holds parameter {prefix + rel} that this config's model "
                                      f"does not have; re-run the conversion")
            if dtype not in _ST_TAGS:
                raise CheckpointError(f"parameter {prefix + rel} has dtype {dtype}, not a safetensors float type")
            rows.append((family.saved_key(entry.hf_key), hf_shape(entry, shape), dtype, prefix + rel))
    missing = sorted(set(entries) - {row[3] for row in rows}, key=str)
    if missing:
        raise CheckpointError(f"'{converted_dir}' lacks parameters {missing}; re-run the conversion")
    return rows


def _safetensors_header(rows) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype, _ in rows:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _ST_TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(converted_dir: Path, cfg, file: Path, family: Family = LLAVA) -> int:
    """Streams every parameter into one safetensors file. -> number of tensors written."""
    rows = _layout(converted_dir, cfg, family)
    by_path = {row[3]: row for row in rows}
    entries = {e.path: e for e in family.build_mapping(cfg)}
    with open(file, "wb") as f:
        f.write(_safetensors_header(rows))
        for group in orbax_io.iter_groups(converted_dir):
            for path in [row[3] for row in rows if row[3] in group]:
                x = np.ascontiguousarray(entries[path].transform.to_hf(group[path]))
                key, shape, dtype, _ = by_path[path]
                if x.shape != shape or x.dtype != dtype:
                    raise CheckpointError(f"parameter {path} restored as {x.shape} {x.dtype}, its metadata says "
                                          f"{shape} {dtype}: the converted directory is corrupt")
                f.write(x.reshape(-1).view(np.uint8).data)  # no bytes copy of the tensor
    return len(rows)


def _write_config(converted_dir: Path, out: Path) -> None:
    """config.json with `dtype` set to the stored dtype, so `from_pretrained` keeps it by default."""
    config = json.loads((converted_dir / "config.json").read_text())
    dtypes = orbax_io.read_marker(converted_dir)["dtypes"]
    if len(dtypes) == 1:
        config["dtype"] = dtypes[0]
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export(converted_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
           family: Family = LLAVA) -> Path:
    """Converted directory of a `family` model -> HF directory with `model.safetensors`, config, tokenizer and
    processor files. -> its path."""
    src = Path(converted_dir).absolute()
    if not orbax_io.is_converted_dir(src):
        raise CheckpointError(f"'{src}' is not a converted blink-jax checkpoint (no valid {orbax_io.MARKER})")
    orbax_io.check_family(src, family)
    cfg = family.config(src)
    _layout(src, cfg, family)  # validate before creating anything
    with orbax_io.atomic_dir(out_dir, overwrite) as tmp:
        orbax_io.copy_aux_files(src, tmp)
        _write_config(src, tmp)
        write_safetensors(src, cfg, tmp / SAFETENSORS, family)
    return Path(out_dir).absolute()
