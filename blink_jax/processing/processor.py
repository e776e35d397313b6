"""Prompts + images -> the model's numpy inputs: left-padded token ids with the `<image>` run expanded,
attention mask and pixel values.

Tokenisation follows the original LLaVA `tokenizer_image_token`: the prompt is cut at `<image>` and each
piece is tokenised on its own, so the text after the image starts a fresh tokenisation (with a
SentencePiece Llama tokenizer that gives the same ids the original LLaVA eval saw).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from blink_jax.config import LlavaConfig
from blink_jax.hub import resolve_model_dir
from blink_jax.processing.image import load_image, preprocess_images
from blink_jax.processing.prompt import IMAGE_PLACEHOLDER

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class ProcessorError(ValueError):
    """Inputs or files the processor cannot use, naming the item that is wrong and the fix."""


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def tokenize_with_image(tokenizer, prompt: str, image_token_index: int, num_image_tokens: int, *,
                        images: int = 1) -> list[int]:
    """Token ids of `prompt` [T] with each of its `images` `<image>`s replaced by `num_image_tokens` x
    `image_token_index` (several images: the model's pixel values are [B, images, C, H, W], in prompt order).

    Each text piece is tokenised separately; the first keeps the BOS the tokenizer adds, later pieces
    lose their leading BOS.
    """
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    if len(chunks) != images + 1:
        problem = "has no" if len(chunks) == 1 else f"has {len(chunks) - 1}"
        wanted = "exactly one image per prompt" if images == 1 else f"{images} images here"
        raise ProcessorError(
            f"prompt {_short(prompt)!r} {problem} {IMAGE_PLACEHOLDER!r} placeholder(s): LLaVA-1.5 takes {wanted}; put "
            f"{images} {IMAGE_PLACEHOLDER} where the images go (see build_prompt)")
    bos = tokenizer.bos_token_id
    ids = list(tokenizer(chunks[0]).input_ids)
    for chunk in chunks[1:]:
        piece = list(tokenizer(chunk).input_ids)
        if bos is not None and piece[:1] == [bos]:
            piece = piece[1:]
        ids += [image_token_index] * num_image_tokens + piece
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (input_ids [B, T], attention_mask [B, T]), both int32, padded on the left."""
    length = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), length), pad_id, np.int32)
    attention_mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, length - len(seq):] = seq
            attention_mask[row, length - len(seq):] = 1
    return input_ids, attention_mask


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not model_dir.is_dir():
        raise ProcessorError(f"model directory {str(model_dir)!r} does not exist: point to a Hugging Face LLaVA "
                             f"directory")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ProcessorError(f"model directory {str(model_dir)!r} has no tokenizer files (one of "
                             f"{', '.join(TOKENIZER_FILES)}): copy the tokenizer of the checkpoint there")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ProcessorError(f"cannot load the tokenizer in {str(model_dir)!r} ({e}): check its tokenizer files"
                             ) from None


class Processor:
    """Tokenizer + image preprocessing for one LLaVA config. Call it on parallel lists of prompts and images."""

    def __init__(self, tokenizer, config: LlavaConfig, *, pad_to_square: bool = True):
        self.tokenizer = tokenizer
        self.config = config
        self.pad_to_square = pad_to_square
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, config: LlavaConfig | None = None,
                        pad_to_square: bool = True) -> "Processor":
        """Tokenizer from `model_dir` (AutoTokenizer) and, unless given, the config from its `config.json`."""
        model_dir = resolve_model_dir(model_dir)  # a directory, or a Hugging Face Hub id
        tokenizer = _load_tokenizer(model_dir)
        config = LlavaConfig.from_json(model_dir) if config is None else config
        return cls(tokenizer, config, pad_to_square=pad_to_square)

    def tokenize(self, prompt: str) -> list[int]:
        """One prompt with one `<image>` -> ids [T] with the image run expanded."""
        return tokenize_with_image(self.tokenizer, prompt, self.config.image_token_index,
                                   self.config.num_image_tokens)

    def pixel_values(self, images: Sequence[Image.Image | str | os.PathLike]) -> np.ndarray:
        """Images or image paths -> float32 [B, 3, H, W] at the vision tower's resolution."""
        pil = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
        return preprocess_images(pil, image_size=self.config.vision.image_size, pad_to_square=self.pad_to_square)

    def __call__(self, prompts: Sequence[str], images: Sequence[Image.Image | str | os.PathLike]
                 ) -> dict[str, np.ndarray]:
        """-> {"input_ids": int32 [B, T], "attention_mask": int32 [B, T], "pixel_values": float32 [B, 3, H, W]};
        ids are left-padded with the tokenizer's pad id (0 if it has none)."""
        if isinstance(prompts, str):
            raise ProcessorError("prompts is a single string: pass a list of prompts, one per image")
        if len(prompts) != len(images):
            raise ProcessorError(f"got {len(prompts)} prompts and {len(images)} images: pass one image per prompt")
        if not prompts:
            raise ProcessorError("got no prompts: pass at least one prompt and one image")
        input_ids, attention_mask = left_pad([self.tokenize(p) for p in prompts], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": self.pixel_values(images)}

    def decode(self, ids) -> str:
        """Generated ids [T] -> text, without special tokens, stripped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
