"""Scoring saved samples, and the run's outputs: results.json (metrics per mode, config, versions) and the
markdown table of the modes side by side with the paper's numbers.

Scoring reads only the samples file and the benchmark's docs, so `eval.score` on a samples file gives
exactly the metrics of the run that wrote it, and a resumed run exactly those of an uninterrupted one.
Errored questions (unreadable image, ...) count as wrong in every metric, as the official scripts count a
question without a usable answer (BLINK.md §8), and are counted and listed beside the metrics.

A run is "partial" when its question set is not the benchmark's official release (`Benchmark.composition`:
a split or subtask left out, `--limit`, a malformed copy) or when questions of the set have no answer yet; the
coverage is recorded with the scores, and results.md marks every headline number of a partial run "partial".
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
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


def scored_results(bench: Benchmark, docs: Mapping[str, dict], latest: Mapping[str, dict]) -> dict[str, dict]:
    """question_id -> result, for every question of `docs` with a record: `process_results` of an answer,
    `error_result` (wrong) of an error."""
    return {q: bench.error_result(docs[q]) if r.get("error") is not None
            else bench.process_results(docs[q], r.get("prediction") or "")
            for q, r in latest.items() if q in docs}


def coverage(bench: Benchmark, docs: Mapping[str, dict], missing: int) -> dict:
    """{"data_set", "complete", "partial": [why, ...]}: the question set against the official release, and the
    questions without an answer."""
    why = bench.composition(list(docs.values()))
    if missing:
        why.append(f"{missing} of the {len(docs)} questions have no answer in the samples file")
    return {"data_set": bench.data_set(list(docs.values())), "complete": not why, "partial": why}


def score_records(bench: Benchmark, docs: Mapping[str, dict], records: Iterable[dict]) -> dict:
    """Samples (dicts with question_id, prediction, error) + docs by id -> metrics, headline, counts, errors,
    coverage."""
    latest = latest_records(records)
    unknown = [q for q in latest if q not in docs]
    kept = [r for q, r in latest.items() if q in docs]
    errors = [{"question_id": r["question_id"], "error": r["error"]} for r in kept if r.get("error") is not None]
    metrics = bench.aggregate(list(scored_results(bench, docs, latest).values()))
    missing = len(docs) - len(kept)
    return {
        "metrics": metrics,
        "headline": bench.headline(metrics),
        "counts": {"questions": len(docs), "answered": len(kept) - len(errors), "errors": len(errors),
                   "missing": missing, "unknown_ids": len(unknown)},
        "errors": errors,
        "coverage": coverage(bench, docs, missing),
    }


def cost_summary(records: Iterable[dict]) -> dict | None:
    """The mean cost of a mode's answered questions (their samples' `cost`, see `eval.harness.inference`):
    {"questions", "flops", "seconds", "seconds_questions", "seconds_include_compile"}; None when no record has one.

    Seconds are taken from the batches that compiled nothing when there are any (compilation is paid once per
    program, not per question); a run whose every batch compiled reports those, flagged."""
    costs = [r["cost"] for r in latest_records(records).values() if r.get("error") is None and r.get("cost")]
    if not costs:
        return None
    warm = [c for c in costs if not c.get("compiled")]
    timed = warm or costs
    counted = all(c.get("flops") is not None for c in costs)  # (not counted for Qwen2.5-VL yet)
    return {"questions": len(costs), "flops": sum(c["flops"] for c in costs) / len(costs) if counted else None,
            "seconds": sum(c["seconds"] for c in timed) / len(timed), "seconds_questions": len(timed),
            "seconds_include_compile": not warm}


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
        "partial": any(not m["score"]["coverage"]["complete"] for m in modes),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions_,
        "modes": {m["name"]: {"kind": m["kind"], "label": m["label"], "ablation": m.get("ablation"),
                              "settings": m["settings"], **m["score"], "cost": m.get("cost"),
                              "files": m.get("files", {})} for m in modes},
        "paper": {row: {m["name"]: paper_value(row, m["kind"], m.get("ablation")) for m in modes}
                  for row in bench.paper_rows},
        "paired": dict(paired or {}),
    }


NOT_RUN = object()  # a metric a mode does not have (as opposed to None: a metric that is undefined)


def _fmt(value) -> str:
    if value is NOT_RUN:
        return "—"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # undefined (e.g. POPE's precision of a split never answered "yes")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def _fmt2(value, partial: bool = False) -> str:
    """Headline cells, on the paper's scale: two decimals; a partial run's carry the word."""
    if value is None:
        return "—"
    return f"{value:.2f} (partial)" if partial else f"{value:.2f}"


def _flatten(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
            flat[key] = v
    return flat


def _partial(entry: Mapping) -> bool:
    return not entry.get("coverage", {"complete": True})["complete"]


def markdown_table(doc: Mapping) -> str:
    """The headline rows, modes side by side with the paper's numbers; then every metric; then counts."""
    modes = doc["modes"]
    names = list(modes)
    data_sets = {modes[n].get("coverage", {}).get("data_set", doc["title"]) for n in names}
    on = "" if data_sets == {doc["title"]} else f" on {', '.join(sorted(data_sets))}"
    lines = [f"# {doc['title']}{on}: {', '.join(modes[n]['label'] for n in names)}", ""]
    partial = [n for n in names if _partial(modes[n])]
    if partial:
        why = list(dict.fromkeys(w for n in partial for w in modes[n]["coverage"]["partial"]))
        whole = ", ".join(sorted(data_sets))
        lines += [f"**Partial run** ({', '.join(modes[n]['label'] for n in partial)}): not all of {whole}, so its "
                  f"numbers are not comparable with the paper's: {'; '.join(why)}.", ""]
    header = ["metric"] + [h for n in names for h in (modes[n]["label"], f"{modes[n]['label']} (paper)")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in doc["paper"]:
        cells = [row] + [c for n in names for c in (_fmt2(modes[n]["headline"].get(row), _partial(modes[n])),
                                                    _fmt2(doc["paper"][row][n]))]
        lines.append("| " + " | ".join(cells) + " |")
    if doc["paper"]:
        note = f"{doc['title']}: {doc['headline_note']}. " if doc.get("headline_note") else ""
        where = f", on {doc['title']}, not on this data set" if on else ""
        lines += ["", f"{note}The (paper) columns are the paper's LLaVA-1.5-7B numbers (BLINK.md §7){where}, for "
                      f"reference."]
    lines += cost_lines(doc)
    errored = [n for n in names if modes[n]["counts"]["errors"]]
    if errored:
        lines += ["", "Questions that could not be answered count as wrong in every metric: "
                  + ", ".join(f"{modes[n]['label']} {modes[n]['counts']['errors']}" for n in errored)
                  + " (listed in results.json)."]
    flat = {n: _flatten(modes[n]["metrics"]) for n in names}
    keys = list(dict.fromkeys(k for n in names for k in flat[n]))
    if keys:
        lines += ["", "## All metrics", "", "| metric | " + " | ".join(modes[n]["label"] for n in names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        lines += ["| " + " | ".join([k] + [_fmt(flat[n].get(k, NOT_RUN)) for n in names]) + " |" for k in keys]
    lines += ["", "## Questions", "", "| | " + " | ".join(modes[n]["label"] for n in names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for key in ("questions", "answered", "errors", "missing"):
        lines.append("| " + " | ".join([key] + [str(modes[n]["counts"][key]) for n in names]) + " |")
    lines += paired_lines(doc)
    config = doc.get("config", {})
    lines += ["", f"Model `{config.get('model')}`, data `{config.get('data_dir')}`, commit "
              f"`{doc.get('versions', {}).get('git_commit')}`; paper: BLINK.md §7 (LLaVA-1.5-7B)."]
    return "\n".join(lines) + "\n"


def cost_lines(doc: Mapping) -> list[str]:
    """Seconds and model FLOPs per question of every mode of this run, beside the accuracy table."""
    modes = doc["modes"]
    names = [n for n in modes if modes[n].get("cost")]
    if not names:
        return []
    base = modes[names[0]]["cost"]["flops"]
    lines = ["", "## Cost per question", "",
             f"Model FLOPs: counted analytically (`blink_jax.flops`) from each question's own prompt, images, answer "
             f"length and, for Blink, the layers that carried SR tokens. Seconds: wall time of the batches (batched, "
             f"padded, on {doc.get('versions', {}).get('device', 'this device')}) shared by their questions, from "
             f"batches that compiled nothing.", "",
             f"| mode | seconds per question | GFLOPs per question | FLOPs vs {modes[names[0]]['label']} | questions |",
             "|---|---|---|---|---|"]
    for n in names:
        c = modes[n]["cost"]
        seconds = f"{c['seconds']:.4f}" + (" (incl. compile)" if c["seconds_include_compile"] else "")
        counted = c["flops"] is not None and base is not None
        gflops, ratio = (f"{c['flops'] / 1e9:.3f}", f"{c['flops'] / base:.3f}x") if counted else ("n/a", "n/a")
        lines.append(f"| {modes[n]['label']} | {seconds} | {gflops} | {ratio} | {c['questions']} |")
    return lines


def paired_lines(doc: Mapping) -> list[str]:
    """The paired comparisons of each mode against the reference mode, then against each mode under "also"
    (`eval.harness.paired`), a table each."""
    paired = doc.get("paired") or {}
    lines = []
    for comparison in ([paired] if paired.get("modes") else []) + list(paired.get("also", [])):
        lines += _paired_table(doc["modes"], comparison)
    return lines


def _paired_table(modes: Mapping, paired: Mapping) -> list[str]:
    ref = modes[paired["reference"]]["label"]
    lines = ["", f"## Paired comparison against {ref}", "",
             "Same questions, scored per unit; only the units one mode gets right and the other wrong tell them "
             "apart. 95% interval: bootstrap over units; p: McNemar's exact test.", "",
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
