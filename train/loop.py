"""The TokenSR training loop: data -> frozen-backbone probes (student inputs, teacher targets) -> jitted train step
-> metrics, checkpoints, export.

Per step: the grain batch (this host's rows) goes on the mesh; one jitted probe gives the SGS regions and the
TokenSR inputs; the teacher fills the targets from its cache or from crops; the donated train step updates
TokenSR. A non-finite loss, gradient norm or parameter norm stops the run before anything is saved, so the
newest checkpoint on disk is the last good one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from blink_jax import rundir
from blink_jax.config import LlavaConfig
from blink_jax.processing import Processor
from train import sharding, step as step_lib
from train.backbone import load_backbone
from train.checkpointing import Checkpointer, export_tokensr
from train.config import TrainConfig, TrainConfigError
from train.data import llava_mix, pipeline
from train.metrics import MetricsLogger
from train.optim import OptimConfig
from train.student import student_inputs
from train.teacher import Teacher, TeacherCache, cache_salt

log = logging.getLogger(__name__)
# Fields that fix the shapes of the saved state: a resumed run must agree on them.
STATE_FIELDS = ("layers", "region_size", "scale", "channels")
_DISTRIBUTED = False


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient / parameter norm) became NaN or infinite; nothing was saved for that step."""


@dataclasses.dataclass
class TrainResult:
    step: int  # steps done
    params: dict  # the TokenSR parameters, host numpy
    workdir: Path
    tokensr_dir: Path | None  # the export, None for a run stopped early or with several hosts


def initialize_distributed() -> None:
    global _DISTRIBUTED
    if not _DISTRIBUTED:
        jax.distributed.initialize()
        _DISTRIBUTED = True


