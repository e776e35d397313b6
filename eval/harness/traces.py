"""Blink's per-question decisions as JSON: a short summary for the samples file, the full record for
`--save-traces` (what `eval.report` draws)."""

from __future__ import annotations

from typing import Any

from blink_jax.blink.dtr import ACTION_NAMES, NO_REGION


def summary(trace, i: int) -> dict | None:
    """Row `i` of a HostTrace -> {"actions": [...], "rho": [...], "expansions", "sr_at_end"}; None for vanilla."""
    if trace is None:
        return None
    actions = [ACTION_NAMES[int(a)] for a in trace.action[:, i]]
    return {"layers": list(trace.layers), "actions": actions, "rho": [round(float(r), 5) for r in trace.rho[:, i]],
            "expansions": actions.count("expand"), "sr_at_end": bool(trace.expanded_region[-1, i] != NO_REGION)}


def record(trace, i: int, *, question_id: str, image: str | None, geometry: dict[str, Any]) -> dict:
    """Row `i` of a HostTrace as one traces_<bench>_<mode>.jsonl line: every layer's rho, r*, action and
    expanded region, with the image and the grid geometry needed to draw the regions."""
    return {
        "question_id": question_id, "image": image, **geometry,
        "layers": list(trace.layers),
        "rho": [float(r) for r in trace.rho[:, i]],
        "region": [int(r) for r in trace.region[:, i]],
        "action": [ACTION_NAMES[int(a)] for a in trace.action[:, i]],
        "expanded_region": [int(r) for r in trace.expanded_region[:, i]],
    }
