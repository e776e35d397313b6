"""The work directory of a run: `config.json` (paths absolute, so `export_only` and readers work from any
directory) and the check that a rerun into it, which resumes its checkpoints, trains the same TokenSR shapes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from train.config import TrainConfig, TrainConfigError

log = logging.getLogger(__name__)
# Fields that fix the shapes of the saved state: a resumed run must agree on them.
STATE_FIELDS = ("layers", "region_size", "scale", "channels", "kind")


def has_checkpoints(workdir: Path) -> bool:
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def check_resume(workdir: Path, cfg: TrainConfig, *, is_main: bool) -> None:
    """A work directory with checkpoints must have been trained for the same TokenSR shapes; other changed settings
    (e.g. more --steps) are allowed, but said, and the earlier config is kept as config.previous.json."""
    saved = workdir / "config.json"
    if not (saved.is_file() and has_checkpoints(workdir)):
        return
    old = TrainConfig.from_json(saved)
    clashes = [f"--{f.replace('_', '-')} was {getattr(old, f)}, now {getattr(cfg, f)}"
               for f in STATE_FIELDS if getattr(old, f) != getattr(cfg, f)]
    if clashes:
        raise TrainConfigError(f"work directory {workdir} holds a run with other TokenSR shapes ("
                               + "; ".join(clashes) + "): use those values or a new --workdir")
    now, old = cfg.with_absolute_paths(), old.with_absolute_paths()
    changed = [f"--{f.name.replace('_', '-')} {getattr(old, f.name)} -> {getattr(now, f.name)}"
               for f in dataclasses.fields(TrainConfig)
               if f.name not in STATE_FIELDS and getattr(old, f.name) != getattr(now, f.name)]
    if changed and is_main:
        log.warning("resuming %s with changed settings: %s (the earlier config.json is kept as %s)",
                    workdir, "; ".join(changed), saved.with_suffix(".previous.json").name)
        old.save(saved.with_suffix(".previous.json"))


def write_config(workdir: Path, cfg: TrainConfig) -> None:
    cfg.with_absolute_paths().save(workdir / "config.json")


def read_config(workdir: Path) -> TrainConfig:
    return TrainConfig.from_json(workdir / "config.json")


def provenance(cfg: TrainConfig, step: int) -> dict:
    """What the exported TokenSR records about the run that trained it."""
    return {"trained": {"step": step, "model": str(cfg.model), "data_dir": str(cfg.data_dir), "seed": cfg.seed,
                        "lr": cfg.lr, "batch_size": cfg.batch_size, "mse_weight": cfg.mse_weight,
                        "temperature": cfg.temperature, "p_random_region": cfg.p_random_region}}
