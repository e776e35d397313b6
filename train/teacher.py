"""Teacher targets (BLINK.md §5, §10): h_L[visual](crop), area-pooled from Gh x Gw to (s r) x (s r), with a disk cache.

The crop of region (i, j) of the (Gh/r) x (Gw/r) region grid is its pixel box [i r c, (i+1) r c) x [j r c, (j+1) r c)
(c = pixels per grid cell: LLaVA's 14 px patch, Qwen2.5-VL's 28 px merged token) in the preprocessed image,
resized back to that image's size (PIL bicubic) and preprocessed as the model's images are (`blink_jax.model_inputs`).
Under causal attention the visual states depend only on the image and the prompt before it, so the teacher
runs on the prompt cut right after the image tokens, and a target is a function of (image, region, layer)
alone: computed once, cached on disk, reused by later epochs and later runs.

Targets are rounded to the cache dtype whether they come from the cache or not, so a run gives the same
numbers with a cold cache, a warm one, or none.

Letters: Lp participating layers, B batch, Gh x Gw the visual grid, O = s r pooled side, D model dim; in
`area_pool`'s einsum G/W are the grid's rows/columns and O/Q the pooled rows/columns.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from PIL import Image

from blink_jax.blink.dtr import region_box
from blink_jax.blink.probe import probe_layers
from blink_jax.model_inputs import prompt_kwargs
from blink_jax.processing import normalize

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ geometry


def crop_uint8(image: np.ndarray, region: int, grid, region_size: int, cell: int) -> np.ndarray:
    """uint8 [H, W, 3] preprocessed image -> uint8 [H, W, 3]: region's box (`region_box` on the Gh x Gw grid of
    `cell`-pixel cells) resized back to H x W."""
    height, width = image.shape[:2]
    box = region_box(region, grid, region_size, cell)
    return np.asarray(Image.fromarray(image).crop(box).resize((width, height), resample=Image.Resampling.BICUBIC))


def crop_pixels(image: np.ndarray, region: int, grid: int, region_size: int, patch: int) -> np.ndarray:
    """LLaVA: uint8 [S, S, 3] preprocessed image -> float32 [3, S, S]: the region's box resized to S x S, normalised."""
    return normalize(crop_uint8(image, region, grid, region_size, patch))


def area_weights(size_in: int, size_out: int) -> np.ndarray:  # [O, G]
    """Rows average the input cells each output cell covers, as torch `adaptive_avg_pool` / `interpolate(area)`:
    output i pools [floor(i G / O), ceil((i + 1) G / O))."""
    w = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        w[i, start:end] = 1.0 / (end - start)
    return w


def area_pool(x: jax.Array, size_out: int) -> jax.Array:  # [..., Gh, Gw, D] -> [..., O, O, D]
    rows, cols = jnp.asarray(area_weights(x.shape[-3], size_out)), jnp.asarray(area_weights(x.shape[-2], size_out))
    return jnp.einsum("...GWD,OG,QW->...OQD", x.astype(jnp.float32), rows, cols)


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "layers", "region_size", "sr_side", "out_sharding"))
def teacher_states(graphdef, params, input_ids, pixel_values, attention_mask, extra, *, grid, layers: tuple[int, ...],
                   region_size: int, sr_side: int, out_sharding) -> jax.Array:  # [Lp, B, O, O, D] float32
    """Layer outputs of the visual tokens of each (crop) image, area-pooled to sr_side x sr_side; `extra`, `grid`:
    the backbone prompt's other inputs (`blink_jax.model_inputs.ModelInputs`)."""
    model = nnx.merge(graphdef, params)
    probe = probe_layers(model, input_ids, pixel_values, attention_mask, layers=layers, region_size=region_size,
                         **prompt_kwargs(extra, grid))
    return jax.lax.with_sharding_constraint(area_pool(probe.visual, sr_side), out_sharding)


# --------------------------------------------------------------------------------------------------- cache


