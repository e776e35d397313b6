"""Resumable checkpoints (orbax `CheckpointManager`) and the final TokenSR export.

`<workdir>/checkpoints/<step>/` holds two items:
  state  the train state (TokenSR params, optimiser state, step), each array saved and restored in its sharding
  data   the grain iterator state, one JSON file per host (grain's orbax handler)
Saves are asynchronous; the last `keep` are kept. A restore puts the arrays straight into the shardings of
the abstract state it is given, so a run resumes on any mesh.

`<workdir>/tokensr/` is the exported TokenSRBank (`blink_jax.blink.checkpoint.save_tokensr`): what
`--tokensr DIR` takes in eval and inference.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from blink_jax import CheckpointError
from blink_jax.blink.checkpoint import save_tokensr

log = logging.getLogger(__name__)


class _IteratorSnapshot:
    """The iterator's state at save time: the save may finish in the background while training reads on."""

    def __init__(self, iterator):
        self.state = iterator.get_state()

    def get_state(self):
        return self.state


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, iterator) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))),
            force=True)

    def restore(self, step: int, abstract_state: dict, iterator) -> dict:
        """The state at `step`, born in the shardings of `abstract_state` (ShapeDtypeStructs with `sharding`);
        `iterator` is moved to where it stood when that step was saved."""
        self._check_data_processes(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
        return restored["state"]

    def _check_data_processes(self, step: int) -> None:
        """The data iterator's position is saved per process, for that process's shard of the data
        (`process_<i>-of-<n>.json`); another process count reads other shards, which no saved position describes.
        The train state itself would restore on any count: say so, and what works, instead of grain's bare error."""
        data = self.directory / str(step) / "data"
        index, count = jax.process_index(), jax.process_count()
        if not data.is_dir() or (data / f"process_{index}-of-{count}.json").exists():
            return
        saved = sorted(p.name for p in data.glob("process_*-of-*.json"))
        counts = sorted({name.rsplit("-of-", 1)[1].removesuffix(".json") for name in saved})
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} was saved by {' or '.join(counts) or 'an unknown number of'} "
            f"process(es) ({', '.join(saved) or 'no data iterator files'}) and this run has {count}: the data "
            f"iterator's position is saved per process and does not carry over to another process count. Resume "
            f"with the process count it was saved with, or export what it learned on any count with "
            f"`python -m train.tokensr --export-only --workdir {self.directory.parent}` and start a new --workdir")

    def restore_state(self, step: int, abstract_state: dict) -> dict:
        """Only the train state (e.g. for exporting), leaving the data item alone."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def export_tokensr(out_dir: str | os.PathLike, graphdef, params: dict, blink, *, dim: int, extra: dict) -> Path:
    """Writes the bank to `out_dir` in the `load_tokensr` format (host numpy copies of the parameters)."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    bank = nnx.merge(graphdef, host)
    path = save_tokensr(out_dir, bank, blink, dim=dim, extra=extra)
    log.info("TokenSR exported to %s", path)
    return path
