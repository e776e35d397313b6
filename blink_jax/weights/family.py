"""A model family: what checkpoint reading, writing and loading need to know about one backbone.

`hf_reader`, `orbax_io`, `hf_writer` and `blink_jax.loading` are written once, over a `Family`: its config class,
its model class, its declarative key map (`param_mapping`-style `Entry` list), how stored keys reduce to the map's
layout and back, and which stored keys are not parameters. LLaVA-1.5's family is here (its key map is
`param_mapping`); each further backbone declares its own beside its key map (Qwen2.5-VL:
`blink_jax.model.qwen2_5_vl.param_mapping.FAMILY`), and `blink_jax.families` picks one by `config.json`'s
`model_type`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from blink_jax.config import LlavaConfig
from blink_jax.model.llava import LlavaModel
from blink_jax.weights import param_mapping


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # config.json's `model_type`
    name: str  # for messages: "LLaVA", "Qwen2.5-VL"
    config_class: type  # a frozen config with `from_json(dir)`
    model_class: type  # the NNX model, built as model_class(cfg, param_dtype=, rngs=)
    build_mapping: Callable  # cfg -> list[param_mapping.Entry], every parameter once
    canonical_key: Callable[[str], str]  # any accepted stored key -> the key map's layout
    saved_key: Callable[[str], str]  # the key map's layout -> the layout `orbax_to_hf` writes
    tied_head: str  # the head's canonical key: ignored when the config ties the word embeddings
    ignored_buffers: re.Pattern  # canonical keys of saved buffers that are not parameters
    layout: str  # the layout the key map names keys in, for error messages

    def config(self, model_dir):
        """The family's config read from `model_dir`'s config.json."""
        return self.config_class.from_json(model_dir)

    def ignored(self, canonical: str, cfg) -> bool:
        """Whether a stored key is skipped as transformers skips it (a buffer, or the head of a tied model)."""
        return bool(self.ignored_buffers.search(canonical)) or (
            canonical == self.tied_head and cfg.text.tie_word_embeddings)


LLAVA = Family(
    model_type="llava", name="LLaVA", config_class=LlavaConfig, model_class=LlavaModel,
    build_mapping=param_mapping.build_mapping, canonical_key=param_mapping.canonical_key,
    saved_key=param_mapping.saved_key, tied_head="language_model.lm_head.weight",
    ignored_buffers=re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$"), layout="the llava-hf hub layout")
