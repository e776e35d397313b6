"""Tiny random LLaVA models and tokenizers, built offline with transformers, for the tests.

Sizes are deliberately odd (6 query heads over 3 kv heads, widths 45/61) so a wrong axis fails loudly.
The vision tower sees 56x56 images in 14px patches: a 4x4 grid of 16 visual tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

WORDS = (
    "a chat between curious user and an artificial intelligence assistant the gives helpful detailed "
    "polite answers to user's questions answer question using single word or phrase is there in image "
    "yes no what colour of red green blue circle square triangle how many one two three cat dog left "
    "right please USER ASSISTANT"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
PUNCT = [":", ".", ",", "?", "'", "s"]


def make_tokenizer(out_dir: str | os.PathLike):
    """A word-level fast tokenizer with `<image>` as a special token; returns it after saving."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + PUNCT + [w for w in dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    fast.add_bos_token = True
    fast.padding_side = "left"
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_hf_config(**overrides):
    """A tiny `LlavaConfig`. Overrides: any top-level LlavaConfig field, or `text_*` / `vision_*` keys."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = dict(hidden_size=48, intermediate_size=61, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=3, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5,
                rope_theta=500.0, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=40, intermediate_size=45, num_hidden_layers=3, num_attention_heads=5,
                  image_size=56, patch_size=14, projection_dim=16)
    top = dict(image_token_index=4, vision_feature_layer=-2, vision_feature_select_strategy="default")
    for key, value in overrides.items():
        if key.startswith("text_"):
            text[key[5:]] = value
        elif key.startswith("vision_"):
            vision[key[7:]] = value
        else:
            top[key] = value
    rope_theta = text.pop("rope_theta")
    text_cfg = LlamaConfig(**text)
    text_cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text_cfg, **top)


def make_hf_model(seed: int = 0, weight_scale: float = 0.08, **overrides):
    """A random-weight `LlavaForConditionalGeneration` in fp32 eval mode, with non-trivial norms."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_hf_config(**overrides)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF initialises norms to ones and biases to zeros: randomise them so their mapping is tested.
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * weight_scale)
    return model


def save_hf_model(out_dir: str | os.PathLike, seed: int = 0, **overrides):
    """Writes a real HF directory (config, safetensors, tokenizer); returns (model, tokenizer)."""
    out_dir = Path(out_dir)
    model = make_hf_model(seed=seed, **overrides)
    model.save_pretrained(str(out_dir))
    tok = make_tokenizer(out_dir)
    return model, tok


def random_pixels(batch: int, size: int = 56, seed: int = 0) -> np.ndarray:
    """Normalised-looking pixel values `[B, 3, size, size]` in fp32."""
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def photo(width: int, height: int, seed: int = 0):
    """A photo-like RGB PIL image: smooth gradients, a few shapes and sensor noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(xx / (7 + 13 * rng.random())),
        127 + 100 * np.cos(yy / (5 + 11 * rng.random())),
        255 * (xx + yy) / (width + height),
    ], axis=-1)
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        draw.ellipse([x0, y0, x0 + int(rng.integers(3, width // 2 + 4)), y0 + int(rng.integers(3, height // 2 + 4))],
                     fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img
