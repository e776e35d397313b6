"""Runs a benchmark in several modes: batched greedy decoding over length buckets, resumable, one JSONL line
per question.

Per mode, `samples_<bench>_<mode>.jsonl` in the output directory gets one line per question, appended as
each batch finishes: `question_id`, `prediction`, the Blink trace summary, or an `error` for a question
that could not be asked (unreadable image, ...). A rerun of the same command skips the questions already
in the file, so a killed run resumes where it stopped and ends with the same results. `run.json` holds the
settings that decide the predictions; a rerun with other settings into the same directory is refused.

The parts, one concern each: `resume` (file names, run.json, what is left to answer), `questions` (prompt ids,
images read ahead in batches, records), `inference` (the padded, jitted model call), `traces` (the traces file),
`progress` (the bar); `results` scores. `Runner.run_mode` only wires them together.

On a device mesh (`--mesh`) the parameters are sharded and every batch is split over the mesh's batch axes.
With several processes (`--coordinator ...`) every host answers its share of each batch and appends it to its
own part of the samples file; process 0 merges the parts when a mode is done and alone writes run.json and the
results. A killed multi-process run resumes like a single one, from the files and their parts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from blink_jax import distributed, load_pretrained, sharding
from blink_jax.blink import BlinkConfig
from blink_jax.config import ConfigError
from blink_jax.families import family_of, model_type
from blink_jax.loading import inference_mesh
from blink_jax.model_inputs import inputs_for
from blink_jax.processing import Processor
from eval import benchmarks
from eval.benchmarks.base import Benchmark
from eval.harness import paired
from eval.harness import traces as trace_io
from eval.harness.inference import Answerer
from eval.harness.io import append_lines, atomic_write_json, atomic_write_text, open_append_jsonl, read_jsonl
from eval.harness.modes import ModeError, ModeSpec, build_modes, check_fit
from eval.harness.progress import ModeProgress
from eval.harness.questions import ImageLoader, LoadedBatch, loaded_batches, prepare, record
from eval.harness.results import (answered_results, cost_summary, latest_records, markdown_table,
                                  results_document, score_records, versions)
from eval.harness.resume import (answered, check_manifest, merge_parts, part_path, samples_path, traces_cover,
                                 traces_path)

DTYPES = ("bfloat16", "float32", "float16")


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
    crop_layer: int | None = None  # crop mode (BLINK.md §9); None: CropConfig.like(Blink's config)
    crop_context: float | None = None
    crop_input: str | None = None
    dtype: str = "bfloat16"
    tfds_dir: str | None = None  # prepared datasets; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    save_traces: bool = False
    retry_errors: bool = False
    seed: int = 0  # the random-region ablation's key
    pad_to_square: bool = True
    progress: bool = True
    mesh: str | None = None  # `--mesh`; None: every device on the data axis when the model fits one device
    max_pixels: int | None = None  # Qwen2.5-VL: pixel budget of the grid buckets; None: preprocessor_config.json's

    def __post_init__(self):
        if self.batch_size < 1 or self.bucket < 1:
            raise ValueError(f"--batch-size {self.batch_size} and --bucket {self.bucket} must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is unknown; use one of {DTYPES}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} must be positive")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} must be positive")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max-pixels {self.max_pixels} must be positive")


class Runner:
    """The model, tokenizer and questions of one `run_eval`; `run_mode` answers every question of a mode that the
    output directory does not hold yet."""

    def __init__(self, cfg: EvalConfig, bench: Benchmark, docs: list[dict], model, tokenizer, family=None):
        """`family`: Qwen2.5-VL's `blink_jax.model_inputs.QwenInputs` (its grid buckets and chat template); None: LLaVA."""
        self.cfg, self.bench, self.docs, self.model, self.family = cfg, bench, docs, model, family
        self.out = Path(cfg.out)
        self.data_dir = Path(cfg.data_dir)
        self.max_new_tokens = cfg.max_new_tokens or bench.max_new_tokens
        self.prepared = [prepare(bench, doc, tokenizer, model.config, max_new_tokens=self.max_new_tokens,
                                 two_images="crop" in cfg.modes, family=family, data_dir=self.data_dir)
                         for doc in docs]
        image_size = None if family is not None else model.config.vision.image_size
        self.images = ImageLoader(bench, self.data_dir, image_size, cfg.pad_to_square, family=family)
        self.hosts, self.host = jax.process_count(), jax.process_index()
        self.answerer = Answerer(model, tokenizer, batch_size=cfg.batch_size // self.hosts,
                                 max_new_tokens=self.max_new_tokens, seed=cfg.seed, pad_to_square=cfg.pad_to_square)

    @property
    def programs(self) -> dict[str, set]:
        """mode -> the (batch size, bucket, new tokens) shapes its generate ran with."""
        return self.answerer.programs

    def run_mode(self, mode: ModeSpec, on_written: Callable[[int], None] | None = None) -> None:
        """Answers the mode's remaining questions, appending their records to its samples file batch by batch;
        `on_written(n)` is called after each append of n records (tests stop a run there)."""
        bench, cfg = self.bench, self.cfg
        path = samples_path(self.out, bench.name, mode.name)
        done = answered(path, retry_errors=cfg.retry_errors)
        todo = [q for q in self.prepared if q.question_id not in done]
        distributed.barrier(f"eval {mode.name}: questions left counted")  # before any host appends to the files
        main = distributed.is_main()
        own = (lambda f: f) if self.hosts == 1 else (lambda f: part_path(f, self.host))
        if done and main:
            print(f"{bench.name} {mode.name}: {len(self.prepared) - len(todo)} of {len(self.prepared)} questions already "
                  f"answered in {self.out}, {len(todo)} to go", file=sys.stderr)
        traced = cfg.save_traces and (mode.blink is not None or mode.crop is not None)
        with open_append_jsonl(own(path)) as samples, \
                trace_io.TraceFile(own(traces_path(self.out, bench.name, mode.name)) if traced else None,
                                   geometry=self._geometry(mode)) as traces, \
                ModeProgress(total=len(self.prepared), done=len(self.prepared) - len(todo),
                             desc=f"{bench.name} {mode.name}", enabled=cfg.progress and main) as progress:

            def write(records: list[dict]) -> None:
                append_lines(samples, records)
                progress.update(records)
                if on_written is not None:
                    on_written(len(records))

            unaskable = [q for q in todo if q.ids is None]
            if unaskable and main:
                write([record(q, None, q.error, None) for q in unaskable])
            images = dataclasses.replace(self.images, keep_originals=mode.crop is not None)
            for batch in loaded_batches([q for q in todo if q.ids is not None], images, bucket=cfg.bucket,
                                        batch_size=cfg.batch_size, hosts=self.hosts, host=self.host):
                write(self._answer(mode, batch, traces))
        distributed.barrier(f"eval {mode.name}: every host's answers written")
        if main:
            merge_parts(path)
            merge_parts(traces_path(self.out, bench.name, mode.name))

    def _answer(self, mode: ModeSpec, batch: LoadedBatch, traces: trace_io.TraceFile) -> list[dict]:
        """The records of one batch: its unreadable images' errors, then its answers (their traces written)."""
        records = [record(q, None, error, None) for q, error in batch.failed]
        if batch.ready or self.hosts > 1:  # several hosts: each runs every batch's program, with or without rows
            questions = [q for q, _ in batch.ready]
            ids = [q.ids for q in questions] or [batch.filler]  # the filler's answer is thrown away
            if self.family is None:
                size = self.model.config.vision.image_size
                pixels = [px for _, px in batch.ready] or [np.zeros((3, size, size), np.float32)]
            else:  # (one process: every batch has rows)
                pixels = [px for _, px in batch.ready]
                cell = self.family.cell
                traces.geometry = {**traces.geometry, "grid": list(batch.grid),
                                   "image_size": [batch.grid[0] * cell, batch.grid[1] * cell]}
            answers, trace = self.answerer(mode, batch.length, ids, pixels, [q.question_id for q in questions],
                                           originals=batch.originals, both_ids=[q.both_ids for q in questions],
                                           grid=batch.grid)
            traces.write(trace, [(q.question_id, self.bench.image_path(q.doc, self.data_dir)) for q in questions])
            records += [record(q, answer, None, trace_io.summary(trace, i), cost)
                        for i, (q, answer, cost) in enumerate(zip(questions, answers, self.answerer.costs))]
        return records

    def _geometry(self, mode: ModeSpec) -> dict:
        vision = self.model.config.vision
        if self.family is not None:  # grid and image size per batch (`_answer`), in (height, width) order
            return {"grid": None, "image_size": None, "cell": self.family.cell,
                    "region_size": mode.blink.region_size if mode.blink else None, "pad_to_square": False}
        return {"grid": vision.grid, "image_size": vision.image_size,
                "region_size": (mode.blink or mode.crop).region_size if (mode.blink or mode.crop) else None,
                "pad_to_square": self.cfg.pad_to_square}


