"""The two ways a run stops before its last step, each leaving a checkpoint it can resume from.

- A non-finite loss, gradient norm or parameter norm: `check_finite` raises before that step is logged or saved,
  so the newest checkpoint on disk is the last good one.
- Ctrl-C: the first SIGINT only asks the loop to stop at the end of the step (`StopAtStepBoundary`), which saves
  that step (model state and data iterator) and raises `TrainingInterrupted`; a second SIGINT stops at once.
"""

from __future__ import annotations

import logging
import math
import signal
import threading

import jax

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient / parameter norm) became NaN or infinite; nothing was saved for that step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the current step was finished and saved."""


def check_finite(step: int, metrics: dict, *, last_good: int | None, checkpoints: str) -> None:
    """Raises NonFiniteLossError if step `step`'s loss, grad_norm or param_norm is NaN or infinite; `last_good`:
    the newest saved step in the directory `checkpoints`, named in the message with the fixes."""
    bad = {k: float(metrics[k]) for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(metrics[k])}
    if bad:
        where = (f"the last good checkpoint is step {last_good} in {checkpoints}" if last_good is not None
                 else "no checkpoint was saved yet")
        raise NonFiniteLossError(
            f"step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())}; training stopped without saving this "
            f"step, {where}. Lower --lr, raise --warmup-steps or --clip-norm, or check the data and "
            f"--backbone-dtype, then rerun the same command to resume")


class StopAtStepBoundary:
    """While training, the first SIGINT (Ctrl-C) only sets `requested`, so the loop stops at the end of a step with
    a consistent checkpoint (model state and data iterator); a second one interrupts at once. Main thread of a
    single-process run only. A context manager: the previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopAtStepBoundary:
        # Single process only: on several hosts the save is a collective, and hosts that saw no Ctrl-C (or saw it
        # at another step) would wait in the next step's collectives; there Ctrl-C keeps its default behaviour.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
