"""Declarative map between Hugging Face Qwen2.5-VL checkpoint keys and this port's parameter paths.

One table, built from the config: each entry names the HF key in the layout of the files (the released
checkpoints and transformers 5.x `save_pretrained` alike: `visual.*`, `model.*`, `lm_head.*`), our parameter
path (as `nnx.state` flattens it) and the transform from the torch tensor to ours. Every transform has an
exact inverse, so HF -> ours -> HF is bit-exact. transformers' in-memory `state_dict` names
(`model.visual.*`, `model.language_model.*`) are reduced to the file layout by `canonical_key` before lookup.

`FAMILY` is what the checkpoint readers, writers and loaders of `blink_jax.weights` need of this backbone.
"""

from __future__ import annotations

import re

from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.model.qwen2_5_vl.model import Qwen25VLModel
from blink_jax.weights.family import Family
# The entries and transforms are LLaVA's: the same torch layouts.
from blink_jax.weights.param_mapping import IDENTITY, Entry, Path, Transform, heads_entries, linear_entries


def patch_embed_transform(cfg: Qwen25VLConfig) -> Transform:
    """torch Conv3d weight (D, C, tp, p, p), kernel = stride = one patch -> Linear kernel (C*tp*p*p, D)."""
    v = cfg.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return Transform("conv3d_patch", lambda x, shape: x.reshape(x.shape[0], -1).T.reshape(shape),
                     lambda x: x.T.reshape(conv_shape))




def canonical_key(key: str) -> str:
    """transformers' state_dict names (`model.visual.*`, `model.language_model.*`) or the file layout -> the
    file layout (`visual.*`, `model.*`)."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def rms_norm_entry(hf: str, ours: Path) -> Entry:
    return Entry(f"{hf}.weight", ours + ("scale",), IDENTITY)


def build_mapping(cfg: Qwen25VLConfig) -> list[Entry]:
    """Every parameter of the model, once."""
    vt, vp = "visual", ("visual",)
    entries = [Entry(f"{vt}.patch_embed.proj.weight", vp + ("patch_embed", "kernel"), patch_embed_transform(cfg))]
    for i in range(cfg.vision.depth):
        hf, ours = f"{vt}.blocks.{i}", vp + ("blocks", i)
        entries += [rms_norm_entry(f"{hf}.norm1", ours + ("norm1",)), rms_norm_entry(f"{hf}.norm2", ours + ("norm2",))]
        entries += linear_entries(f"{hf}.attn.qkv", ours + ("attn", "qkv"), True)
        entries += linear_entries(f"{hf}.attn.proj", ours + ("attn", "proj"), True)
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries += linear_entries(f"{hf}.mlp.{name}", ours + ("mlp", name), True)
    entries.append(rms_norm_entry(f"{vt}.merger.ln_q", vp + ("merger", "ln_q")))
    entries += linear_entries(f"{vt}.merger.mlp.0", vp + ("merger", "fc1"), True)
    entries += linear_entries(f"{vt}.merger.mlp.2", vp + ("merger", "fc2"), True)

    t, lm, lp = cfg.text, "model", ("language_model",)
    entries.append(Entry(f"{lm}.embed_tokens.weight", lp + ("embed_tokens", "embedding"), IDENTITY))
    for i in range(t.num_hidden_layers):
        hf, ours = f"{lm}.layers.{i}", lp + ("layers", i)
        for name in ("q_proj", "k_proj", "v_proj"):
            entries += heads_entries(f"{hf}.self_attn.{name}", ours + ("self_attn", name), True, "out")
        entries += heads_entries(f"{hf}.self_attn.o_proj", ours + ("self_attn", "o_proj"), False, "in")
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries += linear_entries(f"{hf}.mlp.{name}", ours + ("mlp", name), False)
        entries += [rms_norm_entry(f"{hf}.input_layernorm", ours + ("input_layernorm",)),
                    rms_norm_entry(f"{hf}.post_attention_layernorm", ours + ("post_attention_layernorm",))]
    entries.append(rms_norm_entry(f"{lm}.norm", lp + ("norm",)))
    if not t.tie_word_embeddings:
        entries += linear_entries("lm_head", lp + ("lm_head",), False)
    return entries


FAMILY = Family(
    model_type="qwen2_5_vl", name="Qwen2.5-VL", config_class=Qwen25VLConfig, model_class=Qwen25VLModel,
    build_mapping=build_mapping, canonical_key=canonical_key,
    saved_key=lambda key: key,  # the canonical layout is the one transformers 5 saves
    tied_head="lm_head.weight",
    # buffers older transformers versions saved; not parameters
    ignored_buffers=re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$"),
    layout="the file layout (visual.*, model.*, lm_head.*)")