def config_document(cfg: EvalConfig, runner: Runner, modes: Sequence[ModeSpec]) -> dict:
    doc = dataclasses.asdict(cfg)
    for key in ("model", "data_dir", "out", "tokensr", "tfds_dir"):
        if doc[key] is not None:
            doc[key] = os.fspath(Path(doc[key]).absolute())
    mcfg = runner.model.config
    if runner.family is None:
        images = {"image_size": mcfg.vision.image_size, "grid": mcfg.vision.grid}
    else:
        images = {"family": runner.family.name, "grid_shapes": [list(g) for g in runner.family.grids],
                  "max_pixels": runner.family.max_pixels}
    doc.update(max_new_tokens=runner.max_new_tokens,
               conv_mode=runner.bench.conv_mode if runner.family is None else "chat_template",
               model_config={"text_layers": mcfg.text.num_hidden_layers, "hidden_size": mcfg.text.hidden_size,
                             **images},
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
                        "settings": settings, "score": score_records(bench, docs, latest.values()),
                        "cost": cost_summary(r for q, r in latest.items() if q in docs), "files": files})
        correct[name] = bench.correctness(answered_results(bench, docs, latest), docs)
    document = results_document(bench, entries, config_document(cfg, runner, modes), versions(),
                                paired.against_first(correct))
    atomic_write_json(out / "results.json", document)
    atomic_write_text(out / "results.md", markdown_table(document))
    return document


