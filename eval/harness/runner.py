"""Runs a benchmark in several modes: batched greedy decoding over length buckets, resumable, one JSONL line
per question.

Per mode, `samples_<bench>_<mode>.jsonl` in the output directory gets one line per question, appended as
each batch finishes: `question_id`, `prediction`, the Blink trace summary, or an `error` for a question
that could not be asked (unreadable image, ...). A rerun of the same command skips the questions already
in the file, so a killed run resumes where it stopped and ends with the same results. `run.json` holds the
settings that decide the predictions; a rerun with other settings into the same directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval import benchmarks
from eval.benchmarks.base import Benchmark
from eval.harness import paired
from eval.harness import traces as trace_io
from eval.harness.batching import Batch, pad_batch, plan_batches, prefetch
from eval.harness.io import append_lines, atomic_write_json, atomic_write_text, open_append_jsonl, read_jsonl
from eval.harness.modes import ModeSpec, build_modes, check_fit
from eval.harness.questions import question_error
from eval.harness.results import (answered_results, latest_records, markdown_table, results_document,
                                  score_records, versions)

DTYPES = ("bfloat16", "float32", "float16")


class RunConflict(ValueError):
    """The output directory holds a run made with other settings."""


class SimulatedKill(RuntimeError):
    """Raised by `run_eval(stop_after=k)` once k questions are written: a kill, for the resume tests."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    bench: str
    model: str
    data_dir: str
    out: str
    modes: tuple[str, ...] = ("vanilla", "interp", "blink")
    tokensr: str | None = None
    ablation: str | None = None
    limit: int | None = None  # questions per subset (split / subtask); None: all
    batch_size: int = 8
    bucket: int = 64  # prompts are left-padded to a multiple of this
    max_new_tokens: int | None = None  # None: the benchmark's default
    layers: tuple[int, ...] | None = None
    region_size: int | None = None
    tau_exp: float | None = None
    tau_drop: float | None = None
    dtype: str = "bfloat16"
    tfds_dir: str | None = None  # prepared datasets; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    save_traces: bool = False
    retry_errors: bool = False
    seed: int = 0  # the random-region ablation's key
    pad_to_square: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.bucket < 1:
            raise ValueError(f"--batch-size {self.batch_size} and --bucket {self.bucket} must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is unknown; use one of {DTYPES}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} must be positive")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} must be positive")


@dataclasses.dataclass
class Prepared:
    """One question ready to batch: its doc, prompt ids, or why it cannot be asked."""
    doc: dict
    prompt: str
    ids: list[int] | None
    error: str | None = None


def samples_path(out: Path, bench: str, mode: str) -> Path:
    return out / f"samples_{bench}_{mode}.jsonl"


def traces_path(out: Path, bench: str, mode: str) -> Path:
    return out / f"traces_{bench}_{mode}.jsonl"


def _normalise(obj):
    return json.loads(json.dumps(obj, default=lambda x: x.tolist() if hasattr(x, "tolist") else list(x)))


def check_manifest(out: Path, fixed: dict, modes: Sequence[ModeSpec], *, save_traces: bool = False) -> None:
    """Refuses to mix runs: `fixed` and each mode's settings must match what `run.json` recorded for the modes
    whose samples are still there; with `save_traces`, a Blink mode's traces must cover its saved answers."""
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
            if before is not None and before != settings and samples.exists():
                raise RunConflict(f"{out} holds mode {name!r} run with other settings ({_differences(before, settings)})"
                                  f": use another --out, or delete {samples} to answer it afresh")
        new["modes"] = {**old.get("modes", {}), **new["modes"]}
    if save_traces:
        for mode in modes:
            samples = samples_path(out, fixed["bench"], mode.name)
            if mode.blink is not None and samples.exists() and not traces_cover(
                    latest_records(read_jsonl(samples)), traces_path(out, fixed["bench"], mode.name)):
                raise RunConflict(f"{out} holds answers of mode {mode.name!r} without traces, and traces now would cover "
                                  f"only the questions still to answer: use another --out for a run with complete "
                                  f"traces")
    atomic_write_json(path, new)


