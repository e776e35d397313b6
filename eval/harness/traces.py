"""Blink's per-question decisions as JSON: a short summary for the samples file, the full record for
`--save-traces` (what `eval.report` draws)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blink_jax.blink.dtr import ACTION_NAMES, NO_REGION
from eval.harness.io import append_lines, open_append_jsonl


def crop_summary(trace, i: int) -> dict:
    """Row `i` of the crop mode's pass 1: the layer, rho and r* it read, the crop box in the original image's
    pixels (left, top, right, bottom; right/bottom exclusive) and that image's (width, height)."""
    return {"crop_layer": int(trace.layer), "rho": round(float(trace.rho[i]), 5), "region": int(trace.region[i]),
            "box": [int(v) for v in trace.boxes[i]], "original_size": [int(v) for v in trace.sizes[i]]}


def summary(trace, i: int) -> dict | None:
    """Row `i` of a HostTrace -> {"actions": [...], "rho": [...], "expansions", "sr_at_end"}; of a crop trace ->
    `crop_summary`; None for vanilla."""
    if trace is None:
        return None
    if hasattr(trace, "boxes"):
        return crop_summary(trace, i)
    actions = [ACTION_NAMES[int(a)] for a in trace.action[:, i]]
    return {"layers": list(trace.layers), "actions": actions, "rho": [round(float(r), 5) for r in trace.rho[:, i]],
            "expansions": actions.count("expand"), "sr_at_end": bool(trace.expanded_region[-1, i] != NO_REGION)}


def record(trace, i: int, *, question_id: str, image: str | None, geometry: dict[str, Any]) -> dict:
    """Row `i` of a HostTrace as one traces_<bench>_<mode>.jsonl line: every layer's rho, r*, action and
    expanded region, with the image and the grid geometry needed to draw the regions. A crop trace's line is
    `crop_summary` with the image and geometry."""
    if hasattr(trace, "boxes"):
        return {"question_id": question_id, "image": image, **geometry, **crop_summary(trace, i)}
    return {
        "question_id": question_id, "image": image, **geometry,
        "layers": list(trace.layers),
        "rho": [float(r) for r in trace.rho[:, i]],
        "region": [int(r) for r in trace.region[:, i]],
        "action": [ACTION_NAMES[int(a)] for a in trace.action[:, i]],
        "expanded_region": [int(r) for r in trace.expanded_region[:, i]],
    }


class TraceFile:
    """traces_<bench>_<mode>.jsonl of a run with --save-traces, appended batch by batch; with `path` None (no
    --save-traces, or vanilla) writing is a no-op."""

    def __init__(self, path: Path | None, *, geometry: dict[str, Any]):
        self.geometry = geometry  # grid, image size, region size, padding: what eval.report needs to draw regions
        self._file = open_append_jsonl(path) if path is not None else None

    def write(self, trace, questions: Sequence[tuple[str, str | None]]) -> None:
        """Rows 0.. of a HostTrace, one per (question id, image path) of `questions`."""
        if self._file is None or trace is None:
            return
        append_lines(self._file, [record(trace, i, question_id=q, image=image, geometry=self.geometry)
                                  for i, (q, image) in enumerate(questions)])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> TraceFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