def load_model(cfg: EvalConfig, processor=None, mesh: jax.sharding.Mesh | None = None):
    """(model, tokenizer) of `cfg.model`; `processor`: its `Processor`, if already loaded; `mesh`: where the
    parameters go (None: one device)."""
    processor = processor or Processor.from_pretrained(cfg.model)
    return load_pretrained(cfg.model, dtype=getattr(jnp, cfg.dtype), mesh=mesh), processor.tokenizer


def eval_mesh(cfg: EvalConfig) -> jax.sharding.Mesh | None:
    """The mesh of `cfg.mesh` (see `blink_jax.sharding.inference_mesh`), checked against the model and the batch
    size before anything is loaded; None when it is this process's one device (today's single-device load)."""
    mesh = inference_mesh(cfg.model, cfg.mesh, getattr(jnp, cfg.dtype))
    sharding.check_eval_batch(cfg.batch_size, mesh)
    return None if mesh.devices.size == 1 else mesh


def model_family(cfg: EvalConfig, modes: Sequence[ModeSpec]):
    """None for a LLaVA model; for a Qwen2.5-VL directory its `QwenInputs`, whose grid buckets (BLINK.md §10) have
    sides that are multiples of every Blink mode's region size (else --region-size or BlinkConfig's)."""
    if model_type(cfg.model) != "qwen2_5_vl":
        if cfg.max_pixels is not None:
            raise ModeError("--max-pixels is for Qwen2.5-VL models; LLaVA-1.5 has one image size: leave it out")
        return None
    if any(m.crop is not None for m in modes):
        raise ModeError("mode 'crop' is not available for Qwen2.5-VL: its second pass asks with the image and a crop "
                        "of another grid shape in one prompt, which the grid-bucketed programs do not run yet; leave "
                        "it out of --modes")
    if cfg.mesh is not None or jax.process_count() > 1:
        raise ModeError("Qwen2.5-VL evaluates on one device in one process for now: leave out --mesh and "
                        "--num-processes")
    sizes = {m.blink.region_size for m in modes if m.blink is not None}
    multiple = math.lcm(*sizes) if sizes else (cfg.region_size or BlinkConfig().region_size)
    return inputs_for(cfg.model, region_size=multiple, max_pixels=cfg.max_pixels or 0)


