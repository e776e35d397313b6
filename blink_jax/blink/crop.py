"""The two-pass crop baseline (BLINK.md §9, after ViCrop): look, crop the salient region, look again.

Pass 1 runs the vanilla prefill up to `crop_layer` only and takes the last prompt token's saliency S_v and the
region r* of Blink's SGS pooling (`probe_layers` with one layer). r*'s box on the preprocessed image is grown
about its centre by `crop_context`, clamped to the image and mapped back to the original image's pixels (undoing
pad-to-square or the plain CLIP resize and centre crop), so the crop has every real pixel the region covers and
more. Pass 2 answers greedily from the original image's visual tokens followed by the crop's
(`crop_input="both"`, two `<image>` runs) or from the crop alone (`"crop"`). Each pass is one jitted program per
input shape.

Boxes are (left, top, right, bottom), right/bottom exclusive, in pixels. Letters: B batch, T prompt length,
G grid side, C channels, H/W image side.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from PIL import Image

from blink_jax.blink.config import BlinkConfig
from blink_jax.blink.dtr import region_box
from blink_jax.blink.probe import probe_layers
from blink_jax.config import ConfigError
from blink_jax.processing.image import preprocess_image, shortest_edge_size

CROP_INPUTS = ("both", "crop")
Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """crop_layer: pass 1 stops after this layer and reads its saliency (default: the middle of Blink's 12-18).
    region_size: r, as Blink's (r x r visual tokens per region; r divides the grid side).
    crop_context: the region's box is grown about its centre by this factor (1: the region alone).
    crop_input: "both" (pass 2 sees the image, then the crop) or "crop" (the crop alone)."""
    crop_layer: int = 15
    region_size: int = 6
    crop_context: float = 2.0
    crop_input: str = "both"

    def __post_init__(self):
        if self.crop_input not in CROP_INPUTS:
            raise ConfigError(f"CropConfig.crop_input={self.crop_input!r} is unknown; use one of {CROP_INPUTS}")
        if not self.crop_context > 0:
            raise ConfigError(f"CropConfig.crop_context={self.crop_context} must be positive (1: the region alone)")
        if self.crop_layer < 0 or self.region_size < 1:
            raise ConfigError(f"CropConfig.crop_layer={self.crop_layer} must be >= 0 and region_size="
                              f"{self.region_size} >= 1")

    @classmethod
    def like(cls, blink: BlinkConfig, **overrides) -> "CropConfig":
        """The crop of Blink's geometry: its middle participating layer and its region size."""
        base = dict(crop_layer=blink.layers[len(blink.layers) // 2], region_size=blink.region_size)
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def images(self) -> int:
        """Image runs in pass 2's prompt."""
        return 2 if self.crop_input == "both" else 1

    def validate_for(self, num_layers: int, grid: int) -> None:
        if self.crop_layer >= num_layers:
            raise ConfigError(f"CropConfig.crop_layer={self.crop_layer} but the language model has {num_layers} "
                              f"layers (0..{num_layers - 1}); give a layer below {num_layers}")
        if grid % self.region_size:
            raise ConfigError(f"CropConfig.region_size={self.region_size} does not divide the visual grid side "
                              f"{grid}; use a divisor of {grid}")


# ------------------------------------------------------------------------------------------ box geometry


def grow_box(box: Box, context: float, side: int) -> Box:
    """`box` scaled by `context` about its centre, clamped to the `side` x `side` preprocessed image."""
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half_w, half_h = (right - left) * context / 2, (bottom - top) * context / 2
    return max(0.0, cx - half_w), max(0.0, cy - half_h), min(float(side), cx + half_w), min(float(side), cy + half_h)


def to_original(box: Box, width: int, height: int, *, image_size: int, pad_to_square: bool) -> Box:
    """A box on the preprocessed image_size x image_size image -> the same area in the original width x height
    image's pixels, clamped to it (what pad-to-square added, or the centre crop cut, is outside)."""
    left, top, right, bottom = box
    if pad_to_square:  # expand2square pastes at ((M - w) // 2, (M - h) // 2), then M x M resizes to S x S
        side = max(width, height)
        scale = side / image_size
        dx, dy = (side - width) // 2, (side - height) // 2
        sx = sy = scale
    else:  # shortest side resized to S, then the S x S centre crop
        new_h, new_w = shortest_edge_size(height, width, image_size)
        sx, sy = width / new_w, height / new_h
        dx, dy = -((new_w - image_size) // 2) * sx, -((new_h - image_size) // 2) * sy
    clamp = lambda v, hi: min(max(v, 0.0), float(hi))
    return (clamp(left * sx - dx, width), clamp(top * sy - dy, height), clamp(right * sx - dx, width),
            clamp(bottom * sy - dy, height))


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A float box -> the whole pixels it touches (at least one), inside the width x height image."""
    left, top = min(int(math.floor(box[0])), width - 1), min(int(math.floor(box[1])), height - 1)
    right, bottom = max(int(math.ceil(box[2])), left + 1), max(int(math.ceil(box[3])), top + 1)
    return left, top, min(right, width), min(bottom, height)


def crop_box(region: int, width: int, height: int, *, grid: int, image_size: int, crop: CropConfig,
             pad_to_square: bool) -> tuple[int, int, int, int]:
    """Region r* -> the crop's box in the original width x height image's pixels."""
    patch = image_size // grid
    grown = grow_box(region_box(region, grid, crop.region_size, patch), crop.crop_context, grid * patch)
    return pixel_box(to_original(grown, width, height, image_size=image_size, pad_to_square=pad_to_square),
                     width, height)


# --------------------------------------------------------------------------------------------- the passes


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "region_size"))
def _locate(graphdef, params, ids, px, mask, *, layer: int, region_size: int):
    """Pass 1: vanilla layers 0..layer. -> (rho [B], r* [B] int32, S_v [B, G, G])."""
    probe = probe_layers(nnx.merge(graphdef, params), ids, px, mask, layers=(layer,), region_size=region_size)
    return probe.rho[0], probe.region[0], probe.attention[0]  # `probe.visual` unused: XLA drops its gathers


@dataclasses.dataclass(frozen=True)
class CropResult:
    tokens: np.ndarray  # [B, max_new_tokens] int32: pass 2's greedy answer
    rho: np.ndarray  # [B] pass 1's saliency ratio at crop_layer
    region: np.ndarray  # [B] int32: r*
    attention: np.ndarray  # [B, G, G]: S_v at crop_layer
    boxes: list[tuple[int, int, int, int]]  # per row: the crop in the original image's pixels
    crop_pixel_values: np.ndarray  # [B, C, H, W]: the crops as the model saw them


def locate(llava, *, input_ids, pixel_values, attention_mask, crop: CropConfig):
    """Pass 1 on the host: -> (rho [B], r* [B], S_v [B, G, G]) at `crop.crop_layer`."""
    cfg = llava.config
    crop.validate_for(cfg.text.num_hidden_layers, cfg.vision.grid)
    ids, px, mask = llava.check_inputs(input_ids, pixel_values, attention_mask)
    out = _locate(llava.graphdef, llava.params, ids, px, mask, layer=crop.crop_layer, region_size=crop.region_size)
    return tuple(np.asarray(x) for x in out)


def crop_generate(llava, *, input_ids, pixel_values, attention_mask, images: Sequence[Image.Image],
                  crop: CropConfig, pad_to_square: bool = True, both_input_ids=None, both_attention_mask=None,
                  max_new_tokens: int = 16, eos_token_id: int | None = None,
                  pad_token_id: int | None = None) -> CropResult:
    """The two passes on a batch. input_ids/attention_mask [B, T], pixel_values [B, C, H, W]: the one-image prompt
    and its preprocessed images; `images`: the B original images (PIL), preprocessed with `pad_to_square` as
    `pixel_values` were. With crop_input "both", pass 2's prompt (two `<image>`s: the image, then the crop) is
    both_input_ids/both_attention_mask [B, T2]; with "crop" it is the one-image prompt."""
    cfg = llava.config
    if len(images) != np.shape(input_ids)[0]:
        raise ValueError(f"crop_generate got {len(images)} original images for {np.shape(input_ids)[0]} prompts: "
                         f"pass one per row (padding rows too)")
    rho, region, attention = locate(llava, input_ids=input_ids, pixel_values=pixel_values,
                                    attention_mask=attention_mask, crop=crop)
    size = cfg.vision.image_size
    boxes = [crop_box(int(r), img.width, img.height, grid=cfg.vision.grid, image_size=size, crop=crop,
                      pad_to_square=pad_to_square) for r, img in zip(region, images)]
    crops = np.stack([preprocess_image(img.crop(box), image_size=size, pad_to_square=pad_to_square)
                      for img, box in zip(images, boxes)])
    if crop.crop_input == "both":
        if both_input_ids is None:
            raise ValueError("CropConfig.crop_input='both' needs pass 2's prompt: pass both_input_ids (and "
                             "both_attention_mask), the prompt with two <image>s (build_prompt(..., images=2))")
        run = dict(input_ids=both_input_ids, attention_mask=both_attention_mask,
                   pixel_values=np.stack([np.asarray(pixel_values, np.float32), crops], axis=1))
    else:
        run = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=crops)
    tokens = llava.generate(**run, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id)
    return CropResult(tokens=np.asarray(tokens), rho=rho, region=region, attention=attention, boxes=boxes,
                      crop_pixel_values=crops)
