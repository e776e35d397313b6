"""Frozen configs of the LLaVA-1.5 backbone: CLIP vision tower, projector, Llama language model.

Built from a Hugging Face `config.json` through transformers' own `LlavaConfig`, so the defaults that
hub configs leave out (llava-1.5-7b's text config lists only a handful of keys) are transformers' defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu", "relu")


class ConfigError(ValueError):
    """A config that this port cannot run, with the field that is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: expected 'default' or 'full'")
        n = self.vision.num_hidden_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ConfigError(f"vision_feature_layer {layer} is out of range for a vision tower of {n} layers "
                                  f"(hidden_states has {n + 1} entries)")
        for name, act in (("vision.hidden_act", self.vision.hidden_act), ("projector_hidden_act",
                          self.projector_hidden_act), ("text.hidden_act", self.text.hidden_act)):
            if act not in ACTIVATIONS:
                raise ConfigError(f"{name}={act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if self.text.num_attention_heads % self.text.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.text.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.text.num_key_value_heads}")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        fl = self.vision_feature_layer
        return (fl,) if isinstance(fl, int) else tuple(fl)

    @property
    def num_image_tokens(self) -> int:
        """How many `<image>` placeholder ids one image takes in the prompt (576 for LLaVA-1.5)."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def vision_layers_needed(self) -> int:
        """Encoder layers that must run: hidden_states[i] is the output of layer i (0 = embeddings)."""
        n = self.vision.num_hidden_layers
        return max(layer % (n + 1) for layer in self.feature_layers)

    @classmethod
    def llava_1_5_7b(cls) -> "LlavaConfig":
        return cls()

    @classmethod
    def llava_1_5_13b(cls) -> "LlavaConfig":
        return cls(text=TextConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                   num_attention_heads=40, num_key_value_heads=40))

    @classmethod
    def from_hf_config(cls, hf: Any) -> "LlavaConfig":
        """From a transformers `LlavaConfig` object (or anything with its attributes)."""
        model_type = getattr(hf, "model_type", None)
        if model_type != "llava":
            raise ConfigError(f"config model_type is {model_type!r}, expected 'llava': this is not a LLaVA "
                              f"checkpoint (LlavaForConditionalGeneration)")
        v, t = hf.vision_config, hf.text_config
        if getattr(v, "model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ConfigError(f"vision_config.model_type is {v.model_type!r}; only CLIP vision towers are supported")
        if getattr(t, "model_type", "llama") != "llama":
            raise ConfigError(f"text_config.model_type is {t.model_type!r}; only Llama language models are supported")
        rope = getattr(t, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"text_config rope_type={rope_type!r} is not supported (only 'default' RoPE)")
        rope_theta = rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))
        fl = hf.vision_feature_layer
        vision = VisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
            layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        eos = t.eos_token_id
        text = TextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads or t.num_attention_heads, head_dim=head_dim,
            rms_norm_eps=t.rms_norm_eps, rope_theta=float(rope_theta),
            max_position_embeddings=t.max_position_embeddings,
            attention_bias=bool(getattr(t, "attention_bias", False)), mlp_bias=bool(getattr(t, "mlp_bias", False)),
            hidden_act=t.hidden_act,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False)),
            bos_token_id=t.bos_token_id, eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=t.pad_token_id)
        return cls(
            vision=vision, text=text,
            image_token_index=getattr(hf, "image_token_id", None) or hf.image_token_index,
            projector_hidden_act=hf.projector_hidden_act,
            multimodal_projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
            vision_feature_layer=fl if isinstance(fl, int) else tuple(fl),
            vision_feature_select_strategy=hf.vision_feature_select_strategy)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LlavaConfig":
        """From a `config.json` file or a directory holding one."""
        from transformers import AutoConfig

        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}: point to a Hugging Face LLaVA directory")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        if raw.get("model_type") != "llava":
            raise ConfigError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'llava': this is not a "
                              f"LLaVA checkpoint (LlavaForConditionalGeneration)")
        return cls.from_hf_config(AutoConfig.from_pretrained(str(file.parent)))
