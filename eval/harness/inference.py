"""The model call of one batch: prompts and pixels padded to the batch's fixed shape -> greedy answers as text,
Blink's trace (or the crop mode's boxes), and what each question cost.

Every batch is padded to `batch_size` rows and its bucket's length, so the jitted programs compile once per
(mode, bucket); `programs` records those shapes for results.json. The crop mode's pass 2 prompt is its pass 1
prompt plus a fixed number of tokens (the second image and its line), so it too has one length per bucket.

Cost per question: the batch's wall time (host preprocessing of the crops included) shared equally by its real
rows, flagged `compiled` when the batch compiled a program; and the question's model FLOPs, counted analytically
(`blink_jax.flops`) from its own prompt, images, answer length and (Blink) the layers that carried SR tokens.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blink_jax import flops as model_flops
from blink_jax.blink import NO_REGION, crop_generate
from blink_jax.config import LlavaConfig
from eval.harness.batching import pad_batch
from eval.harness.modes import ModeSpec


@dataclasses.dataclass(frozen=True)
class CropTrace:
    """The crop mode's pass 1 per row: what `traces.summary` and `traces.record` write."""
    layer: int
    rho: np.ndarray  # [B]
    region: np.ndarray  # [B] r*
    boxes: list  # [B] (left, top, right, bottom) in the original image's pixels
    sizes: list  # [B] (width, height) of the original images


