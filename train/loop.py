"""The TokenSR training loop (LLaVA-1.5 or Qwen2.5-VL, `blink_jax.model_inputs`): data -> frozen-backbone probes
(student inputs, teacher targets) -> jitted train step
-> metrics, checkpoints, export.

Per step: the grain batch (this host's rows) goes on the mesh; one jitted probe gives the SGS regions and the
TokenSR inputs; the teacher fills the targets from its cache or from crops (`train.inputs`); the donated train
step updates TokenSR (`blink_jax.training.step`). A non-finite loss, gradient norm or parameter norm stops the run before
anything is saved, so the newest checkpoint on disk is the last good one; Ctrl-C saves the finished step and
stops (`train.stopping`). A rerun into the same work directory resumes (`train.workdir`, `train.checkpointing`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from blink_jax import distributed, rundir, sharding
from blink_jax.training import step as step_lib
from blink_jax.training.optim import OptimConfig
from train import inputs as inputs_lib, workdir as workdir_lib
from train.backbone import load_backbone
from train.checkpointing import Checkpointer, export_tokensr
from train.config import TrainConfig
from blink_jax.model_inputs import inputs_for
from train.metrics import MetricsLogger
from train.stopping import StopAtStepBoundary, TrainingInterrupted, check_finite
from train.teacher import Teacher

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int  # steps done
    params: dict  # the TokenSR parameters, host numpy
    workdir: Path
    tokensr_dir: Path | None  # the export, None for a run stopped early or with several hosts


def train_program(cfg: TrainConfig, dim: int, student_sharding) -> step_lib.TrainProgram:
    """The train state's shapes and shardings, its initialiser and the jitted step, for `cfg`'s TokenSR and
    optimiser on a backbone of hidden size `dim`."""
    optim = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, end_lr_ratio=cfg.end_lr_ratio,
                        clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay)
    return step_lib.train_program(cfg.blink, dim, cfg.seed, optim, cfg.temperature, cfg.mse_weight, student_sharding)


def host_params(state: dict) -> dict:
    """The TokenSR parameters of a (sharded) train state as host numpy arrays, gathered from every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), state["params"])
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["params"])


class _LogWindow:
    """Throughput and teacher-cache use since the last logged step."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self._restart()

    def _restart(self) -> None:
        self.start, self.examples = time.perf_counter(), 0
        self.hits, self.computed = self.teacher.stats["hits"], self.teacher.stats["computed"]

    def add(self, examples: int) -> None:
        self.examples += examples

    def take(self) -> dict:
        """The window's numbers for the metrics line; starts a new window."""
        now, stats = time.perf_counter(), self.teacher.stats
        numbers = {"examples_per_s": self.examples / max(now - self.start, 1e-9),
                   "teacher_cache_hits": stats["hits"] - self.hits,
                   "teacher_crops_computed": stats["computed"] - self.computed}
        self._restart()
        return numbers


