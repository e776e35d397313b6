"""A model's inputs: what TokenSR training and the evals need from a model family beyond the backbone protocol:
how an image and a question become that model's inputs, where a region's crop lies, and the TokenSR teacher's
prompt. (Its checkpoint side, key maps and layouts, is `blink_jax.families`.)

- LLaVA-1.5 (BLINK.md §5): one G x G grid; images padded to square (or not) and resized to S x S; the vicuna_v1
  prompt; a grid cell is one 14 px patch.
- Qwen2.5-VL (BLINK.md §10): each image resized to the grid bucket (Gh x Gw merged tokens, both multiples of r)
  nearest its aspect ratio, so a batch holds one grid shape (`pipeline.GridBatches` groups them); prompts through
  the model's chat template; a grid cell is one merged token (28 px). Loads on one device.

Everything else (probe, student, teacher, loss, step, checkpoints; the eval's modes, batching, scoring) is the
same code for both.
Letters: b this host's batch, T prompt length, P patches of one image, Gh x Gw the visual grid.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from PIL import Image

from blink_jax import sharding
from blink_jax.config import ConfigError
from blink_jax.families import model_type


class InputsError(ConfigError):
    """An option this model family cannot take (training or eval), naming the option and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """One batch on the device: the three arrays every backbone's `prompt` takes, what else it takes (traced) and
    the batch's grid (static: it shapes the program)."""
    input_ids: jax.Array  # [b, T]
    pixel_values: jax.Array  # LLaVA [b, 3, S, S]; Qwen2.5-VL [b P, patch_dim]
    attention_mask: jax.Array  # [b, T]
    extra: dict  # Qwen2.5-VL: layout, positions
    grid: tuple[int, int] | None  # Qwen2.5-VL's (Gh, Gw); None: the model's one grid


class LlavaInputs:
    name = "llava"

    def __init__(self, processor):
        """`processor`: the model's `blink_jax.processing.Processor` (its `pad_to_square` is the training's)."""
        self.processor, self.config, self.pad_to_square = processor, processor.config, processor.pad_to_square
        self.hidden_size = self.config.text.hidden_size
        self.num_layers = self.config.text.num_hidden_layers
        self.cell = self.config.vision.patch_size  # pixels per grid cell
        self.pad_id = self.processor.pad_id
        grid = self.config.vision.grid
        self.grids = ((grid, grid),)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, pad_to_square: bool = True) -> "LlavaInputs":
        from blink_jax.processing import Processor
        return cls(Processor.from_pretrained(model_dir, pad_to_square=pad_to_square))

    def check_mesh(self, mesh) -> None:
        return None

    def image_uint8(self, img: Image.Image) -> np.ndarray:  # [S, S, 3]
        from blink_jax.processing import preprocess_uint8
        return preprocess_uint8(img, image_size=self.config.vision.image_size, pad_to_square=self.pad_to_square)

    def pixels(self, image: np.ndarray) -> np.ndarray:  # uint8 [S, S, 3] -> float32 [3, S, S]
        from blink_jax.processing import normalize
        return normalize(image)

    def grid_of(self, image: np.ndarray) -> tuple[int, int]:
        return self.grids[0]

    def prompt_ids(self, question: str, grid: tuple[int, int]) -> list[int]:
        from blink_jax.processing import build_prompt
        return self.processor.tokenize(build_prompt(question, suffix=None))

    def prefix_ids(self, grid: tuple[int, int]) -> list[int]:
        """The eval prompt cut right after `<image>`: all the teacher's visual states depend on."""
        from blink_jax.processing import IMAGE_PLACEHOLDER, build_prompt
        prompt = build_prompt("")
        return self.processor.tokenize(prompt[: prompt.index(IMAGE_PLACEHOLDER) + len(IMAGE_PLACEHOLDER)])

    def salt(self) -> list:
        vision = self.config.vision
        return [vision.image_size, vision.patch_size, self.pad_to_square]

    def device_inputs(self, input_ids: np.ndarray, pixels: np.ndarray, attention_mask: np.ndarray,
                      grid: tuple[int, int], shardings) -> ModelInputs:
        """This host's rows -> the global batch on the mesh (`shardings`: `train.inputs.BatchShardings`)."""
        put = sharding.to_global
        return ModelInputs(put(input_ids, shardings.token), put(pixels, shardings.image),
                           put(attention_mask, shardings.token), {}, None)


