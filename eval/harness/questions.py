"""A benchmark's questions on their way to the model: prompt ids (tokenized once per run), images (read per batch in
background threads while the model answers the batch before), and each question's samples-file record.

A question that cannot be asked (a prompt that does not tokenize, an unreadable image) becomes a record with an
`error` instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
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

    @property
    def question_id(self) -> str:
        return self.doc["question_id"]


def prepare(bench: Benchmark, doc: dict, tokenizer, model_config) -> Prepared:
    prompt = bench.doc_to_text(doc)
    try:
        ids = tokenize_with_image(tokenizer, build_prompt(prompt, suffix=None), model_config.image_token_index,
                                  model_config.num_image_tokens)
    except ValueError as e:
        return Prepared(doc, prompt, None, f"cannot tokenize the prompt: {e}")
    return Prepared(doc, prompt, ids)


def record(item: Prepared, prediction: str | None, error: str | None, trace: dict | None) -> dict:
    """The question's line in samples_<bench>_<mode>.jsonl."""
    doc = item.doc
    return {"question_id": doc["question_id"], "subset": doc["subset"], "prompt": item.prompt,
            "prediction": prediction, "target": doc.get("answer", doc.get("label")), "error": error,
            "trace": trace}


@dataclasses.dataclass(frozen=True)
class LoadedBatch:
    length: int  # the bucket: padded prompt length T
    ready: list[tuple[Prepared, np.ndarray]]  # (question, pixel values [3, H, W]) of the questions to ask
    failed: list[tuple[Prepared, str]]  # (question, why its image could not be read)
    filler: list[int] | None = None  # prompt ids of the global batch's first question: what a host with no row of
    # its own to ask runs (in a multi-process run every host takes part in every batch's program)


@dataclasses.dataclass(frozen=True)
class ImageLoader:
    """Reads and preprocesses the images of a batch's questions; a bad image is that question's error."""
    bench: Benchmark
    data_dir: Path
    image_size: int
    pad_to_square: bool

    def __call__(self, length: int, items: Sequence[Prepared]) -> LoadedBatch:
        ready, failed = [], []
        for item in items:
            try:
                image = self.bench.load_image(item.doc, self.data_dir)
                ready.append((item, preprocess_image(image, image_size=self.image_size,
                                                     pad_to_square=self.pad_to_square)))
            except Exception as e:  # noqa: BLE001 - one bad example is recorded, the run goes on
                failed.append((item, f"{type(e).__name__}: {e}"))
        return LoadedBatch(length, ready, failed)


def loaded_batches(questions: Sequence[Prepared], load: ImageLoader, *, bucket: int, batch_size: int,
                   hosts: int = 1, host: int = 0) -> Iterator[LoadedBatch]:
    """The tokenized `questions` in length buckets of <= batch_size, their images read two batches ahead.

    With several hosts, every host plans the same global batches and loads its own contiguous share of each
    (batch_size / hosts rows; host 0 first), so that each question is asked once and all hosts run every batch.
    """
    batches = plan_batches(questions, [len(q.ids) for q in questions], bucket=bucket, batch_size=batch_size)
    local = batch_size // hosts

    def share(batch) -> LoadedBatch:
        loaded = load(batch.length, batch.items[host * local:(host + 1) * local])
        return dataclasses.replace(loaded, filler=batch.items[0].ids)

    return prefetch(share, batches, lookahead=2)
