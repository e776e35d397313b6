"""Training metrics: one JSON object per line in `<workdir>/metrics.jsonl` (appended and flushed as they come; after
a resume a step may appear twice, the later line wins), a tqdm progress bar, and TensorBoard scalars when
`tensorboardX` is installed. Only the first host writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsLogger:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None
        self._bar = None
        if enabled and progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="TokenSR", unit="step", dynamic_ncols=True)
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, metrics: dict) -> None:
        """`metrics` may hold device or numpy scalars and per-layer vectors."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time") and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}",
                                  gnorm=f"{record.get('grad_norm', float('nan')):.3g}",
                                  ex_s=f"{record.get('examples_per_s', 0.0):.3g}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> dict[int, dict]:
    """step -> the last record logged for it."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["step"]] = record
    return out
