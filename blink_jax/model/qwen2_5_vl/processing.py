"""Qwen2.5-VL preprocessing: transformers' `Qwen2VLImageProcessor` (its PIL backend) step for step, and prompts
through the model directory's chat template, as `Qwen2_5_VLProcessor` builds them.

Image: RGB -> smart resize (both sides multiples of patch x merge = 28, pixel count within
[min_pixels, max_pixels], aspect ratio kept) with PIL bicubic on uint8 -> `* 1/255` in float64 -> CLIP
normalisation in float32 -> patches flattened as the vision tower reads them: 2x2 blocks of patches
row-major over the merged grid, each patch (C, temporal copy, p, p) with the still frame repeated
`temporal_patch_size` times. `image_grid_thw` is (1, H / p, W / p).

Fixed grid shapes (BLINK.md §10, ours): with `ImageProcessorConfig.grid_shapes` set (e.g. from `grid_buckets`),
an image is resized to the shape of that small set nearest its aspect ratio (`nearest_grid`) instead of its own
smart resize, so the eval batches images of one shape together and compiles one program per shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.processing.image import CLIP_MEAN, CLIP_STD, load_image, normalize
from blink_jax.processing.processor import ProcessorError, left_pad

IMAGE_PAD = "<|image_pad|>"  # the chat template's one placeholder per image
# (ours) Width / height of the eval's aspect-ratio buckets (BLINK.md §10): portrait 1:2 to landscape 2:1.
ASPECT_RATIOS = (1 / 2, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 2)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    # (Gh, Gw) merged-token grids every image is resized to (the nearest in aspect ratio); None: smart resize.
    grid_shapes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.grid_shapes is not None:
            shapes = tuple((int(gh), int(gw)) for gh, gw in self.grid_shapes)
            if not shapes or any(gh < 1 or gw < 1 for gh, gw in shapes):
                raise ProcessorError(f"grid_shapes={self.grid_shapes} must list (Gh, Gw) pairs of positive ints")
            object.__setattr__(self, "grid_shapes", shapes)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        """From `preprocessor_config.json` (a file or the directory holding it); either the hub's
        `min_pixels`/`max_pixels` or transformers 5.x's `size: {shortest_edge, longest_edge}`."""
        path = Path(path)
        file = path / "preprocessor_config.json" if path.is_dir() else path
        if not file.is_file():
            raise ProcessorError(f"no preprocessor_config.json at {file}: copy the checkpoint's image processor "
                                 f"config there")
        raw = json.loads(file.read_text())
        size = raw.get("size") or {}
        for key, want in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if key in raw and not np.allclose(raw[key], want, rtol=0, atol=1e-8):
                raise ProcessorError(f"{file}: {key}={raw[key]} differs from the CLIP values {list(want)} that "
                                     f"this preprocessing uses")
        if raw.get("do_resize") is False or raw.get("do_normalize") is False or raw.get("do_rescale") is False:
            raise ProcessorError(f"{file}: do_resize/do_rescale/do_normalize must be true (or absent)")
        return cls(min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
                   max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
                   patch_size=int(raw.get("patch_size", 14)),
                   temporal_patch_size=int(raw.get("temporal_patch_size", 2)), merge_size=int(raw.get("merge_size", 2)))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the pixel count in [min_pixels, max_pixels]
    (transformers' `smart_resize`, the same float operations)."""
    if max(height, width) / min(height, width) > 200:
        raise ProcessorError(f"image of {width}x{height} has an aspect ratio above 200: crop it first")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def grid_buckets(max_pixels: int, factor: int, *, multiple: int = 1,
                 aspect_ratios: Sequence[float] = ASPECT_RATIOS) -> tuple[tuple[int, int], ...]:
    """The eval's fixed grid shapes (ours, BLINK.md §10): per aspect ratio (width / height), the largest merged grid
    (Gh, Gw) with both sides multiples of `multiple` (Blink's region size r), Gw the multiple nearest Gh x ratio,
    and at most `max_pixels` pixels (Gh factor x Gw factor); in the order of `aspect_ratios`, duplicates dropped."""
    cells = max_pixels // (factor * factor)
    shapes = []
    for ratio in aspect_ratios:
        fits = [(gh, max(multiple, int(gh * ratio / multiple + 0.5) * multiple))
                for gh in range(multiple, cells // multiple + 1, multiple)]
        fits = [(gh, gw) for gh, gw in fits if gh * gw <= cells]
        if not fits:
            raise ProcessorError(f"max_pixels={max_pixels} holds no grid of {multiple} x {multiple} merged cells "
                                 f"({multiple * factor} px square): raise max_pixels or lower the region size")
        best = max(fits, key=lambda s: (s[0] * s[1], -abs(math.log(s[1] / s[0] / ratio))))
        if best not in shapes:
            shapes.append(best)
    return tuple(shapes)


def nearest_grid(height: int, width: int, shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The grid shape (Gh, Gw) whose aspect ratio is nearest the image's (in log ratio; ties: the larger grid)."""
    target = math.log(width / height)
    return min(shapes, key=lambda s: (abs(math.log(s[1] / s[0]) - target), -s[0] * s[1]))


def patchify(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """[C, H, W] -> [H/p * W/p, C * tp * p * p] in the vision tower's order (see the module docstring)."""
    c, h, w = pixels.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    patches = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], patches.shape[:5] + (tp, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * tp * p * p))


def resized_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """The (height, width) in pixels an image of this size is resized to: its grid shape's with `grid_shapes`,
    else the smart resize."""
    if cfg.grid_shapes is None:
        return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    gh, gw = nearest_grid(height, width, cfg.grid_shapes)
    return gh * cfg.factor, gw * cfg.factor


def resize_uint8(img: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image -> uint8 [H, W, 3], resized as the model sees it (before normalisation; what crops are cut from)."""
    img = img.convert("RGB")
    height, width = resized_size(img.height, img.width, cfg)
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC))


def uint8_patches(resized: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 [H, W, 3] (sides multiples of patch x merge) -> (patches float32 [h * w, patch_dim], grid (1, h, w))."""
    height, width = resized.shape[:2]
    if height % cfg.factor or width % cfg.factor:
        raise ProcessorError(f"image of {width}x{height} px: both sides must be multiples of {cfg.factor}")
    return patchify(normalize(resized), cfg), (1, height // cfg.patch_size, width // cfg.patch_size)


def preprocess_image(img: Image.Image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches float32 [h * w, patch_dim], grid (1, h, w) in patches)."""
    return uint8_patches(resize_uint8(img, cfg), cfg)


def preprocess_images(images: Sequence[Image.Image], cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """-> (pixel_values float32 [sum of h*w, patch_dim], image_grid_thw int64 [I, 3]), images in order."""
    out = [preprocess_image(img, cfg) for img in images]
    return np.concatenate([o[0] for o in out]), np.asarray([o[1] for o in out], np.int64)


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ProcessorError(f"cannot load the tokenizer in {str(model_dir)!r} ({e}): check its tokenizer files"
                             ) from None
    if not tokenizer.chat_template:
        for name in ("chat_template.jinja", "chat_template.json"):
            file = model_dir / name
            if file.is_file():
                text = file.read_text()
                tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise ProcessorError(f"{model_dir} has no chat template (tokenizer_config.json, chat_template.jinja or "
                                 f"chat_template.json): copy the checkpoint's template there")
    return tokenizer


class QwenProcessor:
    """Tokenizer, chat template and image preprocessing of one Qwen2.5-VL directory: call it on parallel lists
    of questions and images (one image per question)."""

    def __init__(self, tokenizer, config: Qwen25VLConfig, image_config: ImageProcessorConfig):
        if image_config.merge_size != config.vision.spatial_merge_size or \
                image_config.patch_size != config.vision.patch_size or \
                image_config.temporal_patch_size != config.vision.temporal_patch_size:
            raise ProcessorError(f"image processor {image_config} does not match the vision tower's patch_size="
                                 f"{config.vision.patch_size}, temporal_patch_size={config.vision.temporal_patch_size}"
                                 f", spatial_merge_size={config.vision.spatial_merge_size}")
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD) != config.image_token_id:
            raise ProcessorError(f"the tokenizer's {IMAGE_PAD} is id {tokenizer.convert_tokens_to_ids(IMAGE_PAD)}, "
                                 f"but config.json's image_token_id is {config.image_token_id}")
        self.tokenizer, self.config, self.image_config = tokenizer, config, image_config
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *,
                        grid_shapes: Sequence[tuple[int, int]] | None = None) -> "QwenProcessor":
        """`grid_shapes`: resize every image to the nearest of these merged grids (e.g. `grid_buckets(...)`), so
        that images of one shape batch together (Blink needs one grid per batch; see `grid_of`)."""
        model_dir = Path(model_dir)
        image_config = dataclasses.replace(ImageProcessorConfig.from_json(model_dir), grid_shapes=grid_shapes)
        return cls(_load_tokenizer(model_dir), Qwen25VLConfig.from_json(model_dir), image_config)

    def grid_of(self, image: Image.Image) -> tuple[int, int]:
        """The merged grid (Gh, Gw) this processor gives `image`: the key to batch images of one shape by."""
        height, width = resized_size(image.height, image.width, self.image_config)
        return height // self.image_config.factor, width // self.image_config.factor

    def prompt(self, question: str) -> str:
        """The chat-template text of one user turn holding an image then `question`, ready for the answer."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(IMAGE_PAD) != 1:
            raise ProcessorError(f"the chat template renders {text.count(IMAGE_PAD)} {IMAGE_PAD} for one image: "
                                 f"use the checkpoint's Qwen2.5-VL template")
        return text

    def image_prefix(self) -> str:
        """The chat-template text up to and including the image placeholder: all a visual token's hidden states
        depend on under causal attention (the TokenSR teacher's prompt)."""
        text = self.prompt("")
        return text[:text.index(IMAGE_PAD) + len(IMAGE_PAD)]

    def tokenize(self, text: str, grid_thw) -> list[int]:
        """Templated text with one `<|image_pad|>` -> ids with it repeated once per merged token."""
        n = int(np.prod(grid_thw)) // self.image_config.merge_size ** 2
        return list(self.tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * n)).input_ids)

    def __call__(self, questions: Sequence[str], images: Sequence[Image.Image | str | os.PathLike]
                 ) -> dict[str, np.ndarray]:
        """-> {"input_ids", "attention_mask": int32 [B, T] left padded, "pixel_values": float32 [P, patch_dim],
        "image_grid_thw": int64 [B, 3]}."""
        if isinstance(questions, str):
            raise ProcessorError("questions is a single string: pass a list of questions, one per image")
        if len(questions) != len(images) or not questions:
            raise ProcessorError(f"got {len(questions)} questions and {len(images)} images: pass one image per "
                                 f"question, at least one")
        pil = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
        pixel_values, grid = preprocess_images(pil, self.image_config)
        ids = [self.tokenize(self.prompt(q), g) for q, g in zip(questions, grid)]
        input_ids, attention_mask = left_pad(ids, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_grid_thw": grid}

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
