"""Declarative map between Hugging Face LLaVA checkpoint keys and this project's parameter paths.

One table, built from the config: each entry names the HF key (in the hub `llava-hf` layout), our
parameter path (as `nnx.state` flattens it) and the transform that turns the torch tensor into ours.
Every transform has an exact inverse, so HF -> ours -> HF is bit-exact.

The three key layouts of BLINK.md §1 are reduced to the hub layout by `canonical_key` before lookup.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from blink_jax.config import LlavaConfig

Path = tuple  # a parameter path, e.g. ("language_model", "layers", 0, "self_attn", "q_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class Transform:
    """torch tensor -> our array (`to_ours`) and back (`to_hf`), given our array's shape.

    `layout` tells the streaming reader how our array's memory relates to the stored bytes, so it can fill
    our array straight from the file without a second full-size copy: "reshape" (the same bytes, another
    shape), "transpose" (the stored 2-D matrix transposed, then reshaped) or None (apply `to_ours`).
    """
    name: str
    to_ours: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layout: str | None = None


IDENTITY = Transform("identity", lambda x, shape: x.reshape(shape), lambda x: x, "reshape")
# torch Linear weight (out, in) -> kernel (in, out)
LINEAR = Transform("linear", lambda x, shape: x.T.reshape(shape), lambda x: x.T, "transpose")
# torch Linear weight (N*H, D) -> Einsum kernel (D, N, H)
HEADS_OUT = Transform("heads_out", lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(x.shape[0], -1).T,
                      "transpose")
# torch Linear weight (D, N*H) -> Einsum kernel (N, H, D)
HEADS_IN = Transform("heads_in", lambda x, shape: x.T.reshape(shape), lambda x: x.reshape(-1, x.shape[-1]).T,
                     "transpose")
# (N*H,) bias -> (N, H)
HEADS_BIAS = Transform("heads_bias", lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1), "reshape")
# torch Conv2d weight (O, I, kh, kw) -> flax kernel (kh, kw, I, O)
CONV = Transform("conv", lambda x, shape: x.transpose(2, 3, 1, 0).reshape(shape), lambda x: x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: Path
    transform: Transform


def canonical_key(key: str) -> str:
    """Any accepted layout -> the hub llava-hf layout (`language_model.model.*`, `vision_tower.vision_model.*`)."""
    if key.startswith("model.language_model."):
        key = "language_model.model." + key[len("model.language_model."):]
    elif key.startswith("lm_head."):
        key = "language_model." + key
    elif key.startswith("model.vision_tower."):
        key = "vision_tower." + key[len("model.vision_tower."):]
    elif key.startswith("model.multi_modal_projector."):
        key = "multi_modal_projector." + key[len("model.multi_modal_projector."):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def saved_key(canonical: str) -> str:
    """The key transformers 5.x `save_pretrained` writes for a canonical key (the layout `orbax_to_hf` emits)."""
    if canonical.startswith("vision_tower.vision_model."):
        return "vision_tower." + canonical[len("vision_tower.vision_model."):]
    return canonical


def norm_entries(hf: str, ours: Path, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", ours + ("scale",), IDENTITY)]
    if bias:
        out.append(Entry(f"{hf}.bias", ours + ("bias",), IDENTITY))
    return out


def linear_entries(hf: str, ours: Path, bias: bool) -> list[Entry]:
    out = [Entry(f"{hf}.weight", ours + ("kernel",), LINEAR)]
    if bias:
        out.append(Entry(f"{hf}.bias", ours + ("bias",), IDENTITY))
    return out


def heads_entries(hf: str, ours: Path, bias: bool, kind: str) -> list[Entry]:
    out = [Entry(f"{hf}.weight", ours + ("kernel",), HEADS_OUT if kind == "out" else HEADS_IN)]
    if bias:
        out.append(Entry(f"{hf}.bias", ours + ("bias",), HEADS_BIAS if kind == "out" else IDENTITY))
    return out


def build_mapping(cfg: LlavaConfig) -> list[Entry]:
    """Every parameter of the model, once."""
    entries: list[Entry] = []
    vt, vp = "vision_tower.vision_model", ("vision_tower",)
    entries += [
        Entry(f"{vt}.embeddings.class_embedding", vp + ("embeddings", "class_embedding"), IDENTITY),
        Entry(f"{vt}.embeddings.patch_embedding.weight", vp + ("embeddings", "patch_embedding", "kernel"), CONV),
        Entry(f"{vt}.embeddings.position_embedding.weight", vp + ("embeddings", "position_embedding", "embedding"),
              IDENTITY),
    ]
    entries += norm_entries(f"{vt}.pre_layrnorm", vp + ("pre_layrnorm",))
    entries += norm_entries(f"{vt}.post_layernorm", vp + ("post_layernorm",))
    for i in range(cfg.vision.num_hidden_layers):
        hf, ours = f"{vt}.encoder.layers.{i}", vp + ("encoder", "layers", i)
        for name in ("q_proj", "k_proj", "v_proj"):
            entries += heads_entries(f"{hf}.self_attn.{name}", ours + ("self_attn", name), True, "out")
        entries += heads_entries(f"{hf}.self_attn.out_proj", ours + ("self_attn", "out_proj"), True, "in")
        entries += norm_entries(f"{hf}.layer_norm1", ours + ("layer_norm1",))
        entries += norm_entries(f"{hf}.layer_norm2", ours + ("layer_norm2",))
        entries += linear_entries(f"{hf}.mlp.fc1", ours + ("mlp", "fc1"), True)
        entries += linear_entries(f"{hf}.mlp.fc2", ours + ("mlp", "fc2"), True)

    for name in ("linear_1", "linear_2"):
        entries += linear_entries(f"multi_modal_projector.{name}", ("multi_modal_projector", name),
                           cfg.multimodal_projector_bias)

    t, lm, lp = cfg.text, "language_model.model", ("language_model",)
    entries.append(Entry(f"{lm}.embed_tokens.weight", lp + ("embed_tokens", "embedding"), IDENTITY))
    for i in range(t.num_hidden_layers):
        hf, ours = f"{lm}.layers.{i}", lp + ("layers", i)
        for name in ("q_proj", "k_proj", "v_proj"):
            entries += heads_entries(f"{hf}.self_attn.{name}", ours + ("self_attn", name), t.attention_bias, "out")
        entries += heads_entries(f"{hf}.self_attn.o_proj", ours + ("self_attn", "o_proj"), t.attention_bias, "in")
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries += linear_entries(f"{hf}.mlp.{name}", ours + ("mlp", name), t.mlp_bias)
        entries += norm_entries(f"{hf}.input_layernorm", ours + ("input_layernorm",), bias=False)
        entries += norm_entries(f"{hf}.post_attention_layernorm", ours + ("post_attention_layernorm",), bias=False)
    entries += norm_entries(f"{lm}.norm", lp + ("norm",), bias=False)
    if not t.tie_word_embeddings:
        entries += linear_entries("language_model.lm_head", lp + ("lm_head",), False)
    return entries

