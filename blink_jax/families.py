"""The model families this library reads and writes, by `config.json`'s `model_type` (`blink_jax.weights.family`).

A new backbone adds its `Family` (beside its key map) to `FAMILIES`; the converter, the exporter and
`load_pretrained` then take its directories.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from blink_jax.config import ConfigError
from blink_jax.model.qwen2_5_vl.param_mapping import FAMILY as QWEN2_5_VL
from blink_jax.weights.family import LLAVA, Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAVA, QWEN2_5_VL)}


def model_type(path: str | os.PathLike) -> str | None:
    """The `model_type` of a model directory's config.json (None when it has none or cannot be read)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def family_of(path: str | os.PathLike) -> Family:
    """The family of the model in directory `path` (Hugging Face or converted), by its config.json's `model_type`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"no config.json at {file}: point to a Hugging Face model directory ("
                          f"{', '.join(f.name for f in FAMILIES.values())}) or one written by "
                          f"`python -m checkpoints_conversion.hf_to_orbax`")
    kind = model_type(path)
    if kind not in FAMILIES:
        raise ConfigError(f"{file}: model_type is {kind!r}; supported: "
                          f"{', '.join(f'{t!r} ({f.name})' for t, f in FAMILIES.items())}")
    return FAMILIES[kind]
