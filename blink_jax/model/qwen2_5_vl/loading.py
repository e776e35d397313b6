"""Qwen2.5-VL's parameters: a model from a Hugging Face directory, and a model's tensors under their HF keys.

The reading is the library's, as for LLaVA (`blink_jax.weights.hf_reader` over this family's key map,
`param_mapping.FAMILY`): safetensors or torch pickles, single or sharded, every key and shape checked from the
file headers before any tensor is read, one `CheckpointError` naming every missing, unexpected or misshaped key.
Ignored, as transformers ignores them: rotary `inv_freq` buffers, and `lm_head.weight` when the config ties the
word embeddings (the model reuses `embed_tokens`). `blink_jax.load_pretrained` reads converted directories too,
and loads born sharded on a mesh.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.model.qwen2_5_vl.model import Qwen25VLModel
from blink_jax.model.qwen2_5_vl.param_mapping import FAMILY, build_mapping
from blink_jax.weights import hf_reader
from blink_jax.weights import params as params_lib


def abstract_model(cfg: Qwen25VLConfig, dtype=jnp.float32) -> Qwen25VLModel:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory, no random init."""
    return params_lib.abstract_model(cfg, dtype, Qwen25VLModel)


def param_shapes(cfg: Qwen25VLConfig) -> dict[tuple, tuple]:
    return params_lib.param_shapes(cfg, Qwen25VLModel)


def model_from_params(cfg: Qwen25VLConfig, params: dict[tuple, np.ndarray], dtype=jnp.float32) -> Qwen25VLModel:
    """A model whose parameters are exactly `params` (path -> array, every one, exact shapes, finite), cast to
    `dtype` (`blink_jax.weights.params.model_from_params`)."""
    return params_lib.model_from_params(cfg, params, dtype, Qwen25VLModel)


def read_hf_params(model_dir: str | os.PathLike, cfg: Qwen25VLConfig) -> dict[tuple, np.ndarray]:
    """Our parameter path -> array in our layout, after checking every key and shape of the checkpoint."""
    return hf_reader.read_params(model_dir, cfg, family=FAMILY)


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
