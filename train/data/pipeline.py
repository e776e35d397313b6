"""The grain input pipeline: shuffled (seeded, reshuffled every epoch), sharded per host, repeated forever,
decoded and tokenised into fixed-shape batches; its iterator state goes into every checkpoint.

Hosts share one global order: every host shuffles all records alike and reads its own contiguous rows of each
global batch (`HostRows`), so each record is read once per epoch over all hosts and the global batch of N hosts
is row for row the one a single process reads (the same losses, whatever the number of hosts).

One batch (this host's share of the global batch, b = batch_size / hosts; S image side, T prompt length):
  input_ids       int32   [b, T]       the model's prompt with the sample's first question, left-padded
  attention_mask  int32   [b, T]
  pixel_values    float32 [b, 3, S, S] CLIP-normalised, as `blink_jax.processing.preprocess_image`
                                       (Qwen2.5-VL: [b, P, patch_dim], the image's patches)
  image           uint8   [b, S, S, 3] the same image before normalisation (`preprocess_uint8`, for the crops;
                                       Qwen2.5-VL: [b, Gh 28, Gw 28, 3], resized to its grid bucket)
  image_digest    uint8   [b, 20]      sha1 of the image file's bytes: the teacher cache's image key

A record whose image fails to decode, or whose prompt is longer than T, is logged and dropped. A family with
several grid shapes (Qwen2.5-VL) batches through `GridBatches`: every global batch holds one grid shape, records
whose prompt is too long are left out up front (`grid_keys`), and a record that then fails is an error, since
dropping it would let a batch mix shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from pathlib import Path

import grain
import jax
import numpy as np
from PIL import Image

from blink_jax.processing import Processor
from blink_jax.rundir import atomic_write_bytes

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data set that cannot feed training, with what to check."""


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Encode(grain.transforms.Map):
    """A tfds record -> the arrays of one example, or None (logged) when it cannot be used."""

    def __init__(self, family, max_prompt_len: int, max_skips_in_a_row: int = 1000, strict: bool = False):
        """`family`: `blink_jax.model_inputs.LlavaInputs` or `QwenInputs`; `strict`: an unusable record is an error."""
        self.family = family
        self.max_prompt_len = max_prompt_len
        self.max_skips_in_a_row = max_skips_in_a_row
        self.strict = strict
        self._skips_in_a_row = 0

    def map(self, record):
        """The endless sampler would spin forever on a data set with nothing usable: stop after a full pass."""
        out = self._encode(record)
        self._skips_in_a_row = self._skips_in_a_row + 1 if out is None else 0
        if self._skips_in_a_row >= self.max_skips_in_a_row:
            raise DataError(f"{self._skips_in_a_row} samples in a row were skipped (see the warnings above): "
                             f"nothing usable in the data set; check --max-prompt-len and the images")
        return out

    def _skip(self, message: str):
        if self.strict:
            raise DataError(f"{message}; batches of one grid shape cannot drop it: remove the sample from the data")
        log.warning("skipping %s", message)
        return None

    def _encode(self, record):
        sample = _text(record["id"])
        data = record["image"]
        family = self.family
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                image = family.image_uint8(img)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return self._skip(f"sample {sample}: image {_text(record['image_path'])} does not decode ({e})")
        ids = family.prompt_ids(_text(record["question"]), family.grid_of(image))
        if len(ids) > self.max_prompt_len:
            return self._skip(f"sample {sample}: its prompt has {len(ids)} tokens, more than --max-prompt-len="
                              f"{self.max_prompt_len}")
        pad = self.max_prompt_len - len(ids)
        input_ids = np.full((self.max_prompt_len,), family.pad_id, np.int32)
        input_ids[pad:] = ids
        attention_mask = np.zeros((self.max_prompt_len,), np.int32)
        attention_mask[pad:] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": family.pixels(image),
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