class Answerer:
    def __init__(self, model, tokenizer, *, batch_size: int, max_new_tokens: int, seed: int,
                 pad_to_square: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.seed = batch_size, max_new_tokens, seed
        self.pad_to_square = pad_to_square  # how the crop mode's crops are preprocessed, as the images were
        text = model.config.text
        self.pad_id = int(text.pad_token_id if text.pad_token_id is not None else (tokenizer.pad_token_id or 0))
        self.eos_id = text.eos_token_id
        self.programs: dict[str, set[tuple[int, int, int]]] = {}  # mode -> (B, T, new tokens) compiled
        self.costs: list[dict] = []  # the last call's cost per real row: {"seconds", "flops", "compiled"}
        # FLOPs are counted for LLaVA-1.5 (`blink_jax.flops`); not yet for Qwen2.5-VL (its cost records None)
        self.dims = model_flops.Dims.from_config(model.config) if isinstance(model.config, LlavaConfig) else None

    def __call__(self, mode: ModeSpec, length: int, ids: Sequence[Sequence[int]], pixels: Sequence[np.ndarray],
                 question_ids: Sequence[str], *, originals: Sequence | None = None,
                 both_ids: Sequence[Sequence[int]] | None = None, grid: tuple[int, int] | None = None):
        """n prompts (token ids, each <= length) and their pixels [3, H, W] -> (n answers, the batch's HostTrace
        (Blink), CropTrace (crop) or None); `costs` then holds each answer's cost. The crop mode also needs the n
        original images and (crop_input "both") the two-image prompts. Qwen2.5-VL: pixels [P, patch_dim] of images
        of one `grid` (Gh, Gw); one program per (grid, bucket)."""
        start = time.perf_counter()
        shape = (self.batch_size, length, self.max_new_tokens) + (() if grid is None else tuple(grid))
        compiled = shape not in self.programs.setdefault(mode.name, set())
        self.programs[mode.name].add(shape)
        inputs = pad_batch(ids, pixels, length=length, batch_size=self.batch_size, pad_id=self.pad_id)
        if grid is not None:  # Qwen2.5-VL: packed patches and their grid
            m = self.model.config.vision.spatial_merge_size
            px = inputs["pixel_values"]
            inputs = {**inputs, "pixel_values": px.reshape(-1, px.shape[-1]),
                      "image_grid_thw": np.tile(np.asarray([[1, grid[0] * m, grid[1] * m]], np.int64),
                                                (self.batch_size, 1))}
        if mode.crop is not None:
            tokens, trace = self._crop(mode, length, inputs, ids, originals, both_ids)
        else:
            tokens, trace = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, blink=mode.blink, tokensr=mode.tokensr,
                rng=self.keys(question_ids) if mode.blink is not None else None, return_trace=True)
        seconds = (time.perf_counter() - start) / len(ids)
        self.costs = [{"seconds": round(seconds, 6), "compiled": compiled,
                       "flops": self.flops(mode, ids[i], both_ids[i] if both_ids else None, tokens[i], trace, i)}
                      for i in range(len(ids))]
        return [self.decode(tokens[i]) for i in range(len(ids))], trace

    def _crop(self, mode: ModeSpec, length: int, inputs: dict, ids, originals, both_ids):
        crop = mode.crop
        if originals is None or len(originals) != len(ids):
            raise ValueError("the crop mode needs the original image of every question (ImageLoader(keep_originals="
                             "True))")
        rows = list(originals) + [originals[0]] * (self.batch_size - len(originals))
        both = {}
        if crop.crop_input == "both":
            extra = max(len(b) - len(a) for a, b in zip(ids, both_ids))
            padded = pad_batch(both_ids, [np.zeros(1)] * len(both_ids), length=length + extra,
                               batch_size=self.batch_size, pad_id=self.pad_id)
            self.programs.setdefault(f"{mode.name} pass 2", set()).add(
                (self.batch_size, length + extra, self.max_new_tokens))
            both = dict(both_input_ids=padded["input_ids"], both_attention_mask=padded["attention_mask"])
        result = crop_generate(self.model, **inputs, images=rows, crop=crop, pad_to_square=self.pad_to_square,
                               max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id, **both)
        trace = CropTrace(layer=crop.crop_layer, rho=result.rho, region=result.region, boxes=result.boxes,
                          sizes=[img.size for img in rows])
        return result.tokens, trace

    def flops(self, mode: ModeSpec, ids, both_ids, tokens: np.ndarray, trace, row: int) -> float | None:
        """Model FLOPs of one question: its prompt, its images and its answer's tokens (EOS included)."""
        if self.dims is None:
            return None
        tokens = [int(t) for t in tokens]
        new = tokens.index(self.eos_id) + 1 if self.eos_id is not None and self.eos_id in tokens else len(tokens)
        feature = self.model.config.vision_layers_needed
        dims = self.dims
        if mode.crop is not None:
            pass1 = model_flops.probe_flops(dims, len(ids), mode.crop.crop_layer, feature_layer=feature)
            prompt = both_ids if mode.crop.crop_input == "both" else ids
            return pass1 + model_flops.generate_flops(dims, len(prompt), new, images=mode.crop.images,
                                                      feature_layer=feature)
        sr = {}
        if mode.blink is not None:
            expanded = [int(r) != NO_REGION for r in trace.expanded_region[:, row]]
            sr = dict(sr_tokens=mode.blink.num_sr_tokens,
                      sr_layers=model_flops.sr_layers_of(trace.layers, expanded, dims.text_layers))
        return model_flops.generate_flops(dims, len(ids), new, feature_layer=feature, **sr)

    def keys(self, question_ids: Sequence[str]):
        """One PRNG key per batch row ([batch_size, 2]), from the seed and the row's question id alone, so the
        random-region ablation gives a question the same region whatever shares its batch (a resumed run
        batches differently). Padding rows get the key of question id ""."""
        ids = list(question_ids) + [""] * (self.batch_size - len(question_ids))
        data = jnp.asarray([zlib.crc32(q.encode()) & 0x7FFFFFFF for q in ids], jnp.uint32)
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(self.seed), data)

    def decode(self, tokens: np.ndarray) -> str:
        """Generated ids [new tokens] -> the answer: up to the first EOS, special tokens left out."""
        tokens = [int(t) for t in tokens]
        if self.eos_id is not None and self.eos_id in tokens:
            tokens = tokens[:tokens.index(self.eos_id)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