class Trainer:
    """Everything a run needs, set up once: mesh, backbone, data, teacher, optimiser, jitted step, checkpoints."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        if cfg.distributed:
            initialize_distributed()
        self.cfg = cfg
        self.progress = progress
        self.workdir = Path(cfg.workdir).absolute()
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch(cfg.batch_size, self.mesh)
        self.local_batch = cfg.batch_size // jax.process_count()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_workdir()
        log.info("%s; global batch %d (%d per host)", sharding.describe(self.mesh), cfg.batch_size, self.local_batch)

        model_cfg = LlavaConfig.from_json(cfg.model)
        self.blink = cfg.blink
        self.blink.validate_for(model_cfg.text.num_hidden_layers, model_cfg.vision.grid)  # before a long load
        dtype = jnp.bfloat16 if cfg.backbone_dtype == "bfloat16" else jnp.float32
        self.backbone = load_backbone(cfg.model, self.mesh, dtype)
        self.dim = model_cfg.text.hidden_size
        self.num_regions = self.blink.num_regions(model_cfg.vision.grid)
        self.processor = Processor.from_pretrained(cfg.model, config=model_cfg, pad_to_square=cfg.pad_to_square)

        self.loader = pipeline.make_loader(
            self._data_source(), self.processor, local_batch=self.local_batch, seed=cfg.seed,
            max_prompt_len=cfg.max_prompt_len, pad_to_square=cfg.pad_to_square, limit=cfg.limit,
            workers=cfg.data_workers)
        self.iterator = iter(self.loader)

        self.lr_sh = sharding.batch_sharding(self.mesh, sharding.STUDENT_AXES)
        self.region_sh = sharding.batch_sharding(self.mesh, sharding.REGION_AXES)
        self.image_sh = sharding.batch_sharding(self.mesh, sharding.IMAGE_AXES)
        self.token_sh = sharding.batch_sharding(self.mesh, sharding.TOKEN_AXES)
        cache = None
        if cfg.cache_path is not None:
            salt = cache_salt(self.backbone.fingerprint, self.processor, self.blink, pad_to_square=cfg.pad_to_square,
                              dtype=cfg.cache_dtype)
            cache = TeacherCache(cfg.cache_path, salt=salt, dtype=cfg.cache_dtype)
        self.teacher = Teacher(self.backbone, self.processor, self.blink, mesh=self.mesh, local_batch=self.local_batch,
                               cache=cache, cache_dtype=cfg.cache_dtype, image_sharding=self.image_sh,
                               token_sharding=self.token_sh, target_sharding=self.lr_sh)

        self.optim = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                 end_lr_ratio=cfg.end_lr_ratio, clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay)
        self.program = step_lib.train_program(self.blink, self.dim, cfg.seed, self.optim, cfg.temperature,
                                              cfg.mse_weight, self.lr_sh)
        self.train_step = self.program.step
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=cfg.keep)
        if self.is_main:  # paths made absolute, so `export_only` and readers work from any directory
            cfg.with_absolute_paths().save(self.workdir / "config.json")

    # ------------------------------------------------------------------------------------------------ setup

    def _check_workdir(self) -> None:
        """A work directory with checkpoints must have been trained for the same TokenSR shapes."""
        saved = self.workdir / "config.json"
        checkpoints = self.workdir / "checkpoints"
        if saved.is_file() and checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            old = TrainConfig.from_json(saved)
            clashes = [f"--{f.replace('_', '-')} was {getattr(old, f)}, now {getattr(self.cfg, f)}"
                       for f in STATE_FIELDS if getattr(old, f) != getattr(self.cfg, f)]
            if clashes:
                raise TrainConfigError(f"work directory {self.workdir} holds a run with other TokenSR shapes ("
                                       + "; ".join(clashes) + "): use those values or a new --workdir")
            # Other changes are allowed (e.g. more --steps), but said, and the old config is kept beside the new.
            now, old = self.cfg.with_absolute_paths(), old.with_absolute_paths()
            changed = [f"--{f.name.replace('_', '-')} {getattr(old, f.name)} -> {getattr(now, f.name)}"
                       for f in dataclasses.fields(TrainConfig)
                       if f.name not in STATE_FIELDS and getattr(old, f.name) != getattr(now, f.name)]
            if changed and self.is_main:
                log.warning("resuming %s with changed settings: %s (the earlier config.json is kept as %s)",
                            self.workdir, "; ".join(changed), saved.with_suffix(".previous.json").name)
                old.save(saved.with_suffix(".previous.json"))

    def _data_source(self):
        if self.is_main:
            llava_mix.prepare(self.cfg.data_dir, self.cfg.tfds_path)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("llava_mix prepared")
        return llava_mix.data_source(self.cfg.data_dir, self.cfg.tfds_path, build=False)

    def init_or_restore(self) -> dict:
        """A fresh state born sharded, or the newest checkpoint's (which also rewinds the data iterator)."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return self.program.init()
        log.info("resuming from %s step %d", self.checkpointer.directory, latest)
        return self.checkpointer.restore(latest, self.program.abstract_state, self.iterator)

    # ----------------------------------------------------------------------------------------------- a step

    def inputs(self, batch: dict, step: int) -> tuple[jax.Array, jax.Array, dict]:
        """A host batch -> (hs_lr [Lp, B, r, r, D], target [Lp, B, O, O, D], info) on the mesh."""
        put = sharding.to_global
        s = student_inputs(
            self.backbone.graphdef, self.backbone.params, put(batch["input_ids"], self.token_sh),
            put(batch["pixel_values"], self.image_sh), put(batch["attention_mask"], self.token_sh),
            jnp.asarray(step, jnp.int32), jnp.asarray(self.cfg.p_random_region, jnp.float32),
            jnp.asarray(self.cfg.seed, jnp.int32), layers=self.blink.layers, region_size=self.blink.region_size,
            num_regions=self.num_regions, lr_sharding=self.lr_sh, region_sharding=self.region_sh)
        regions = sharding.to_local(s.region, self.region_sh)
        target = self.teacher(batch["image"], batch["image_digest"], regions)
        info = {"rho": jnp.mean(s.rho), "random_region_frac": jnp.mean(s.random.astype(jnp.float32))}
        return s.hs_lr, sharding.to_global(target, self.lr_sh), info

    # ------------------------------------------------------------------------------------------------- run

    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Trains to `cfg.steps` (resuming if the work directory has a checkpoint), saves and exports.

        `stop_after=k` simulates a preemption: return right after step k, with only the periodic checkpoints.
        """
        cfg = self.cfg
        state = self.init_or_restore()
        start = int(jax.device_get(state["step"]))
        logger = MetricsLogger(self.workdir, total_steps=cfg.steps, initial_step=start, enabled=self.is_main,
                               progress=self.progress)
        done = start
        interrupt = _StopAtStepBoundary()
        try:
            window_start, window_examples = time.perf_counter(), 0
            hits0, computed0 = self.teacher.stats["hits"], self.teacher.stats["computed"]
            for step in range(start, cfg.steps):
                batch = next(self.iterator)
                hs_lr, target, info = self.inputs(batch, step)
                state, metrics = self.train_step(state, hs_lr, target)
                metrics = jax.device_get({**metrics, **info})
                self._check_finite(step + 1, metrics)
                done = step + 1
                window_examples += cfg.batch_size
                logger.advance()
                if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1:
                    now = time.perf_counter()
                    stats = self.teacher.stats
                    metrics.update(examples_per_s=window_examples / max(now - window_start, 1e-9),
                                   teacher_cache_hits=stats["hits"] - hits0,
                                   teacher_crops_computed=stats["computed"] - computed0)
                    logger.write(done, metrics)
                    window_start, window_examples = now, 0
                    hits0, computed0 = stats["hits"], stats["computed"]
                if done % cfg.save_every == 0 and done < cfg.steps:
                    self.checkpointer.save(done, state, self.iterator)
                if stop_after is not None and done >= stop_after:
                    self.checkpointer.wait()
                    return TrainResult(done, self._host_params(state), self.workdir, None)
                if interrupt.requested:  # Ctrl-C: finish the step, save it, then stop
                    if self.checkpointer.latest_step() != done:
                        self.checkpointer.save(done, state, self.iterator)
                    self.checkpointer.wait()
                    raise TrainingInterrupted(f"interrupted after step {done}, saved in {self.checkpointer.directory}: "
                                              f"rerun the same command to resume")
            if self.checkpointer.latest_step() != cfg.steps:
                self.checkpointer.save(cfg.steps, state, self.iterator)
            self.checkpointer.wait()
            return TrainResult(done, self._host_params(state), self.workdir, self._export(state, done))
        finally:
            interrupt.restore()
            logger.close()
            self.checkpointer.wait()
            self.checkpointer.close()

    def _check_finite(self, step: int, metrics: dict) -> None:
        bad = {k: float(metrics[k]) for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(metrics[k])}
        if bad:
            latest = self.checkpointer.latest_step()
            where = (f"the last good checkpoint is step {latest} in {self.checkpointer.directory}" if latest is not None
                     else "no checkpoint was saved yet")
            raise NonFiniteLossError(
                f"step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())}; training stopped without saving this "
                f"step, {where}. Lower --lr, raise --warmup-steps or --clip-norm, or check the data and "
                f"--backbone-dtype, then rerun the same command to resume")

    def _host_params(self, state: dict) -> dict:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                                state["params"])
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["params"])

    def _export(self, state: dict, step: int) -> Path | None:
        if jax.process_count() > 1:
            log.warning("several hosts: export the TokenSR afterwards on one host with `python -m train.tokensr "
                        "--export-only --workdir %s`", self.workdir)
            return None
        return export_tokensr(self.workdir / "tokensr", self.program.graphdef, state["params"], self.blink, dim=self.dim,
                              extra=provenance(self.cfg, step))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the current step was finished and saved."""