_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly representable in `dtype` (round to nearest even)."""
    return np.asarray(x, np.float32).astype(_DTYPES[dtype]).astype(np.float32)


class TeacherCache:
    """One `.npy` per (image, region, layer), written atomically (temp file + rename) so that concurrent
    writers (hosts, runs) and kills never leave a partial entry. bfloat16 is stored as its uint16 bits.

    The key hashes the image bytes' sha1, the region and the layer with `salt`: the model fingerprint and
    everything else a target depends on (image size, pad-to-square, r, s, prompt prefix, dtype).
    """

    def __init__(self, root: str | os.PathLike, *, salt: str, dtype: str):
        self.root, self.salt, self.dtype = Path(root), salt, dtype
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, digest: bytes, region: int, layer: int) -> str:
        text = f"{self.salt}|{digest.hex()}|{int(region)}|{int(layer)}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self.path(key)
        try:
            stored = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("teacher cache entry %s is unreadable (%s); recomputing it", path, e)
            return None
        if self.dtype == "bfloat16":
            stored = stored.view(ml_dtypes.bfloat16)
        return stored.astype(np.float32)

    def put(self, key: str, value: np.ndarray) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = np.asarray(value).astype(_DTYPES[self.dtype])
        if self.dtype == "bfloat16":
            stored = stored.view(np.uint16)
        tmp = path.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, stored, allow_pickle=False)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- targets


class Teacher:
    """Targets [Lp, b, O, O, D] (this host's b examples) for the regions the student trains on.

    Missing targets are computed in chunks of b crops (padded with blank images), one crop per distinct
    (image, region) for all layers at once; every layer of a computed crop goes into the cache. On several
    hosts all run the same number of chunks (the largest need), as the jitted teacher is one SPMD program.
    """

    def __init__(self, backbone, family, blink, *, mesh, local_batch: int, cache: TeacherCache | None,
                 cache_dtype: str, shardings):
        """`family`: `blink_jax.model_inputs`'s; `shardings`: `train.inputs.BatchShardings`."""
        self.backbone, self.family, self.blink, self.mesh = backbone, family, blink, mesh
        self.cache, self.cache_dtype = cache, cache_dtype
        self.local_batch, self.shardings = local_batch, shardings
        self.stats = {"hits": 0, "computed": 0}

    def __call__(self, images: np.ndarray, digests: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """images uint8 [b, H, W, 3] (one grid), digests uint8 [b, 20], regions int [Lp, b] -> float32
        [Lp, b, O, O, D]."""
        from blink_jax import sharding

        layers, family = self.blink.layers, self.family
        num_layers, b = regions.shape
        side, dim = self.blink.sr_side, family.hidden_size
        grid = family.grid_of(images[0])
        out = np.empty((num_layers, b, side, side, dim), np.float32)
        needed: dict[tuple[bytes, int], list[tuple[int, int]]] = {}
        for i in range(b):
            digest = digests[i].tobytes()
            for l, layer in enumerate(layers):
                region = int(regions[l, i])
                value = self.cache.get(self.cache.key(digest, region, layer)) if self.cache else None
                if value is None:
                    needed.setdefault((digest, region), []).append((l, i))
                else:
                    out[l, i] = value
                    self.stats["hits"] += 1
        crops = list(needed)
        chunks = sharding.max_over_hosts(math.ceil(len(crops) / self.local_batch))
        prefix = np.asarray(family.prefix_ids(grid), np.int32)
        ids = np.tile(prefix, (self.local_batch, 1))
        mask = np.ones_like(ids)
        blank = family.pixels(np.zeros_like(images[0]))
        for c in range(chunks):
            chunk = crops[c * self.local_batch:(c + 1) * self.local_batch]
            pixels = np.stack([blank] * self.local_batch)
            for k, (digest, region) in enumerate(chunk):
                first_example = needed[(digest, region)][0][1]
                crop = crop_uint8(images[first_example], region, grid, self.blink.region_size, family.cell)
                pixels[k] = family.pixels(crop)
            inputs = family.device_inputs(ids, pixels, mask, grid, self.shardings)
            pooled = teacher_states(
                self.backbone.graphdef, self.backbone.params, inputs.input_ids, inputs.pixel_values,
                inputs.attention_mask, inputs.extra, grid=inputs.grid, layers=layers,
                region_size=self.blink.region_size, sr_side=side, out_sharding=self.shardings.student)
            pooled = round_to(sharding.to_local(pooled, self.shardings.student), self.cache_dtype)
            for k, (digest, region) in enumerate(chunk):
                for l, layer in enumerate(layers):
                    if self.cache:
                        self.cache.put(self.cache.key(digest, region, layer), pooled[l, k])
                for l, i in needed[(digest, region)]:
                    out[l, i] = pooled[l, k]
                self.stats["computed"] += 1
        return out


def cache_salt(fingerprint: str, family, blink, *, dtype: str) -> str:
    """Everything besides (image, region, layer) that a target depends on."""
    parts = [fingerprint, *family.salt(), blink.region_size, blink.scale, dtype,
             ",".join(map(str, family.prefix_ids(family.grids[0])))]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
