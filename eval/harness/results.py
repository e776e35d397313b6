"""Scoring saved samples, and the run's outputs: results.json (metrics per mode, config, versions) and the
markdown table of the modes side by side with the paper's numbers.

Scoring reads only the samples file and the benchmark's docs, so `eval.score` on a samples file gives
exactly the metrics of the run that wrote it, and a resumed run exactly those of an uninterrupted one.
Errored questions (unreadable image, ...) are counted and listed, and left out of the metrics.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.benchmarks.base import Benchmark
from eval.harness.io import read_jsonl
from eval.harness.paper import paper_value

PACKAGES = ("jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "numpy", "tensorflow-datasets", "pillow",
            "blink-jax")


def latest_records(records: Iterable[dict]) -> dict[str, dict]:
    """question_id -> its last record (a retried question's newer line wins)."""
    latest: dict[str, dict] = {}
    for r in records:
        if "question_id" in r:
            latest[str(r["question_id"])] = r
    return latest


def answered_results(bench: Benchmark, docs: Mapping[str, dict], latest: Mapping[str, dict]) -> dict[str, dict]:
    """question_id -> `bench.process_results` of its answer, for the answered (not errored) questions of `docs`."""
    return {q: bench.process_results(docs[q], r.get("prediction") or "") for q, r in latest.items()
            if q in docs and r.get("error") is None}


def score_records(bench: Benchmark, docs: Mapping[str, dict], records: Iterable[dict]) -> dict:
    """Samples (dicts with question_id, prediction, error) + docs by id -> metrics, headline, counts, errors."""
    latest = latest_records(records)
    unknown = [q for q in latest if q not in docs]
    kept = [r for q, r in latest.items() if q in docs]
    errors = [{"question_id": r["question_id"], "error": r["error"]} for r in kept if r.get("error") is not None]
    results = answered_results(bench, docs, latest)
    metrics = bench.aggregate(list(results.values()))
    return {
        "metrics": metrics,
        "headline": bench.headline(metrics),
        "counts": {"questions": len(docs), "answered": len(results), "errors": len(errors),
                   "missing": len(docs) - len(kept), "unknown_ids": len(unknown)},
        "errors": errors,
    }


def score_file(bench: Benchmark, docs: Mapping[str, dict], path: str | os.PathLike) -> dict:
    return score_records(bench, docs, read_jsonl(path))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, Any]:
    """Python, packages, git commit (and whether the tree had local changes), accelerator."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    commit = _git("rev-parse", "HEAD")
    out["git_commit"] = commit
    out["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    try:
        import jax

        devices = jax.devices()
        out["device"] = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    except Exception as e:  # noqa: BLE001 - a results file must not fail on a device query
        out["device"] = f"unknown ({type(e).__name__})"
    return out


def results_document(bench: Benchmark, modes: Sequence[dict], config: dict, versions_: dict,
                     paired: Mapping | None = None) -> dict:
    """modes: [{"name", "kind", "label", "ablation", "settings", "score": score_records(...), "files": {...}}];
    paired: `eval.harness.paired.against_first(...)`, if the benchmark has per-answer correctness."""
    return {
        "bench": bench.name, "title": bench.title, "task_version": bench.version, "headline_note": bench.headline_note,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions_,
        "modes": {m["name"]: {"kind": m["kind"], "label": m["label"], "ablation": m.get("ablation"),
                              "settings": m["settings"], **m["score"], "files": m.get("files", {})} for m in modes},
        "paper": {row: {m["name"]: paper_value(row, m["kind"], m.get("ablation")) for m in modes}
                  for row in bench.paper_rows},
        "paired": dict(paired or {}),
    }


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def _fmt2(value) -> str:
    """Headline cells, on the paper's scale: two decimals."""
    return "—" if value is None else f"{value:.2f}"


def _flatten(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
            flat[key] = v
    return flat


def markdown_table(doc: Mapping) -> str:
    """The headline rows, modes side by side with the paper's numbers; then every metric; then counts."""
    modes = doc["modes"]
    names = list(modes)
    lines = [f"# {doc['title']}: {', '.join(modes[n]['label'] for n in names)}", ""]
    header = ["metric"] + [h for n in names for h in (modes[n]["label"], f"{modes[n]['label']} (paper)")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in doc["paper"]:
        cells = [row] + [c for n in names for c in (_fmt2(modes[n]["headline"].get(row)), _fmt2(doc["paper"][row][n]))]
        lines.append("| " + " | ".join(cells) + " |")
    if doc["paper"]:
        note = f"{doc['title']}: {doc['headline_note']}. " if doc.get("headline_note") else ""
        lines += ["", f"{note}The (paper) columns are the paper's LLaVA-1.5-7B numbers (BLINK.md §7), for reference."]
    flat = {n: _flatten(modes[n]["metrics"]) for n in names}
    keys = list(dict.fromkeys(k for n in names for k in flat[n]))
    if keys:
        lines += ["", "## All metrics", "", "| metric | " + " | ".join(modes[n]["label"] for n in names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        lines += ["| " + " | ".join([k] + [_fmt(flat[n].get(k)) for n in names]) + " |" for k in keys]
    lines += ["", "## Questions", "", "| | " + " | ".join(modes[n]["label"] for n in names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for key in ("questions", "answered", "errors", "missing"):
        lines.append("| " + " | ".join([key] + [str(modes[n]["counts"][key]) for n in names]) + " |")
    lines += paired_lines(doc)
    config = doc.get("config", {})
    lines += ["", f"Model `{config.get('model')}`, data `{config.get('data_dir')}`, commit "
              f"`{doc.get('versions', {}).get('git_commit')}`; paper: BLINK.md §7 (LLaVA-1.5-7B)."]
    return "\n".join(lines) + "\n"


def paired_lines(doc: Mapping) -> list[str]:
    """The paired comparison of each mode against the reference mode (`eval.harness.paired`), as a table."""
    paired = doc.get("paired") or {}
    if not paired.get("modes"):
        return []
    modes = doc["modes"]
    ref = modes[paired["reference"]]["label"]
    lines = ["", f"## Paired comparison against {ref}", "",
             f"Same questions, scored per unit; only the units one mode gets right and the other wrong tell them "
             f"apart. 95% interval: bootstrap over units; p: McNemar's exact test.", "",
             f"| mode | units | right only here | right only in {ref} | accuracy difference (points) | 95% interval "
             f"| McNemar p |", "|---|---|---|---|---|---|---|"]
    for name, c in paired["modes"].items():
        if not c["units"]:
            lines.append(f"| {modes[name]['label']} | 0 | — | — | — | — | — |")
            continue
        low, high = c["ci95"]
        lines.append(f"| {modes[name]['label']} | {c['units']} | {c['only_this']} | {c['only_reference']} "
                     f"| {100 * c['difference']:+.2f} | [{100 * low:+.2f}, {100 * high:+.2f}] | {c['mcnemar_p']:.3g} |")
    return lines
