"""Image loading and the LLaVA-1.5 eval preprocessing: optional pad-to-square, then CLIP.

The CLIP part reproduces transformers' PIL-backend `CLIPImageProcessor` (`CLIPImageProcessorPil` in
transformers 5.x) step for step, including its rounding, so pixel values match it to the last bit:
resize the shortest side with PIL bicubic on uint8, centre crop, `* (1/255)` in float64, then
normalise in float32. Two stages, `preprocess_uint8` (the image the model sees) and `normalize`, so
everything that shows or crops that image (training's teacher crops, eval's reports) uses this one path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The pad colour of the original LLaVA eval: `tuple(int(x * 255) for x in image_processor.image_mean)`.
CLIP_MEAN_RGB = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104)


class ImageError(ValueError):
    """An image file that cannot be used, with the file's path and what to do about it."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file as RGB, as the original LLaVA eval does (`.convert("RGB")`).

    Decoding happens here, so a truncated or corrupt file fails with its name rather than inside a batch.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"image file {path!r} does not exist: check the image folder and the file name")
    try:
        with Image.open(path) as img:
            load_strictly(img)
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"image file {path!r} cannot be read as an image (PIL: {e}): replace or remove it") from None


# PIL's modes of 16- and 32-bit integer pixels (16-bit PNGs open as one of them): `convert("RGB")` clips them at
# 255, which turns a 16-bit image white.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def load_strictly(img: Image.Image) -> None:
    """`img.load()`, failing on a truncated file even where another library (lmms-eval's tasks do) has set PIL's
    process-wide `ImageFile.LOAD_TRUNCATED_IMAGES`, which would fill the missing part with grey silently."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def to_rgb(img: Image.Image) -> Image.Image:
    """`img.convert("RGB")`, with 16-bit images scaled to 8 bits (v * 255 / 65535, rounded) instead of clipped."""
    if img.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(img, dtype=np.float64)
        if wide.max(initial=0) > 255 or img.mode != "I":  # "I" also holds 8-bit data: leave that as it is
            wide = np.round(np.clip(wide, 0, 65535) * (255.0 / 65535.0))
        img = Image.fromarray(wide.astype(np.uint8), mode="L")
    return img.convert("RGB")


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pastes `img` centred on a square canvas of side max(w, h) filled with `background` (LLaVA's `mm_utils`)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after resizing the shortest side to `shortest_edge`; the long side is truncated,
    as transformers' `get_resize_output_image_size(..., default_to_square=False)` does."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Centre `size`x`size` crop of `pixels` [H, W, C] (H, W >= size), with transformers' rounding."""
    height, width = pixels.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from an image of {width}x{height}: resize it first")
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top:top + size, left:left + size]


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] scaled to [0, 1] and normalised with the CLIP mean/std."""
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


def preprocess_uint8(img: Image.Image, *, image_size: int = 336, pad_to_square: bool = True) -> np.ndarray:
    """One PIL image -> the image the model sees, before normalisation: uint8 [image_size, image_size, 3].

    `pad_to_square=True` is the original LLaVA-1.5 eval (expand2square with the CLIP mean colour);
    `False` is what llava-hf's processor does (the plain CLIP centre crop). Training crops regions of it
    and reports draw on it; `normalize` of it is `preprocess_image`.
    """
    img = img.convert("RGB")
    if pad_to_square:
        img = expand2square(img, CLIP_MEAN_RGB)
    height, width = shortest_edge_size(img.height, img.width, image_size)
    img = img.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.ascontiguousarray(center_crop(np.asarray(img), image_size))


def preprocess_image(img: Image.Image, *, image_size: int = 336, pad_to_square: bool = True) -> np.ndarray:
    """One PIL image -> float32 pixel values [3, image_size, image_size]; options as `preprocess_uint8`."""
    return normalize(preprocess_uint8(img, image_size=image_size, pad_to_square=pad_to_square))


def preprocess_images(images: Sequence[Image.Image], **kwargs) -> np.ndarray:
    """A list of PIL images -> float32 [B, 3, H, W]; keyword arguments as `preprocess_image`."""
    if not images:
        raise ValueError("preprocess_images got an empty list: pass at least one image")
    return np.stack([preprocess_image(img, **kwargs) for img in images])