class QwenInputs:
    name = "qwen2_5_vl"

    def __init__(self, model_dir: str | os.PathLike, *, region_size: int, max_pixels: int = 0):
        from blink_jax.model.qwen2_5_vl.processing import ImageProcessorConfig, QwenProcessor, grid_buckets

        image_config = ImageProcessorConfig.from_json(model_dir)
        max_pixels = max_pixels or image_config.max_pixels
        grids = grid_buckets(max_pixels, image_config.factor, multiple=region_size)
        self.processor = QwenProcessor.from_pretrained(model_dir, grid_shapes=grids)
        self.config = self.processor.config
        self.image_config = self.processor.image_config
        self.hidden_size = self.config.text.hidden_size
        self.num_layers = self.config.text.num_hidden_layers
        self.cell = self.image_config.factor  # a merged token covers factor x factor pixels
        self.pad_id = self.processor.pad_id
        self.grids = grids
        self.max_pixels = max_pixels

    def check_mesh(self, mesh) -> None:
        if mesh.devices.size > 1:
            raise InputsError(f"--mesh gives {mesh.devices.size} devices, but Qwen2.5-VL trains on one device for now: "
                              f"use --mesh cpu or gpu_1")

    def image_uint8(self, img: Image.Image) -> np.ndarray:  # [Gh 28, Gw 28, 3]
        from blink_jax.model.qwen2_5_vl.processing import resize_uint8
        return resize_uint8(img, self.image_config)

    def pixels(self, image: np.ndarray) -> np.ndarray:  # uint8 [H, W, 3] -> float32 [P, patch_dim]
        from blink_jax.model.qwen2_5_vl.processing import uint8_patches
        return uint8_patches(image, self.image_config)[0]

    def grid_of(self, image: np.ndarray) -> tuple[int, int]:
        return image.shape[0] // self.cell, image.shape[1] // self.cell

    def grid_of_size(self, width: int, height: int) -> tuple[int, int]:
        from blink_jax.model.qwen2_5_vl.processing import nearest_grid
        return nearest_grid(height, width, self.grids)

    def prompt_ids(self, question: str, grid: tuple[int, int]) -> list[int]:
        m = self.image_config.merge_size
        return self.processor.tokenize(self.processor.prompt(question), (1, grid[0] * m, grid[1] * m))

    def prefix_ids(self, grid: tuple[int, int]) -> list[int]:
        m = self.image_config.merge_size
        return self.processor.tokenize(self.processor.image_prefix(), (1, grid[0] * m, grid[1] * m))

    def salt(self) -> list:
        return [self.image_config, self.processor.image_prefix()]

    def device_inputs(self, input_ids: np.ndarray, pixels: np.ndarray, attention_mask: np.ndarray,
                      grid: tuple[int, int], shardings=None) -> ModelInputs:
        """input_ids / attention_mask [b, T], pixels [b, P, patch_dim] of images of one `grid` (Gh, Gw) -> on the
        one device."""
        from blink_jax.model.qwen2_5_vl.forward import prepare_inputs

        b, p = pixels.shape[:2]
        gh, gw = grid
        m = self.image_config.merge_size
        thw = np.tile(np.asarray([[1, gh * m, gw * m]], np.int64), (b, 1))
        q = prepare_inputs(self.config, input_ids, attention_mask, np.asarray(pixels).reshape(b * p, -1), thw)
        return ModelInputs(q.input_ids, q.pixel_values, q.attention_mask,
                           {"layout": q.layout, "positions": q.positions}, (gh, gw))


def inputs_for(model_dir: str | os.PathLike, *, pad_to_square: bool = True, region_size: int = 6,
               max_pixels: int = 0):
    """The inputs adapter of the model at `model_dir` (LlavaInputs or QwenInputs), by its config.json `model_type`
    (`blink_jax.families`, which names the supported ones)."""
    if model_type(model_dir) == "qwen2_5_vl":
        if max_pixels < 0:
            raise InputsError(f"--max-pixels={max_pixels} must be >= 0 (0: the model's preprocessor_config.json)")
        return QwenInputs(model_dir, region_size=region_size, max_pixels=max_pixels)
    if max_pixels:
        raise InputsError("--max-pixels is for Qwen2.5-VL models; LLaVA-1.5 has one image size: leave it out")
    return LlavaInputs.from_pretrained(model_dir, pad_to_square=pad_to_square)


def prompt_kwargs(extra: dict, grid: tuple[int, int] | None) -> dict:
    """The keyword arguments of the backbone's `prompt` besides the three arrays (`ModelInputs.extra`, `.grid`)."""
    return {**extra, **({} if grid is None else {"grid": tuple(grid)})}
