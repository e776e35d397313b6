"""M-RoPE position ids of a prompt, as transformers' `Qwen2_5_VLModel.get_rope_index` computes them (host-side).

Over each row's real tokens (left padding gets 0): text advances all three axes by one per token; an image
run of `gh x gw` merged tokens takes (t, h, w) = (s, s + i, s + j) for the token at merged cell (i, j), with s
the position after the preceding text, and the text after it resumes at s + max(gh, gw).
"""

from __future__ import annotations

import numpy as np


def image_runs(ids_row: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[(start, stop)] of each maximal run of image tokens in a row."""
    is_image = np.concatenate([[0], (ids_row == image_token_id).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(is_image))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray, *,
               image_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids/attention_mask [B, T], image_grid_thw [I, 3] (images in prompt order, row after row)
    -> (positions [3, B, T] int32, next_position [B] int32: the position of the first generated token)."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    grids = [tuple(g) for g in np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist()]
    b, t = input_ids.shape
    positions = np.zeros((3, b, t), np.int64)
    next_position = np.zeros((b,), np.int64)
    used = 0
    m = spatial_merge_size
    for row in range(b):
        real = np.flatnonzero(attention_mask[row] > 0)
        ids = input_ids[row, real]
        pieces, cursor, current = [], 0, 0
        for start, stop in image_runs(ids, image_token_id) + [(len(ids), len(ids))]:
            text = np.arange(start - cursor) + current
            pieces.append(np.broadcast_to(text, (3, text.size)))
            current += text.size
            if start == stop:
                break
            if used == len(grids):
                raise ValueError(f"row {row} holds more image-token runs than the {len(grids)} images given "
                                 f"in image_grid_thw: give one grid per image, in prompt order")
            gt, gh, gw = grids[used]
            gh, gw = gh // m, gw // m
            if stop - start != gt * gh * gw:
                raise ValueError(f"row {row}: an image-token run of {stop - start} tokens does not match image "
                                 f"{used}'s grid {grids[used]} ({gt * gh * gw} merged tokens): tokenize with the "
                                 f"processor that produced the grid")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(gh, gw)
            used += 1
            cursor = stop
        row_pos = np.concatenate(pieces, axis=1)
        positions[:, row, real] = row_pos
        next_position[row] = row_pos.max() + 1 if row_pos.size else 0
    if used != len(grids):
        raise ValueError(f"image_grid_thw gives {len(grids)} images but the prompts hold {used} image-token runs")
    return positions.astype(np.int32), next_position.astype(np.int32)
