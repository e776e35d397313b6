"""Load a Hugging Face Qwen2.5-VL directory (config.json + safetensors) into `Qwen25VLModel`.

Every key and shape is checked from the safetensors headers before any tensor is read, against
`param_mapping.build_mapping` and the model's own parameter shapes (through each entry's inverse transform,
i.e. in torch's layout); one `CheckpointError` names every missing, unexpected or misshaped key.
Ignored, as transformers ignores them: rotary `inv_freq` buffers, and `lm_head.weight` when the config ties
the word embeddings (the model reuses `embed_tokens`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from blink_jax.weights import params as params_lib
from blink_jax.weights.params import CheckpointError, path_str
from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.model.qwen2_5_vl.model import Qwen25VLModel
from blink_jax.model.qwen2_5_vl.param_mapping import IGNORED_SUFFIXES, TIED_HEAD, build_mapping, canonical_key

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def abstract_model(cfg: Qwen25VLConfig, dtype=jnp.float32) -> Qwen25VLModel:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory, no random init."""
    return params_lib.abstract_model(cfg, dtype, Qwen25VLModel)


def param_shapes(cfg: Qwen25VLConfig) -> dict[tuple, tuple]:
    return params_lib.param_shapes(cfg, Qwen25VLModel)


def model_from_params(cfg: Qwen25VLConfig, params: dict[tuple, np.ndarray], dtype=jnp.float32) -> Qwen25VLModel:
    """A model whose parameters are exactly `params` (path -> array, every one, exact shapes, finite), cast to
    `dtype` (`blink_jax.weights.params.model_from_params`)."""
    return params_lib.model_from_params(cfg, params, dtype, Qwen25VLModel)


def _safetensors_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def tensor_index(model_dir: Path) -> dict[str, tuple[Path, dict, int]]:
    """Stored key -> (file, its header entry, data offset), from `model.safetensors[.index.json]`."""
    if (model_dir / SAFETENSORS_INDEX).is_file():
        files = sorted(set(json.loads((model_dir / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
    elif (model_dir / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        raise CheckpointError(f"{model_dir} holds neither {SAFETENSORS} nor {SAFETENSORS_INDEX}: give a Hugging Face "
                              f"Qwen2.5-VL directory with safetensors weights")
    index = {}
    for name in files:
        header, base = _safetensors_header(model_dir / name)
        for key, info in header.items():
            index[key] = (model_dir / name, info, base)
    return index


def read_hf_params(model_dir: str | os.PathLike, cfg: Qwen25VLConfig) -> dict[tuple, np.ndarray]:
    """Our parameter path -> array in our layout, after checking every key and shape of the checkpoint."""
    model_dir = Path(model_dir)
    stored = {}
    for key, ref in tensor_index(model_dir).items():
        canonical = canonical_key(key)
        if canonical.endswith(IGNORED_SUFFIXES) or (canonical == TIED_HEAD and cfg.text.tie_word_embeddings):
            continue
        stored[canonical] = (key, ref)
    entries = build_mapping(cfg)
    shapes = param_shapes(cfg)
    problems = []
    expected = {e.hf_key for e in entries}
    problems += [f"missing key '{e.hf_key}' (parameter {path_str(e.path)})" for e in entries if e.hf_key not in stored]
    problems += [f"unexpected key '{stored[k][0]}'" for k in sorted(set(stored) - expected)]
    for e in entries:
        if e.hf_key not in stored:
            continue
        key, (_, info, _) = stored[e.hf_key]
        want = tuple(e.transform.to_hf(np.zeros(shapes[e.path], np.int8)).shape)
        if tuple(info["shape"]) != want:
            problems.append(f"key '{key}' has shape {tuple(info['shape'])}, expected {want}")
        if info["dtype"] not in _ST_DTYPES:
            problems.append(f"key '{key}' has dtype {info['dtype']}; expected a float type ({', '.join(_ST_DTYPES)})")
    if problems:
        raise CheckpointError(f"checkpoint {model_dir} does not fit the Qwen2.5-VL config: " + "; ".join(problems))
    params = {}
    for e in entries:
        _, (file, info, base) = stored[e.hf_key]
        start, stop = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        with open(file, "rb") as f:
            f.seek(base + start)
            raw = np.frombuffer(f.read(stop - start), dtype=dtype).reshape(info["shape"])
        params[e.path] = e.transform.to_ours(raw, shapes[e.path])
    return params


def hf_tensors(cfg: Qwen25VLConfig, model: Qwen25VLModel) -> dict[str, np.ndarray]:
    """The model's parameters under their HF keys, in torch's layout (the inverse of `read_hf_params`)."""
    params = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return {e.hf_key: np.ascontiguousarray(e.transform.to_hf(params[e.path])) for e in build_mapping(cfg)}


def load_pretrained(model_dir: str | os.PathLike, dtype=jnp.float32) -> tuple[Qwen25VLConfig, Qwen25VLModel]:
    """(config, model) from a Hugging Face Qwen2.5-VL directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory '{model_dir}' does not exist: give a Hugging Face Qwen2.5-VL "
                                f"directory")
    cfg = Qwen25VLConfig.from_json(model_dir)
    return cfg, model_from_params(cfg, read_hf_params(model_dir, cfg), dtype)