class _StopAtStepBoundary:
    """While training, the first SIGINT (Ctrl-C) only sets `requested`, so the loop stops at the end of a step with
    a consistent checkpoint (model state and data iterator); a second one interrupts at once. Main thread of a
    single-process run only."""

    def __init__(self):
        self.requested = False
        self._previous = None
        # Single process only: on several hosts the save is a collective, and hosts that saw no Ctrl-C (or saw it
        # at another step) would wait in the next step's collectives; there Ctrl-C keeps its default behaviour.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def provenance(cfg: TrainConfig, step: int) -> dict:
    return {"trained": {"step": step, "model": str(cfg.model), "data_dir": str(cfg.data_dir), "seed": cfg.seed,
                        "lr": cfg.lr, "batch_size": cfg.batch_size, "mse_weight": cfg.mse_weight,
                        "temperature": cfg.temperature, "p_random_region": cfg.p_random_region}}


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    if cfg.distributed:
        initialize_distributed()  # first: each process locks its own file (blink_jax.rundir)
    with rundir.hold(cfg.workdir, process=jax.process_index(), flag="--workdir"):
        return Trainer(cfg, progress=progress).run(stop_after=stop_after)


def export_only(workdir: str | Path) -> Path:
    """Exports the newest checkpoint of `workdir` to `<workdir>/tokensr/` (one process, on its first device)."""
    workdir = Path(workdir).absolute()
    cfg = TrainConfig.from_json(workdir / "config.json")
    dim = LlavaConfig.from_json(cfg.model).text.hidden_size
    optim = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, end_lr_ratio=cfg.end_lr_ratio,
                        clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    program = step_lib.train_program(cfg.blink, dim, cfg.seed, optim, cfg.temperature, cfg.mse_weight,
                                     sharding.replicated(mesh))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.keep)
    latest = checkpointer.latest_step()
    if latest is None:
        raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint to export")
    state = checkpointer.restore_state(latest, program.abstract_state)
    checkpointer.close()
    return export_tokensr(workdir / "tokensr", program.graphdef, state["params"], cfg.blink, dim=dim,
                          extra=provenance(cfg, latest))
