"""Length buckets and fixed-size batches, so that a run compiles a handful of programs, not one per question.

Every prompt is left-padded to its bucket (its length rounded up to a multiple of `bucket`) and every batch
is padded to `batch_size` rows with copies of its first row: the jitted generate sees one shape per bucket
(per mode). A row's padded length depends only on its own prompt, so its answer does not depend on which
questions share its batch (and a resumed run answers like an uninterrupted one).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np


def bucket_length(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket`."""
    return max(bucket, int(math.ceil(length / bucket)) * bucket)


@dataclasses.dataclass(frozen=True)
class Batch:
    length: int  # the bucket: padded prompt length T
    items: tuple  # the batch's real entries (up to batch_size)
    key: Any = None  # what else the batch's rows share (Qwen2.5-VL: the grid shape), None if nothing


def plan_batches(items: Sequence[Any], lengths: Sequence[int], *, bucket: int, batch_size: int,
                 keys: Sequence[Any] | None = None) -> list[Batch]:
    """Groups items by (key, bucket) (keys in first-seen order, shortest bucket first, release order inside) into
    batches of <= batch_size. `keys`: per item, what its batch must share besides the bucket (a grid shape)."""
    keys = [None] * len(items) if keys is None else list(keys)
    order = {key: i for i, key in reversed(list(enumerate(keys)))}
    by_bucket: dict[tuple, list] = collections.defaultdict(list)
    for item, length, key in zip(items, lengths, keys):
        by_bucket[(order[key], bucket_length(length, bucket))].append((item, key))
    return [Batch(length, tuple(item for item, _ in group[i:i + batch_size]), group[0][1])
            for (_, length), group in sorted(by_bucket.items()) for i in range(0, len(group), batch_size)]


def pad_batch(ids: Sequence[Sequence[int]], pixels: Sequence[np.ndarray], *, length: int, batch_size: int,
              pad_id: int) -> dict[str, np.ndarray]:
    """Rows of token ids (each <= length) and pixel values [3, H, W] -> left-padded model inputs with
    exactly `batch_size` rows; missing rows repeat row 0 (their outputs are thrown away).

    -> {"input_ids": int32 [B, T], "attention_mask": int32 [B, T], "pixel_values": float32 [B, 3, H, W]}
    """
    if not ids or len(ids) > batch_size:
        raise ValueError(f"a batch needs 1..{batch_size} rows, got {len(ids)}")
    input_ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row in range(batch_size):
        seq = ids[row] if row < len(ids) else ids[0]
        if len(seq) > length:
            raise ValueError(f"prompt of {len(seq)} tokens does not fit its bucket of {length}")
        input_ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    px = np.stack([pixels[row] if row < len(pixels) else pixels[0] for row in range(batch_size)]).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": px}


def prefetch(fn: Callable[[Any], Any], items: Iterable[Any], *, lookahead: int = 2, workers: int = 2) -> Iterator[Any]:
    """`map(fn, items)` computed in background threads, at most `lookahead` items ahead, in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        queue: collections.deque = collections.deque()
        iterator = iter(items)
        for item in iterator:
            queue.append(pool.submit(fn, item))
            if len(queue) > lookahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
