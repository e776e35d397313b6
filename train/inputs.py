"""What a training step consumes: this host's rows of the LLaVA-1.5 mix (grain), and from them, on the mesh, the
TokenSR inputs at the regions trained on (the frozen backbone's probe, `train.student`) and their targets (crops
through the same backbone, `train.teacher`).

Letters: Lp participating layers, B global batch, r region side, O = s r the TokenSR output side, D model dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from blink_jax import sharding
from train.config import TrainConfig
from train.data import llava_mix, pipeline
from train.student import student_inputs
from train.teacher import Teacher, TeacherCache, cache_salt


@dataclasses.dataclass(frozen=True)
class BatchShardings:
    """Where each per-step array lives on the mesh: the batch axis split over data and fsdp."""
    student: NamedSharding  # hs_lr [Lp, B, r, r, D] and targets [Lp, B, O, O, D]
    region: NamedSharding  # [Lp, B]
    image: NamedSharding  # pixel values [B, 3, H, W]
    token: NamedSharding  # input ids, attention mask [B, T]

    @classmethod
    def on(cls, mesh: Mesh) -> BatchShardings:
        return cls(student=sharding.batch_sharding(mesh, sharding.STUDENT_AXES),
                   region=sharding.batch_sharding(mesh, sharding.REGION_AXES),
                   image=sharding.batch_sharding(mesh, sharding.IMAGE_AXES),
                   token=sharding.batch_sharding(mesh, sharding.TOKEN_AXES))


def data_loader(cfg: TrainConfig, family, *, local_batch: int, is_main: bool):
    """The grain loader of this host's `local_batch` rows per step; the first host prepares the dataset (built on
    first use) while the others wait for it."""
    if is_main:
        llava_mix.prepare(cfg.data_dir, cfg.tfds_path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("llava_mix prepared")
    source = llava_mix.data_source(cfg.data_dir, cfg.tfds_path, build=False)
    sizes = cfg.tfds_path / f"image_sizes_{cfg.limit or 'all'}.npy"  # (only read by families with grid buckets)
    return pipeline.make_loader(source, family, local_batch=local_batch, seed=cfg.seed,
                                max_prompt_len=cfg.max_prompt_len, limit=cfg.limit, workers=cfg.data_workers,
                                sizes_cache=sizes)


def make_teacher(cfg: TrainConfig, backbone, family, *, mesh: Mesh, local_batch: int,
                 shardings: BatchShardings) -> Teacher:
    """The crop teacher, with its on-disk cache unless `--teacher-cache none`."""
    cache = None
    if cfg.cache_path is not None:
        salt = cache_salt(backbone.fingerprint, family, cfg.blink, dtype=cfg.cache_dtype)
        cache = TeacherCache(cfg.cache_path, salt=salt, dtype=cfg.cache_dtype)
    return Teacher(backbone, family, cfg.blink, mesh=mesh, local_batch=local_batch, cache=cache,
                   cache_dtype=cfg.cache_dtype, shardings=shardings)


class StepInputs:
    """A host batch and its step -> (hs_lr [Lp, B, r, r, D], target [Lp, B, O, O, D], info) on the mesh; info holds
    scalars for the logs (mean rho, share of random regions)."""

    def __init__(self, backbone, teacher: Teacher, family, cfg: TrainConfig, *, shardings: BatchShardings):
        self.backbone, self.teacher, self.family, self.blink = backbone, teacher, family, cfg.blink
        self.p_random_region, self.seed = cfg.p_random_region, cfg.seed
        self.shardings = shardings

    def __call__(self, batch: dict, step: int) -> tuple[jax.Array, jax.Array, dict]:
        sh = self.shardings
        inputs = self.family.device_inputs(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                           self.family.grid_of(batch["image"][0]), sh)
        s = student_inputs(
            self.backbone.graphdef, self.backbone.params, inputs.input_ids, inputs.pixel_values,
            inputs.attention_mask, inputs.extra, jnp.asarray(step, jnp.int32),
            jnp.asarray(self.p_random_region, jnp.float32), jnp.asarray(self.seed, jnp.int32), grid=inputs.grid,
            layers=self.blink.layers, region_size=self.blink.region_size, lr_sharding=sh.student,
            region_sharding=sh.region)
        regions = sharding.to_local(s.region, sh.region)
        target = self.teacher(batch["image"], batch["image_digest"], regions)
        info = {"rho": jnp.mean(s.rho), "random_region_frac": jnp.mean(s.random.astype(jnp.float32))}
        return s.hs_lr, sharding.to_global(target, sh.student), info
