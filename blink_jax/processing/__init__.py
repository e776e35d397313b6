"""Inputs for LLaVA-1.5: image loading and preprocessing, the eval prompt, tokenisation with `<image>`."""

from blink_jax.processing.image import (
    CLIP_MEAN,
    CLIP_MEAN_RGB,
    CLIP_STD,
    ImageError,
    expand2square,
    load_image,
    load_strictly,
    to_rgb,
    normalize,
    preprocess_image,
    preprocess_images,
    preprocess_uint8,
)
from blink_jax.processing.processor import Processor, ProcessorError, left_pad, tokenize_with_image
from blink_jax.processing.prompt import IMAGE_PLACEHOLDER, SHORT_ANSWER_SUFFIX, VICUNA_V1_SYSTEM, build_prompt

__all__ = [
    "CLIP_MEAN", "CLIP_MEAN_RGB", "CLIP_STD", "IMAGE_PLACEHOLDER", "ImageError", "Processor", "ProcessorError",
    "SHORT_ANSWER_SUFFIX", "VICUNA_V1_SYSTEM", "build_prompt", "expand2square", "left_pad", "load_image",
    "load_strictly", "to_rgb", "normalize", "preprocess_image", "preprocess_images", "preprocess_uint8", "tokenize_with_image",
]