def traces_cover(samples: dict[str, dict], traces: Path) -> bool:
    """Whether `traces` has a record for every question that `samples` (id -> latest record) answered."""
    answered = {q for q, r in samples.items() if r.get("error") is None}
    return answered <= (set(latest_records(read_jsonl(traces))) if traces.exists() else set())


def _differences(old, new, prefix: str = "") -> str:
    """'blink.tau_exp was 0.3, now 0.2; ...' for the leaves of two settings dicts that differ."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{prefix or 'value'} was {old!r}, now {new!r}"
    parts = [_differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
             for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
    return "; ".join(parts)


class _Counter:
    def __init__(self, stop_after: int | None):
        self.written, self.stop_after = 0, stop_after

    def add(self, n: int) -> None:
        self.written += n
        if self.stop_after is not None and self.written >= self.stop_after:
            raise SimulatedKill(f"stopped after {self.written} questions (stop_after={self.stop_after})")


class Runner:
    """The model, tokenizer and docs of one `run_eval`; `run_mode` answers every question of a mode."""

    def __init__(self, cfg: EvalConfig, bench: Benchmark, docs: list[dict], model, tokenizer):
        self.cfg, self.bench, self.docs, self.model, self.tokenizer = cfg, bench, docs, model, tokenizer
        self.out = Path(cfg.out)
        self.data_dir = Path(cfg.data_dir)
        self.max_new_tokens = cfg.max_new_tokens or bench.max_new_tokens
        text = model.config.text
        self.pad_id = int(text.pad_token_id if text.pad_token_id is not None else (tokenizer.pad_token_id or 0))
        self.eos_id = text.eos_token_id
        self.prepared = [self._prepare(doc) for doc in docs]
        self.programs: dict[str, set] = {}

    def _prepare(self, doc: dict) -> Prepared:
        from blink_jax.processing import build_prompt, tokenize_with_image

        cfg = self.model.config
        prompt = self.bench.doc_to_text(doc)
        try:
            ids = tokenize_with_image(self.tokenizer, build_prompt(prompt, suffix=None), cfg.image_token_index,
                                      cfg.num_image_tokens)
        except ValueError as e:
            return Prepared(doc, prompt, None, f"cannot tokenize the prompt: {e}")
        error = question_error(doc, ids, max_positions=cfg.text.max_position_embeddings,
                               max_new_tokens=self.max_new_tokens)
        return Prepared(doc, prompt, None if error else ids, error)

    def _load(self, batch: Batch) -> list[tuple[Prepared, np.ndarray | None, str | None]]:
        from blink_jax.processing import preprocess_image

        size = self.model.config.vision.image_size
        rows = []
        for item in batch.items:
            try:
                image = self.bench.load_image(item.doc, self.data_dir)
                rows.append((item, preprocess_image(image, image_size=size, pad_to_square=self.cfg.pad_to_square), None))
            except Exception as e:  # noqa: BLE001 - one bad example is recorded, the run goes on
                rows.append((item, None, f"{type(e).__name__}: {e}"))
        return rows

    def _decode(self, tokens: np.ndarray) -> str:
        tokens = [int(t) for t in tokens]
        if self.eos_id is not None and self.eos_id in tokens:
            tokens = tokens[:tokens.index(self.eos_id)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _record(self, item: Prepared, prediction: str | None, error: str | None, trace: dict | None) -> dict:
        doc = item.doc
        return {"question_id": doc["question_id"], "subset": doc["subset"], "prompt": item.prompt,
                "prediction": prediction, "target": doc.get("answer", doc.get("label")), "error": error,
                "trace": trace}

    def _keys(self, question_ids: Sequence[str]):
        """One PRNG key per batch row ([batch_size, 2]), from the seed and the row's question id alone, so the
        random-region ablation gives a question the same region whatever shares its batch (a resumed run
        batches differently). Padding rows get the key of question id ""."""
        import jax
        import jax.numpy as jnp

        ids = list(question_ids) + [""] * (self.cfg.batch_size - len(question_ids))
        data = jnp.asarray([zlib.crc32(q.encode()) & 0x7FFFFFFF for q in ids], jnp.uint32)
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(self.cfg.seed), data)

    def run_mode(self, mode: ModeSpec, counter: _Counter) -> None:
        from tqdm import tqdm

        bench, cfg = self.bench, self.cfg
        path = samples_path(self.out, bench.name, mode.name)
        existing = latest_records(read_jsonl(path)) if path.exists() else {}
        done = {q for q, r in existing.items() if not (cfg.retry_errors and r.get("error") is not None)}
        todo = [p for p in self.prepared if p.doc["question_id"] not in done]
        if done:
            print(f"{bench.name} {mode.name}: {len(self.prepared) - len(todo)} of {len(self.prepared)} questions already "
                  f"answered in {self.out}, {len(todo)} to go", file=sys.stderr)
        bad = [p for p in todo if p.ids is None]
        good = [p for p in todo if p.ids is not None]
        batches = plan_batches(good, [len(p.ids) for p in good], bucket=cfg.bucket, batch_size=cfg.batch_size)
        geometry = {"grid": self.model.config.vision.grid, "image_size": self.model.config.vision.image_size,
                    "region_size": mode.blink.region_size if mode.blink else None, "pad_to_square": cfg.pad_to_square}
        programs = self.programs.setdefault(mode.name, set())
        bar = tqdm(total=len(self.prepared), initial=len(self.prepared) - len(todo), unit="q", disable=not cfg.progress,
                   desc=f"{bench.name} {mode.name}", dynamic_ncols=True)
        traced = cfg.save_traces and mode.blink is not None
        trace_file = open_append_jsonl(traces_path(self.out, bench.name, mode.name)) if traced else None
        try:
            with open_append_jsonl(path) as samples:
                if bad:
                    append_lines(samples, [self._record(p, None, p.error, None) for p in bad])
                    bar.update(len(bad))
                    counter.add(len(bad))
                for batch, rows in zip(batches, prefetch(self._load, batches, lookahead=2)):
                    records = [self._record(item, None, err, None) for item, _, err in rows if err is not None]
                    ok = [(item, px) for item, px, err in rows if err is None]
                    if ok:
                        inputs = pad_batch([item.ids for item, _ in ok], [px for _, px in ok], length=batch.length,
                                           batch_size=cfg.batch_size, pad_id=self.pad_id)
                        programs.add((cfg.batch_size, batch.length, self.max_new_tokens))
                        tokens, trace = self.model.generate(
                            **inputs, max_new_tokens=self.max_new_tokens, blink=mode.blink, tokensr=mode.tokensr,
                            rng=self._keys([item.doc["question_id"] for item, _ in ok]) if mode.blink is not None else None,
                            return_trace=True)
                        if trace is not None and trace_file is not None:
                            append_lines(trace_file, [trace_io.record(
                                trace, i, question_id=item.doc["question_id"],
                                image=bench.image_path(item.doc, self.data_dir), geometry=geometry)
                                for i, (item, _) in enumerate(ok)])
                        records += [self._record(item, self._decode(tokens[i]), None, trace_io.summary(trace, i))
                                    for i, (item, _) in enumerate(ok)]
                    append_lines(samples, records)
                    bar.update(len(records))
                    bar.set_postfix(errors=sum(r["error"] is not None for r in records) + len(bad), refresh=False)
                    counter.add(len(records))
        finally:
            bar.close()
            if trace_file is not None:
                trace_file.close()


def config_document(cfg: EvalConfig, runner: Runner, modes: Sequence[ModeSpec]) -> dict:
    doc = dataclasses.asdict(cfg)
    for key in ("model", "data_dir", "out", "tokensr", "tfds_dir"):
        if doc[key] is not None:
            doc[key] = os.fspath(Path(doc[key]).absolute())
    mcfg = runner.model.config
    doc.update(max_new_tokens=runner.max_new_tokens, conv_mode=runner.bench.conv_mode,
               model_config={"text_layers": mcfg.text.num_hidden_layers, "hidden_size": mcfg.text.hidden_size,
                             "image_size": mcfg.vision.image_size, "grid": mcfg.vision.grid},
               mode_settings={m.name: m.settings() for m in modes},
               programs={name: sorted(list(p) for p in shapes) for name, shapes in runner.programs.items()})
    return doc


def write_results(cfg: EvalConfig, runner: Runner, modes: Sequence[ModeSpec]) -> dict:
    """Scores every mode's samples file and writes results.json, results.md and the benchmark's exports."""
    out, bench = Path(cfg.out), runner.bench
    docs = {d["question_id"]: d for d in runner.docs}
    # Modes an earlier run of this directory answered stay in the results (a rerun with fewer --modes must not
    # drop them); run.json lists every mode the directory has seen, with its settings, in first-run order.
    manifest = out / "run.json"
    recorded = json.loads(manifest.read_text()).get("modes", {}) if manifest.exists() else {}
    current = {m.name: m for m in modes}
    entries, correct = [], {}
    for name in list(recorded) + [n for n in current if n not in recorded]:
        path = samples_path(out, bench.name, name)
        if not path.exists():
            continue
        mode = current.get(name) or ModeSpec(recorded[name]["kind"], ablation=recorded[name].get("ablation"))
        settings = mode.settings() if name in current else recorded[name]
        latest = latest_records(read_jsonl(path))
        exports = bench.export([s for q, s in latest.items() if q in docs], docs, out, name)
        traces = traces_path(out, bench.name, name)
        complete = traces.exists() and traces_cover(latest, traces)  # a partial file is not the mode's traces
        files = {"samples": path.name, **({"traces": traces.name} if complete else {}),
                 "exports": [p.name for p in exports]}
        entries.append({"name": name, "kind": mode.kind, "label": mode.label, "ablation": mode.ablation,
                        "settings": settings, "score": score_records(bench, docs, latest.values()), "files": files})
        correct[name] = bench.correctness(answered_results(bench, docs, latest), docs)
    document = results_document(bench, entries, config_document(cfg, runner, modes), versions(),
                                paired.against_first(correct))
    atomic_write_json(out / "results.json", document)
    atomic_write_text(out / "results.md", markdown_table(document))
    return document


def load_model(cfg: EvalConfig, processor=None):
    """(model, tokenizer) of `cfg.model`; `processor`: its `Processor`, if already loaded."""
    import jax.numpy as jnp

    from blink_jax import load_pretrained
    from blink_jax.processing import Processor

    processor = processor or Processor.from_pretrained(cfg.model)
    return load_pretrained(cfg.model, dtype=getattr(jnp, cfg.dtype)), processor.tokenizer


def run_eval(cfg: EvalConfig, *, stop_after: int | None = None, model_and_tokenizer: Any = None) -> dict:
    """Runs every mode of `cfg` (resuming what the output directory already holds) and writes the results.
    -> the results.json document. `stop_after=k` raises SimulatedKill after k questions (tests)."""
    bench = benchmarks.get(cfg.bench)
    modes = build_modes(cfg.modes, tokensr_dir=cfg.tokensr, ablation=cfg.ablation, layers=cfg.layers,
                        region_size=cfg.region_size, tau_exp=cfg.tau_exp, tau_drop=cfg.tau_drop)
    processor = None
    if model_and_tokenizer is None:  # config and tokenizer now: a wrong --model fails before the data is prepared
        from blink_jax.processing import Processor

        processor = Processor.from_pretrained(cfg.model)
    mcfg = processor.config if processor is not None else model_and_tokenizer[0].config
    check_fit(modes, num_layers=mcfg.text.num_hidden_layers, grid=mcfg.vision.grid,
              hidden_size=mcfg.text.hidden_size, tokensr_dir=cfg.tokensr)
    docs = bench.limit(benchmarks.load_docs(bench, cfg.data_dir, cfg.tfds_dir), cfg.limit)
    model, tokenizer = model_and_tokenizer or load_model(cfg, processor)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(cfg, bench, docs, model, tokenizer)
    fixed = {"bench": bench.name, "task_version": bench.version, "model": os.fspath(Path(cfg.model).absolute()),
             "data_dir": os.fspath(Path(cfg.data_dir).absolute()), "dtype": cfg.dtype,
             "max_new_tokens": runner.max_new_tokens, "pad_to_square": cfg.pad_to_square, "seed": cfg.seed,
             "limit": cfg.limit}  # results are rescored for every mode of the folder: one question set
    check_manifest(out, fixed, modes, save_traces=cfg.save_traces)
    counter = _Counter(stop_after)
    document: dict = {}
    for mode in modes:
        runner.run_mode(mode, counter)
        document = write_results(cfg, runner, modes)  # after every mode, so finished modes show while others run
    return document
