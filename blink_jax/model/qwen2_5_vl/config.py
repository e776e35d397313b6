"""Frozen configs of Qwen2.5-VL: the windowed ViT with its 2x2 patch merger, and the Qwen2 decoder with M-RoPE.

Built from a Hugging Face `config.json` through transformers' own `Qwen2_5_VLConfig`, so fields a hub config
leaves out get transformers' defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from blink_jax.config import ACTIVATIONS, ConfigError


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # in pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # hard-coded in transformers' vision blocks and merger
    mlp_bias: bool = True  # the vision SwiGLU has biases (read by `llama.MLP`)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def window_cells(self) -> int:
        """Side of an attention window in merged cells (2x2 patches each)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class QwenTextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None
    mlp_bias: bool = False  # read by `llama.MLP`

    @property
    def head_dim(self) -> int:
        # transformers' Qwen2.5-VL attention derives it from the width; a `head_dim` field is ignored there.
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: QwenVisionConfig = QwenVisionConfig()
    text: QwenTextConfig = QwenTextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        v, t = self.vision, self.text
        for name, act in (("vision_config.hidden_act", v.hidden_act), ("text_config.hidden_act", t.hidden_act)):
            if act not in ACTIVATIONS:
                raise ConfigError(f"{name}={act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ConfigError(f"vision_config: hidden_size={v.hidden_size} over num_heads={v.num_heads} must give a "
                              f"head dim divisible by 4 (2-D rotary splits it into h and w halves)")
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"text_config: num_attention_heads={t.num_attention_heads} must divide "
                              f"hidden_size={t.hidden_size} and be a multiple of "
                              f"num_key_value_heads={t.num_key_value_heads}")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ConfigError(f"text_config rope_parameters.mrope_section={list(t.mrope_section)} sums to "
                              f"{sum(t.mrope_section)}; it must sum to head_dim / 2 = {t.head_dim // 2}")
        if v.window_cells < 1:
            raise ConfigError(f"vision_config.window_size={v.window_size} is smaller than one merged cell "
                              f"({v.spatial_merge_size * v.patch_size} px)")
        if v.out_hidden_size != t.hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size={v.out_hidden_size} must equal text_config.hidden_size="
                              f"{t.hidden_size}: merged image tokens are spliced into the text embeddings")
        for i in v.fullatt_block_indexes:
            if not 0 <= i < v.depth:
                raise ConfigError(f"vision_config.fullatt_block_indexes holds {i}, outside the {v.depth} blocks")

    @classmethod
    def qwen2_5_vl_7b(cls) -> "Qwen25VLConfig":
        return cls()

    @classmethod
    def qwen2_5_vl_3b(cls) -> "Qwen25VLConfig":
        return cls(vision=QwenVisionConfig(out_hidden_size=2048),
                   text=QwenTextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                       tie_word_embeddings=True))

    @property
    def merge_unit(self) -> int:
        """Patches per merged (LLM) token."""
        return self.vision.spatial_merge_size ** 2

    @classmethod
    def from_hf_config(cls, hf: Any) -> "Qwen25VLConfig":
        """From a transformers `Qwen2_5_VLConfig` object (or anything with its attributes)."""
        model_type = getattr(hf, "model_type", None)
        if model_type != "qwen2_5_vl":
            raise ConfigError(f"config model_type is {model_type!r}, expected 'qwen2_5_vl': this is not a "
                              f"Qwen2.5-VL checkpoint (Qwen2_5_VLForConditionalGeneration)")
        v, t = hf.vision_config, hf.text_config
        v_rope = getattr(v, "rope_parameters", None) or {}
        if v_rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision_config rope_type={v_rope.get('rope_type')!r} is not supported (only 'axial')")
        rope = getattr(t, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"text_config rope_type={rope.get('rope_type')!r} is not supported (only M-RoPE "
                              f"'default'/'mrope')")
        if getattr(t, "use_sliding_window", False) or "sliding_attention" in (getattr(t, "layer_types", None) or ()):
            raise ConfigError("text_config.use_sliding_window=true is not supported: transformers runs it only "
                              "with flash attention; set it to false")
        eos = t.eos_token_id
        vision = QwenVisionConfig(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            hidden_act=v.hidden_act, in_channels=v.in_channels, patch_size=_int(v.patch_size, "patch_size"),
            temporal_patch_size=_int(v.temporal_patch_size, "temporal_patch_size"),
            spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
            fullatt_block_indexes=tuple(v.fullatt_block_indexes), out_hidden_size=v.out_hidden_size,
            rope_theta=float(v_rope.get("rope_theta", 10000.0)))
        text = QwenTextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads or t.num_attention_heads, rms_norm_eps=t.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", 1000000.0)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))), hidden_act=t.hidden_act,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            bos_token_id=t.bos_token_id, eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=t.pad_token_id)
        return cls(vision=vision, text=text, image_token_id=hf.image_token_id, video_token_id=hf.video_token_id,
                   vision_start_token_id=hf.vision_start_token_id, vision_end_token_id=hf.vision_end_token_id)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Qwen25VLConfig":
        """From a `config.json` file or a directory holding one."""
        from transformers import AutoConfig

        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json at {file}: point to a Hugging Face Qwen2.5-VL directory")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        if raw.get("model_type") != "qwen2_5_vl":
            raise ConfigError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'qwen2_5_vl': this is not "
                              f"a Qwen2.5-VL checkpoint (Qwen2_5_VLForConditionalGeneration)")
        return cls.from_hf_config(AutoConfig.from_pretrained(str(file.parent)))


def _int(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"vision_config.{name}={list(value)}: only equal sizes per axis are supported")
        value = value[0]
    return int(value)