def blink_defaults(model_dir: str) -> BlinkConfig | None:
    """The model's per-size Blink defaults (`BlinkConfig.default_for`, e.g. Qwen2.5-VL-7B's layers 10-16), read
    from its config.json; None when that cannot be read (the model's loading then says why)."""
    try:
        return BlinkConfig.default_for(family_of(model_dir).config(model_dir))
    except (ConfigError, OSError, ValueError):
        return None


def run_eval(cfg: EvalConfig, *, model_and_tokenizer: Any = None,
             on_written: Callable[[int], None] | None = None) -> dict | None:
    """Runs every mode of `cfg` (resuming what the output directory already holds) and writes the results.
    -> the results.json document (None on the processes other than 0 of a multi-process run).
    `on_written(n)`: called after every n records appended to a samples file."""
    bench = benchmarks.get(cfg.bench)
    modes = build_modes(cfg.modes, tokensr_dir=cfg.tokensr, ablation=cfg.ablation, layers=cfg.layers,
                        region_size=cfg.region_size, tau_exp=cfg.tau_exp, tau_drop=cfg.tau_drop,
                        crop_layer=cfg.crop_layer, crop_context=cfg.crop_context, crop_input=cfg.crop_input,
                        default=blink_defaults(cfg.model))
    if jax.process_count() > 1 and any(m.crop is not None for m in modes):
        raise ModeError("mode 'crop' runs in one process (its two passes are not split across hosts yet): run it "
                        "without --num-processes, or leave it out of --modes")
    family = model_family(cfg, modes)
    processor = None
    if model_and_tokenizer is None and family is None:  # config and tokenizer now: a wrong --model fails early
        processor = Processor.from_pretrained(cfg.model)
    mcfg = family.config if family is not None else (
        processor.config if processor is not None else model_and_tokenizer[0].config)
    for grid in (family.grids if family is not None else (mcfg.vision.grid,)):
        check_fit(modes, num_layers=mcfg.text.num_hidden_layers, grid=grid, hidden_size=mcfg.text.hidden_size,
                  tokensr_dir=cfg.tokensr)
    mesh = eval_mesh(cfg) if model_and_tokenizer is None and family is None else None
    main = distributed.is_main()
    if not main:  # process 0 prepares the data set (once, into the shared tfds folder); the others then read it
        distributed.barrier("eval: data prepared")
    docs = bench.limit(benchmarks.load_docs(bench, cfg.data_dir, cfg.tfds_dir), cfg.limit)
    if main:
        distributed.barrier("eval: data prepared")
    if model_and_tokenizer is None and family is not None:
        model_and_tokenizer = load_pretrained(cfg.model, dtype=getattr(jnp, cfg.dtype)), family.processor.tokenizer
    model, tokenizer = model_and_tokenizer or load_model(cfg, processor, mesh)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(cfg, bench, docs, model, tokenizer, family=family)
    fixed = {"bench": bench.name, "task_version": bench.version, "model": os.fspath(Path(cfg.model).absolute()),
             "data_dir": os.fspath(Path(cfg.data_dir).absolute()), "dtype": cfg.dtype,
             "max_new_tokens": runner.max_new_tokens, "pad_to_square": cfg.pad_to_square, "seed": cfg.seed,
             "limit": cfg.limit}  # results are rescored for every mode of the folder: one question set
    if family is not None:  # the images' grids decide every answer
        fixed["grid_shapes"] = [list(g) for g in family.grids]
    check_manifest(out, fixed, modes, save_traces=cfg.save_traces, write=main)
    document: dict | None = None
    for mode in modes:
        runner.run_mode(mode, on_written)
        if main:  # after every mode, so finished modes show while others run
            document = write_results(cfg, runner, modes)
    return document
