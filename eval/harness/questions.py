"""A benchmark's questions on their way to the model: prompt ids (tokenized once per run), images (read per batch in
background threads while the model answers the batch before), and each question's samples-file record.

Qwen2.5-VL (`blink_jax.model_inputs.QwenInputs`): the prompt is the model's chat template around the benchmark's text
(suffix included, as for LLaVA), its image run as long as the image's grid bucket (`Prepared.grid`, read from the
image's header), and batches hold one (grid shape, length bucket).

A question that cannot be asked (a prompt that does not tokenize, an empty question, a prompt past the model's
context, an unreadable image) becomes a record with an `error` instead of stopping the run: counted wrong, listed
beside the metrics, retried with --retry-errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from blink_jax.processing import build_prompt, preprocess_image, tokenize_with_image
from eval.benchmarks.base import Benchmark
from eval.harness.batching import plan_batches, prefetch


@dataclasses.dataclass
class Prepared:
    """One question ready to batch: its doc, prompt ids, or why it cannot be asked."""
    doc: dict
    prompt: str
    ids: list[int] | None
    error: str | None = None
    both_ids: list[int] | None = None  # the prompt with two images (the crop mode's pass 2: image, then crop)
    grid: tuple[int, int] | None = None  # Qwen2.5-VL: the image's grid bucket (Gh, Gw); None: the model's one grid

    @property
    def question_id(self) -> str:
        return self.doc["question_id"]


def prepare(bench: Benchmark, doc: dict, tokenizer, model_config, *, max_new_tokens: int,
            two_images: bool = False, family=None, data_dir: Path | None = None) -> Prepared:
    """`two_images`: a mode of the run asks with the image and a crop (the crop mode's second pass). `family`: a
    `blink_jax.model_inputs.QwenInputs` for Qwen2.5-VL (then `data_dir` is where the images are); None: LLaVA."""
    prompt = bench.doc_to_text(doc)
    if family is not None:
        return _prepare_grid(bench, doc, prompt, family, data_dir)
    try:
        ids, both = (tokenize_with_image(tokenizer, build_prompt(prompt, suffix=None, images=n),
                                         model_config.image_token_index, model_config.num_image_tokens, images=n)
                     for n in (1, 2))
    except ValueError as e:
        return Prepared(doc, prompt, None, f"cannot tokenize the prompt: {e}")
    # Every mode of a run asks the same questions (paired comparisons), so the longest prompt of the run's modes
    # decides: with the crop mode, its second pass's, with two images.
    error = question_error(doc, ids, max_positions=model_config.text.max_position_embeddings,
                           max_new_tokens=max_new_tokens)
    if error is None and two_images and question_error(doc, both, max_positions=model_config.text.max_position_embeddings,
                                        max_new_tokens=max_new_tokens):
        error = (f"with two images (the crop mode's second pass) the prompt is {len(both)} tokens: past the model's "
                 f"context of {model_config.text.max_position_embeddings} positions with the answer; shorten the "
                 f"question")
    if error:
        return Prepared(doc, prompt, None, error)
    return Prepared(doc, prompt, ids, both_ids=both)


def _prepare_grid(bench: Benchmark, doc: dict, prompt: str, family, data_dir: Path) -> Prepared:
    """A Qwen2.5-VL question: its image's grid bucket from the image's size (header only), then the prompt ids."""
    try:
        width, height = image_size(bench, doc, data_dir)
    except Exception as e:  # noqa: BLE001 - one bad example is recorded, the run goes on
        return Prepared(doc, prompt, None, f"{type(e).__name__}: {e}")
    grid = family.grid_of_size(width, height)
    try:
        ids = family.prompt_ids(prompt, grid)
    except ValueError as e:
        return Prepared(doc, prompt, None, f"cannot tokenize the prompt: {e}", grid=grid)
    error = question_error(doc, ids, max_positions=None, max_new_tokens=0)
    return Prepared(doc, prompt, None if error else ids, error, grid=grid)


def image_size(bench: Benchmark, doc: Mapping, data_dir: Path) -> tuple[int, int]:
    """(width, height) of the doc's image, from its header."""
    from PIL import Image

    path = bench.image_path(doc, data_dir)
    if path is None:
        return bench.load_image(doc, data_dir).size
    with Image.open(path) as img:
        return img.size


def question_error(doc: Mapping, ids: Sequence[int], *, max_positions: int | None,
                   max_new_tokens: int) -> str | None:
    """Why the question of `doc`, tokenised to `ids` [T] (image tokens included), cannot be asked, or None.

    The prompt and every token generated after it need a position below `max_positions` (the model's
    `max_position_embeddings`): past it the model would answer from positions it was never trained on."""
    if not str(doc.get("question") or "").strip():
        return "the question is empty: correct that row of the benchmark's data"
    needed = len(ids) + max_new_tokens
    if max_positions is not None and needed > max_positions:
        return (f"the prompt is {len(ids)} tokens (the image's included) and the answer up to {max_new_tokens} more: "
                f"{needed} positions, past the model's context of {max_positions} (max_position_embeddings); shorten "
                f"the question, or lower --max-new-tokens if the prompt alone fits")
    return None



def record(item: Prepared, prediction: str | None, error: str | None, trace: dict | None,
           cost: dict | None = None) -> dict:
    """The question's line in samples_<bench>_<mode>.jsonl; `cost`: the model's seconds and FLOPs for it."""
    doc = item.doc
    line = {"question_id": doc["question_id"], "subset": doc["subset"], "prompt": item.prompt,
            "prediction": prediction, "target": doc.get("answer", doc.get("label")), "error": error,
            "trace": trace}
    return line if cost is None else {**line, "cost": cost}


@dataclasses.dataclass(frozen=True)
class LoadedBatch:
    length: int  # the bucket: padded prompt length T
    ready: list[tuple[Prepared, np.ndarray]]  # (question, pixel values [3, H, W]) of the questions to ask
    failed: list[tuple[Prepared, str]]  # (question, why its image could not be read)
    originals: list = dataclasses.field(default_factory=list)  # the ready questions' PIL images (crop mode)
    filler: list[int] | None = None  # prompt ids of the global batch's first question: what a host with no row of
    # its own to ask runs (in a multi-process run every host takes part in every batch's program)
    grid: tuple[int, int] | None = None  # Qwen2.5-VL: the batch's one grid shape


@dataclasses.dataclass(frozen=True)
class ImageLoader:
    """Reads and preprocesses the images of a batch's questions; a bad image is that question's error."""
    bench: Benchmark
    data_dir: Path
    image_size: int
    pad_to_square: bool
    keep_originals: bool = False  # the crop mode cuts its crops from the original images
    family: object = None  # Qwen2.5-VL's `blink_jax.model_inputs.QwenInputs`: pixels [P, patch_dim] of the grid bucket

    def pixels(self, image):
        if self.family is not None:
            return self.family.pixels(self.family.image_uint8(image))
        return preprocess_image(image, image_size=self.image_size, pad_to_square=self.pad_to_square)

    def __call__(self, length: int, items: Sequence[Prepared], grid: tuple[int, int] | None = None) -> LoadedBatch:
        ready, failed, originals = [], [], []
        for item in items:
            try:
                image = self.bench.load_image(item.doc, self.data_dir)
                pixels = self.pixels(image)
                if self.family is not None and self.family.grid_of_size(*image.size) != item.grid:
                    raise ValueError(f"the image is {image.size[0]}x{image.size[1]} px, not the size its header gave")
                ready.append((item, pixels))
                if self.keep_originals:
                    originals.append(image)
            except Exception as e:  # noqa: BLE001 - one bad example is recorded, the run goes on
                failed.append((item, f"{type(e).__name__}: {e}"))
        return LoadedBatch(length, ready, failed, originals, grid=grid)


def loaded_batches(questions: Sequence[Prepared], load: ImageLoader, *, bucket: int, batch_size: int,
                   hosts: int = 1, host: int = 0) -> Iterator[LoadedBatch]:
    """The tokenized `questions` in (grid shape, length) buckets of <= batch_size, their images read two batches
    ahead.

    With several hosts, every host plans the same global batches and loads its own contiguous share of each
    (batch_size / hosts rows; host 0 first), so that each question is asked once and all hosts run every batch.
    """
    batches = plan_batches(questions, [len(q.ids) for q in questions], bucket=bucket, batch_size=batch_size,
                           keys=[q.grid for q in questions])
    local = batch_size // hosts

    def share(batch) -> LoadedBatch:
        loaded = load(batch.length, batch.items[host * local:(host + 1) * local], batch.key)
        return dataclasses.replace(loaded, filler=batch.items[0].ids)

    return prefetch(share, batches, lookahead=2)