class Trainer:
    """A run, set up once: mesh, backbone, data, step inputs (student + teacher), jitted step and checkpoints;
    `run` trains to `cfg.steps`."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.workdir = Path(cfg.workdir).absolute()
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch(cfg.batch_size, self.mesh)
        self.local_batch = cfg.batch_size // jax.process_count()
        self.workdir.mkdir(parents=True, exist_ok=True)
        workdir_lib.check_resume(self.workdir, cfg, is_main=self.is_main)
        log.info("%s; global batch %d (%d per host)", sharding.describe(self.mesh), cfg.batch_size, self.local_batch)

        self.family = inputs_for(cfg.model, pad_to_square=cfg.pad_to_square, region_size=cfg.region_size,
                                max_pixels=cfg.max_pixels)
        self.family.check_mesh(self.mesh)
        self.blink = cfg.blink
        for grid in self.family.grids:  # before a long load
            self.blink.validate_for(self.family.num_layers, grid)
        dtype = jnp.bfloat16 if cfg.backbone_dtype == "bfloat16" else jnp.float32
        self.backbone = load_backbone(cfg.model, self.mesh, dtype)
        self.dim = self.family.hidden_size

        self.loader = inputs_lib.data_loader(cfg, self.family, local_batch=self.local_batch, is_main=self.is_main)
        self.iterator = iter(self.loader)
        shardings = inputs_lib.BatchShardings.on(self.mesh)
        self.teacher = inputs_lib.make_teacher(cfg, self.backbone, self.family, mesh=self.mesh,
                                               local_batch=self.local_batch, shardings=shardings)
        self.inputs = inputs_lib.StepInputs(self.backbone, self.teacher, self.family, cfg, shardings=shardings)
        self.program = train_program(cfg, self.dim, shardings.student)
        self.train_step = self.program.step
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=cfg.keep)
        if self.is_main:
            workdir_lib.write_config(self.workdir, cfg)

    def init_or_restore(self) -> dict:
        """A fresh state born sharded, or the newest checkpoint's (which also rewinds the data iterator)."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return self.program.init()
        log.info("resuming from %s step %d", self.checkpointer.directory, latest)
        return self.checkpointer.restore(latest, self.program.abstract_state, self.iterator)

    def step(self, state: dict, step: int) -> tuple[dict, dict]:
        """Step `step` (0-based) on the next batch -> (new state, host metrics); raises NonFiniteLossError."""
        hs_lr, target, info = self.inputs(next(self.iterator), step)
        state, metrics = self.train_step(state, hs_lr, target)
        metrics = jax.device_get({**metrics, **info})
        check_finite(step + 1, metrics, last_good=self.checkpointer.latest_step(),
                     checkpoints=str(self.checkpointer.directory))
        return state, metrics

    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Trains to `cfg.steps` (resuming if the work directory has a checkpoint), saves and exports.

        `stop_after=k` returns right after step k with only the periodic checkpoints saved and nothing exported,
        as a preempted job would leave the work directory.
        """
        cfg = self.cfg
        state = self.init_or_restore()
        start = done = int(jax.device_get(state["step"]))
        logger = MetricsLogger(self.workdir, total_steps=cfg.steps, initial_step=start, enabled=self.is_main,
                               progress=self.progress)
        try:
            with StopAtStepBoundary() as interrupt:
                window = _LogWindow(self.teacher)
                for step in range(start, cfg.steps):
                    state, metrics = self.step(state, step)
                    done = step + 1
                    window.add(cfg.batch_size)
                    logger.advance()
                    if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1:
                        logger.write(done, {**metrics, **window.take()})
                    if done % cfg.save_every == 0 and done < cfg.steps:
                        self.checkpointer.save(done, state, self.iterator)
                    if stop_after is not None and done >= stop_after:
                        self.checkpointer.wait()
                        return TrainResult(done, host_params(state), self.workdir, None)
                    if interrupt.requested:  # Ctrl-C: finish the step, save it, then stop
                        self._save(done, state)
                        raise TrainingInterrupted(f"interrupted after step {done}, saved in "
                                                  f"{self.checkpointer.directory}: rerun the same command to resume")
            self._save(cfg.steps, state)
            return TrainResult(done, host_params(state), self.workdir, self._export(state, done))
        finally:
            logger.close()
            self.checkpointer.wait()
            self.checkpointer.close()

    def _save(self, step: int, state: dict) -> None:
        """Saves `step` unless it is the newest checkpoint already; waits until it is on disk."""
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, state, self.iterator)
        self.checkpointer.wait()

    def _export(self, state: dict, step: int) -> Path | None:
        if jax.process_count() > 1:
            log.warning("several hosts: export the TokenSR afterwards on one host with `python -m train.tokensr "
                        "--export-only --workdir %s`", self.workdir)
            return None
        return export_tokensr(self.workdir / "tokensr", self.program.graphdef, state["params"], self.blink, dim=self.dim,
                              extra=workdir_lib.provenance(self.cfg, step))


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    if cfg.distributed:  # JAX's environment / cluster detection (the flags of `train.tokensr` initialise first)
        distributed.initialize()  # before the lock: each process locks its own file (blink_jax.rundir)
    with rundir.hold(cfg.workdir, process=jax.process_index(), flag="--workdir"):
        return Trainer(cfg, progress=progress).run(stop_after=stop_after)


def export_only(workdir: str | Path) -> Path:
    """Exports the newest checkpoint of `workdir` to `<workdir>/tokensr/` (one process, on its first device)."""
    workdir = Path(workdir).absolute()
    cfg = workdir_lib.read_config(workdir)
    dim = inputs_for(cfg.model, pad_to_square=cfg.pad_to_square, region_size=cfg.region_size,
                    max_pixels=cfg.max_pixels).hidden_size
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    program = train_program(cfg, dim, sharding.replicated(mesh))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=cfg.keep)
    latest = checkpointer.latest_step()
    if latest is None:
        raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint to export")
    state = checkpointer.restore_state(latest, program.abstract_state)
    checkpointer.close()
    return export_tokensr(workdir / "tokensr", program.graphdef, state["params"], cfg.blink, dim=dim,
                          extra=workdir_lib.provenance(cfg, latest))
