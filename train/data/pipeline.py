"""The grain input pipeline: shuffled (seeded, reshuffled every epoch), sharded per host, repeated forever,
decoded and tokenised into fixed-shape batches; its iterator state goes into every checkpoint.

Hosts share one global order: every host shuffles all records alike and reads its own contiguous rows of each
global batch (`HostRows`), so each record is read once per epoch over all hosts and the global batch of N hosts
is row for row the one a single process reads (the same losses, whatever the number of hosts).

One batch (this host's share of the global batch, b = batch_size / hosts; S image side, T prompt length):
  input_ids       int32   [b, T]       the vicuna_v1 prompt with the sample's first question, left-padded
  attention_mask  int32   [b, T]
  pixel_values    float32 [b, 3, S, S] CLIP-normalised, as `blink_jax.processing.preprocess_image`
  image           uint8   [b, S, S, 3] the same image before normalisation (`preprocess_uint8`, for the crops)
  image_digest    uint8   [b, 20]      sha1 of the image file's bytes: the teacher cache's image key

A record whose image fails to decode, or whose prompt is longer than T, is logged and dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging

import grain
import jax
import numpy as np
from PIL import Image

from blink_jax.processing import Processor, build_prompt, normalize, preprocess_uint8

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data set that cannot feed training, with what to check."""


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Encode(grain.transforms.Map):
    """A tfds record -> the arrays of one example, or None (logged) when it cannot be used."""

    def __init__(self, processor: Processor, max_prompt_len: int, pad_to_square: bool = True,
                 max_skips_in_a_row: int = 1000):
        self.processor = processor
        self.max_prompt_len = max_prompt_len
        self.pad_to_square = pad_to_square
        self.max_skips_in_a_row = max_skips_in_a_row
        self._skips_in_a_row = 0

    def map(self, record):
        """The endless sampler would spin forever on a data set with nothing usable: stop after a full pass."""
        out = self._encode(record)
        self._skips_in_a_row = self._skips_in_a_row + 1 if out is None else 0
        if self._skips_in_a_row >= self.max_skips_in_a_row:
            raise DataError(f"{self._skips_in_a_row} samples in a row were skipped (see the warnings above): "
                             f"nothing usable in the data set; check --max-prompt-len and the images")
        return out

    def _encode(self, record):
        sample = _text(record["id"])
        data = record["image"]
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                image = preprocess_uint8(img, image_size=self.processor.config.vision.image_size,
                                         pad_to_square=self.pad_to_square)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            log.warning("skipping sample %s: image %s does not decode (%s)", sample, _text(record["image_path"]), e)
            return None
        ids = self.processor.tokenize(build_prompt(_text(record["question"]), suffix=None))
        if len(ids) > self.max_prompt_len:
            log.warning("skipping sample %s: its prompt has %d tokens, more than --max-prompt-len=%d", sample,
                        len(ids), self.max_prompt_len)
            return None
        pad = self.max_prompt_len - len(ids)
        input_ids = np.full((self.max_prompt_len,), self.processor.pad_id, np.int32)
        input_ids[pad:] = ids
        attention_mask = np.zeros((self.max_prompt_len,), np.int32)
        attention_mask[pad:] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": normalize(image),
            "image": image,
            "image_digest": np.frombuffer(hashlib.sha1(data).digest(), np.uint8).copy(),
        }


class Usable(grain.transforms.Filter):
    def filter(self, element) -> bool:
        return element is not None


class Limited:
    """The first `limit` records of a data source (for short runs on a prefix of the mix)."""

    def __init__(self, source, limit: int):
        self.source, self.limit = source, min(limit, len(source))

    def __len__(self):
        return self.limit

    def __getitem__(self, index):
        if not 0 <= index < self.limit:
            raise IndexError(index)
        return self.source[index]


class HostRows:
    """A grain sampler of this host's rows of every global batch: position i of this host is row
    `host * local_batch + i % local_batch` of global batch `i // local_batch` in `sampler`'s (global) order."""

    def __init__(self, sampler, *, global_batch: int, local_batch: int, host: int):
        self.sampler, self.global_batch, self.local_batch, self.host = sampler, global_batch, local_batch, host

    def __len__(self) -> int:
        return len(self.sampler) // self.global_batch * self.local_batch

    def __repr__(self) -> str:  # grain checks a restored iterator's sampler by its repr
        return (f"HostRows({self.sampler!r}, global_batch={self.global_batch}, local_batch={self.local_batch}, "
                f"host={self.host})")

    def __getitem__(self, index: int):
        step, row = divmod(index, self.local_batch)
        metadata = self.sampler[step * self.global_batch + self.host * self.local_batch + row]
        return dataclasses.replace(metadata, index=index)


def make_loader(source, processor: Processor, *, local_batch: int, seed: int, max_prompt_len: int,
                pad_to_square: bool = True, limit: int = 0, workers: int = 0) -> grain.DataLoader:
    """An endless DataLoader over `source` of this host's `local_batch` rows of each global batch (`HostRows`:
    the global batch is `local_batch` x the number of hosts)."""
    if limit:
        source = Limited(source, limit)
    if len(source) == 0:
        raise DataError("the data set is empty (every sample was text-only or had an unusable image): check "
                         "--data-dir and the log of the dataset preparation")
    sampler = HostRows(grain.samplers.IndexSampler(num_records=len(source), shard_options=grain.sharding.NoSharding(),
                                                   shuffle=True, num_epochs=None, seed=seed),
                       global_batch=local_batch * jax.process_count(), local_batch=local_batch,
                       host=jax.process_index())
    if workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; we parse with argparse
            flags.FLAGS.mark_as_parsed()
    encode = Encode(processor, max_prompt_len, pad_to_square, max_skips_in_a_row=max(len(source), 1))
    operations = [encode, Usable(),
                  grain.transforms.Batch(batch_size=local_batch, drop_remainder=True)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=workers,
                            shard_options=grain.sharding.NoSharding())  # HostRows shards
