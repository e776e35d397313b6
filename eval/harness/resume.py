"""A run directory's bookkeeping, so that rerunning a killed command ends with the same results.

Per mode the directory holds `samples_<bench>_<mode>.jsonl` (and, with `--save-traces`, `traces_<bench>_<mode>.jsonl`);
`run.json` records the settings that decide the predictions. A rerun skips the questions already answered and is
refused when its settings differ from those of the answers it would add to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from eval.harness.io import atomic_write_json, atomic_write_text, dumps_line, read_jsonl
from eval.harness.modes import ModeSpec
from eval.harness.results import latest_records


class RunConflict(ValueError):
    """The output directory holds a run made with other settings."""


def samples_path(out: Path, bench: str, mode: str) -> Path:
    return out / f"samples_{bench}_{mode}.jsonl"


def traces_path(out: Path, bench: str, mode: str) -> Path:
    return out / f"traces_{bench}_{mode}.jsonl"


def part_path(path: Path, process: int) -> Path:
    """Process `process`'s own samples (or traces) file in a multi-process run: every host appends to its part,
    process 0 merges the parts into `path` when a mode is done (`merge_parts`)."""
    return path.with_name(f"{path.stem}.part{process}{path.suffix}")


def part_paths(path: Path) -> list[Path]:
    """The parts of `path` on disk: those of a run still going or of a killed multi-process run."""
    return sorted(path.parent.glob(f"{path.stem}.part*{path.suffix}"))


def read_records(path: Path) -> list[dict]:
    """The records of `path` and then of its parts (newer), so `latest_records` sees a killed multi-process run."""
    return [r for f in (path, *part_paths(path)) if f.exists() for r in read_jsonl(f)]


def merge_parts(path: Path) -> None:
    """Appends the parts' records to `path` (rewritten atomically) and deletes the parts. Killed in between, the
    records are in both places: harmless, a question's latest record is the same either way."""
    parts = part_paths(path)
    if parts:
        atomic_write_text(path, "".join(dumps_line(r) + "\n" for r in read_records(path)))
        for part in parts:
            part.unlink()


def answered(samples: Path, *, retry_errors: bool) -> set[str]:
    """Question ids that `samples` (or its parts) already holds a final record for: an answer, or an error unless
    `retry_errors`."""
    return {q for q, r in latest_records(read_records(samples)).items()
            if not (retry_errors and r.get("error") is not None)}


def traces_cover(samples: dict[str, dict], traces: Path) -> bool:
    """Whether `traces` (with its parts) has a record for every question that `samples` (id -> latest record)
    answered."""
    answers = {q for q, r in samples.items() if r.get("error") is None}
    return answers <= set(latest_records(read_records(traces)))


def check_manifest(out: Path, fixed: dict, modes: Sequence[ModeSpec], *, save_traces: bool = False,
                   write: bool = True) -> None:
    """Refuses to mix runs: `fixed` and each mode's settings must match what `run.json` recorded for the modes
    whose samples are still there; with `save_traces`, a Blink mode's traces must cover its saved answers.
    Then records this run in `run.json` (with `write`: only process 0 of a multi-process run writes)."""
    path = out / "run.json"
    new = _normalise({**fixed, "modes": {m.name: m.settings() for m in modes}})
    if path.exists():
        old = json.loads(path.read_text())
        for key, value in new.items():
            if key != "modes" and key in old and old[key] != value:
                raise RunConflict(f"{out} holds a run with {key}={old[key]!r}, this one has {value!r}: use another "
                                  f"--out, or delete {out} to start over")
        for name, settings in new["modes"].items():
            before = old.get("modes", {}).get(name)
            samples = samples_path(out, fixed["bench"], name)
            if before is not None and before != settings and (samples.exists() or part_paths(samples)):
                raise RunConflict(f"{out} holds mode {name!r} run with other settings ({_differences(before, settings)})"
                                  f": use another --out, or delete {samples} (and its .part files) to answer it "
                                  f"afresh")
        new["modes"] = {**old.get("modes", {}), **new["modes"]}
    if save_traces:
        for mode in modes:
            samples = samples_path(out, fixed["bench"], mode.name)
            if (mode.blink or mode.crop) is not None and (samples.exists() or part_paths(samples)) and not traces_cover(
                    latest_records(read_records(samples)), traces_path(out, fixed["bench"], mode.name)):
                raise RunConflict(f"{out} holds answers of mode {mode.name!r} without traces, and traces now would cover "
                                  f"only the questions still to answer: use another --out for a run with complete "
                                  f"traces")
    if write:
        atomic_write_json(path, new)


def _normalise(obj):
    return json.loads(json.dumps(obj, default=lambda x: x.tolist() if hasattr(x, "tolist") else list(x)))


def _differences(old, new, prefix: str = "") -> str:
    """'blink.tau_exp was 0.3, now 0.2; ...' for the leaves of two settings dicts that differ."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{prefix or 'value'} was {old!r}, now {new!r}"
    parts = [_differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
             for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
    return "; ".join(parts)
