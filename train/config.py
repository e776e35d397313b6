"""`TrainConfig`: every knob of a TokenSR training run, with the defaults of BLINK.md §5 (ours where it is silent)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from blink_jax.blink import BlinkConfig
from blink_jax.blink.tokensr import KINDS, trained
from blink_jax.rundir import atomic_write_text

TRAINED_KINDS = tuple(kind for kind in KINDS if trained(kind))  # --kind choices

CACHE_DTYPES = ("float32", "bfloat16", "float16")
BACKBONE_DTYPES = ("float32", "bfloat16")
_BLINK = BlinkConfig()


class TrainConfigError(ValueError):
    """A training option that cannot work, naming the option and the fix."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Paths are strings so the config round-trips through `config.json` in the work directory.

    model: LLaVA-1.5 directory (Hugging Face or converted by `checkpoints_conversion.hf_to_orbax`).
    data_dir: the LLaVA-1.5 mix directory: `llava_v1_5_mix665k.json` and the image folders it names.
    tfds_dir: where the prepared array_record dataset lives (default `<data_dir>/tfds`); prepared on first use.
    workdir: checkpoints, metrics.jsonl, the exported `tokensr/` and (by default) the teacher cache.
    mesh: a preset name (`cpu`, `cpu_8`, `gpu_1`, `gpu_8`, `tpu_v4_8`, `tpu_v5e_8`) or `data:2,fsdp:4`.
    layers, region_size, scale, channels: the Blink geometry the TokenSR modules are trained for.
    kind: the TokenSR kind trained (`conv`, or `mlp`: per-token dense layers; BLINK.md §4).
    batch_size: the global batch (all hosts); it must divide by the mesh's batch axes (data x fsdp).
    steps: total optimiser steps; also the cosine decay horizon.
    lr, warmup_steps, end_lr_ratio: linear warm-up from 0 to `lr`, cosine decay to `lr * end_lr_ratio`.
    clip_norm: global gradient-norm clip (0 disables). weight_decay: AdamW's, on kernels only (not biases).
    mse_weight, temperature: the loss is KL(softmax(t/T) || softmax(s/T)) + mse_weight * MSE(s, t).
    p_random_region: probability that a (layer, example) uses a uniformly random region instead of r*.
    save_every, keep: checkpoint every N steps (and at the end), keeping the last `keep`.
    seed: data order, random regions and TokenSR initialisation.
    limit: train on the first `limit` records of the prepared dataset only (0: all).
    max_prompt_len: prompts are left-padded to this many tokens; longer samples are logged and skipped.
    teacher_cache: directory of cached teacher targets ('' = `<workdir>/teacher_cache`, 'none' = no cache).
    cache_dtype: teacher targets are rounded to this dtype whether or not they come from the cache.
    backbone_dtype: dtype of the frozen LLaVA weights and its forward.
    log_every: metrics.jsonl / console interval in steps.
    data_workers: grain worker processes (0: decode in the training process).
    pad_to_square: the original LLaVA-1.5 preprocessing (expand2square before CLIP).
    max_pixels: Qwen2.5-VL: the pixel budget of the grid buckets images are resized to (BLINK.md §10; 0: the
        model's preprocessor_config.json max_pixels); each batch holds one bucket's grid shape.
    distributed: call `jax.distributed.initialize()` first (multi-host).
    """

    model: str
    data_dir: str
    workdir: str
    tfds_dir: str = ""
    mesh: str = "cpu"
    layers: tuple[int, ...] = _BLINK.layers  # the Blink geometry's defaults are BlinkConfig's
    region_size: int = _BLINK.region_size
    scale: int = _BLINK.scale
    channels: int = _BLINK.tokensr_channels
    kind: str = "conv"
    batch_size: int = 16
    steps: int = 5000
    lr: float = 1e-4
    warmup_steps: int = 200
    end_lr_ratio: float = 0.0
    clip_norm: float = 1.0
    weight_decay: float = 0.01
    mse_weight: float = 0.0
    temperature: float = 1.0
    p_random_region: float = 0.25
    save_every: int = 500
    keep: int = 3
    seed: int = 0
    limit: int = 0
    max_prompt_len: int = 768
    teacher_cache: str = ""
    cache_dtype: str = "bfloat16"
    backbone_dtype: str = "float32"
    log_every: int = 10
    data_workers: int = 0
    pad_to_square: bool = True
    max_pixels: int = 0
    distributed: bool = False

    def __post_init__(self):
        positive = ("batch_size", "steps", "save_every", "keep", "log_every", "max_prompt_len", "region_size",
                    "scale", "channels")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be positive")
        for name in ("warmup_steps", "limit", "data_workers", "seed", "max_pixels"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise TrainConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        for name in ("clip_norm", "weight_decay", "mse_weight", "end_lr_ratio"):
            if not getattr(self, name) >= 0:
                raise TrainConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if not 0 <= self.p_random_region <= 1:
            raise TrainConfigError(f"--p-random-region={self.p_random_region} must be in [0, 1]")
        if self.cache_dtype not in CACHE_DTYPES:
            raise TrainConfigError(f"--cache-dtype={self.cache_dtype!r}: use one of {CACHE_DTYPES}")
        if self.backbone_dtype not in BACKBONE_DTYPES:
            raise TrainConfigError(f"--backbone-dtype={self.backbone_dtype!r}: use one of {BACKBONE_DTYPES}")
        if self.kind not in TRAINED_KINDS:
            raise TrainConfigError(f"--kind={self.kind!r}: use one of {TRAINED_KINDS} (interp has nothing to train)")
        self.blink  # validates layers / region size / scale

    @property
    def blink(self) -> BlinkConfig:
        """The Blink geometry and TokenSR kind the TokenSR bank is trained for."""
        return BlinkConfig(layers=tuple(self.layers), region_size=self.region_size, scale=self.scale,
                           tokensr_kind=self.kind, tokensr_channels=self.channels)

    @property
    def tfds_path(self) -> Path:
        return Path(self.tfds_dir) if self.tfds_dir else Path(self.data_dir) / "tfds"

    @property
    def cache_path(self) -> Path | None:
        if self.teacher_cache == "none":
            return None
        return Path(self.teacher_cache) if self.teacher_cache else Path(self.workdir) / "teacher_cache"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def with_absolute_paths(self) -> "TrainConfig":
        """The same run with its directories absolute (the special teacher_cache values '' and 'none' kept)."""
        absolute = lambda p: os.fspath(Path(p).absolute()) if p else p
        cache = self.teacher_cache if self.teacher_cache in ("", "none") else absolute(self.teacher_cache)
        return dataclasses.replace(self, model=absolute(self.model), data_dir=absolute(self.data_dir),
                                   workdir=absolute(self.workdir), tfds_dir=absolute(self.tfds_dir),
                                   teacher_cache=cache)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes `config.json` atomically: a run killed while writing it leaves the old file, never half of one."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        try:
            fields = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise TrainConfigError(
                f"{path} is not a whole training config ({e}): it was cut off or edited. Delete it and rerun the "
                f"training command with its flags to rewrite it (the checkpoints beside it are kept and resumed)"
            ) from None
        fields["layers"] = tuple(fields["layers"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})