class GridBatches:
    """A grain sampler (the global order, as `IndexSampler`) whose every `global_batch` consecutive records share
    one grid shape. Epoch e: the usable records (key >= 0) shuffled by (seed, e), grouped by key in that order,
    cut into batches (a group's remainder waits for a later epoch's shuffle), the batches shuffled. A function
    of (seed, index) alone, so a restored iterator continues exactly."""

    def __init__(self, keys: np.ndarray, *, global_batch: int, seed: int):
        self.keys, self.global_batch, self.seed = np.asarray(keys, np.int64), global_batch, seed
        counts = np.bincount(self.keys[self.keys >= 0]) if (self.keys >= 0).any() else np.zeros(0, np.int64)
        self.batches_per_epoch = int((counts // global_batch).sum())
        if self.batches_per_epoch == 0:
            raise DataError(f"no grid shape has {global_batch} usable samples (per shape: {counts.tolist()}): lower "
                            f"--batch-size or use more data (--limit)")
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        import sys
        return sys.maxsize

    def __repr__(self) -> str:  # grain checks a restored iterator's sampler by its repr
        digest = hashlib.sha1(self.keys.tobytes()).hexdigest()[:12]
        return f"GridBatches(keys={digest}, global_batch={self.global_batch}, seed={self.seed})"

    def order(self, epoch: int) -> np.ndarray:
        """The records of `epoch`, batch after batch."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            usable = np.flatnonzero(self.keys >= 0)
            shuffled = usable[rng.permutation(usable.size)]
            batches = []
            for key in np.unique(self.keys[shuffled]):
                group = shuffled[self.keys[shuffled] == key]
                full = group.size // self.global_batch * self.global_batch
                batches += np.split(group[:full], full // self.global_batch) if full else []
            self._order = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
            self._epoch = epoch
        return self._order

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        epoch, position = divmod(index, self.batches_per_epoch * self.global_batch)
        return grain.RecordMetadata(index=index, record_key=int(self.order(epoch)[position]), rng=None)


def image_sizes(source, cache: str | os.PathLike | None = None) -> np.ndarray:
    """(width, height) of every record's image [N, 2] (from the file headers), cached in `cache` (.npy)."""
    if cache is not None and Path(cache).is_file():
        sizes = np.load(cache)
        if len(sizes) == len(source):
            return sizes
    sizes = np.zeros((len(source), 2), np.int64)
    for i in range(len(source)):
        try:
            with Image.open(io.BytesIO(source[i]["image"])) as img:
                sizes[i] = img.size
        except (OSError, ValueError, SyntaxError) as e:
            log.warning("record %d: image does not open (%s); left out", i, e)
            sizes[i] = (0, 0)
    if cache is not None:
        buffer = io.BytesIO()
        np.save(buffer, sizes, allow_pickle=False)
        atomic_write_bytes(cache, buffer.getvalue())
    return sizes


def grid_keys(source, family, sizes: np.ndarray, *, max_prompt_len: int) -> np.ndarray:
    """Per record: the index of its grid shape in `family.grids`, or -1 when it cannot be used (its image does not
    open, or its prompt is longer than `max_prompt_len`, logged)."""
    keys = np.full(len(source), -1, np.int64)
    too_long = 0
    for i, (width, height) in enumerate(sizes):
        if width <= 0 or height <= 0:
            continue
        grid = family.grid_of_size(int(width), int(height))
        if len(family.prompt_ids(_text(source[i]["question"]), grid)) > max_prompt_len:
            too_long += 1
            continue
        keys[i] = family.grids.index(grid)
    if too_long:
        log.warning("%d sample(s) left out: their prompt is longer than --max-prompt-len=%d", too_long, max_prompt_len)
    return keys


def make_loader(source, family, *, local_batch: int, seed: int, max_prompt_len: int, limit: int = 0,
                workers: int = 0, sizes_cache: str | os.PathLike | None = None) -> grain.DataLoader:
    """An endless DataLoader over `source` of this host's `local_batch` rows of each global batch (`HostRows`:
    the global batch is `local_batch` x the number of hosts). `family`: `blink_jax.model_inputs`'s (a LLaVA `Processor` is
    taken as `LlavaInputs` of its config); one with several grids batches by grid (`GridBatches`)."""
    if isinstance(family, Processor):
        from blink_jax.model_inputs import LlavaInputs
        family = LlavaInputs(family)
    if limit:
        source = Limited(source, limit)
    if len(source) == 0:
        raise DataError("the data set is empty (every sample was text-only or had an unusable image): check "
                         "--data-dir and the log of the dataset preparation")
    global_batch = local_batch * jax.process_count()
    by_grid = len(family.grids) > 1
    if by_grid:
        keys = grid_keys(source, family, image_sizes(source, sizes_cache), max_prompt_len=max_prompt_len)
        order = GridBatches(keys, global_batch=global_batch, seed=seed)
    else:
        order = grain.samplers.IndexSampler(num_records=len(source), shard_options=grain.sharding.NoSharding(),
                                            shuffle=True, num_epochs=None, seed=seed)
    sampler = HostRows(order, global_batch=global_batch, local_batch=local_batch, host=jax.process_index())
    if workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; we parse with argparse
            flags.FLAGS.mark_as_parsed()
    encode = Encode(family, max_prompt_len, max_skips_in_a_row=max(len(source), 1), strict=by_grid)
    operations = [encode, Usable(),
                  grain.transforms.Batch(batch_size=local_batch, drop_remainder=True)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=workers,
                            shard_options=grain.sharding.NoSharding())  # HostRows shards
