"""What every benchmark is made of (lmms-eval's task shape): data + prompt + pure `process_results` + aggregation.

Data: a tensorflow-datasets builder reads the benchmark's official release layout from a manual directory
(`--data-dir`) and writes an array_record dataset (no TensorFlow needed). Records keep the image as a path
relative to the data directory (or the encoded bytes, where the release embeds them, e.g. MMBench's TSV):
images are opened at run time, so a missing or corrupt image fails one example, not the whole build.

The prepared dataset goes to `<tfds_dir>/<bench>-<fingerprint>/`, the fingerprint hashing the data
directory's absolute path and its annotation files' sizes and times: another data directory, or an edited
annotation file, prepares afresh instead of reading a stale copy.

A "doc" is one question as a plain dict of the builder's features (bytes decoded to str, except `*_bytes`).
Every builder has `question_id` (str, unique in the benchmark), `subset` (split/category/subtask, "" when the
benchmark has none), `index` (order in the release files), `image_file` and `image_bytes`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from blink_jax.processing import SHORT_ANSWER_SUFFIX, ImageError, load_image, load_strictly, to_rgb

SPLIT = "test"
OPTION_LETTERS = ("A", "B", "C", "D", "E")
# "Answer with the option's letter from the given choices directly." (LLaVA-1.5 `--single-pred-prompt`).
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."


class DataError(ValueError):
    """A benchmark file or folder that is missing or malformed: names the file and the fix."""


def default_tfds_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))


def common_features() -> dict:
    import tensorflow_datasets as tfds

    return {
        "question_id": tfds.features.Text(),
        "subset": tfds.features.Text(),
        "index": np.int64,
        "image_file": tfds.features.Text(),
        "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
    }


def make_builder_base():
    """The tfds base class, created on first use so that importing a benchmark does not import tfds."""
    import tensorflow_datasets as tfds

    class OfficialLayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Reads `BENCHMARK.read_official(manual_dir)` into one `test` split, in release order."""

        VERSION = tfds.core.Version("1.0.0")
        BENCHMARK: ClassVar["Benchmark"]
        # tfds looks for a checksums file next to the builder's code through importlib_resources, which a
        # TensorFlow-free install lacks; a manual-download builder has no checksums anyway.
        code_path = None

        @property
        def MANUAL_DOWNLOAD_INSTRUCTIONS(self):  # noqa: N802 (tfds' name)
            return self.BENCHMARK.layout

        def _info(self):
            features = {**common_features(), **self.BENCHMARK.extra_features()}
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                         description=f"{self.BENCHMARK.title}, read from its release layout",
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples(Path(dl_manager.manual_dir))}

        def _generate_examples(self, manual_dir: Path):
            defaults = {"subset": "", "image_file": "", "image_bytes": b""}
            for i, record in enumerate(self.BENCHMARK.read_official(manual_dir)):
                yield i, {**defaults, **record, "index": i}

    return OfficialLayoutBuilder


_BUILDERS: dict[str, type] = {}


def builder_class(bench: "Benchmark") -> type:
    """The tfds builder class of `bench` (named `blink_eval_<name>`), created once per process."""
    if bench.name not in _BUILDERS:
        base = make_builder_base()
        cls_name = "BlinkEval" + "".join(part.capitalize() for part in bench.name.split("_"))
        _BUILDERS[bench.name] = type(cls_name, (base,), {"BENCHMARK": bench, "__module__": type(bench).__module__},
                                     skip_registration=True)
    return _BUILDERS[bench.name]


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_record(record: Mapping[str, Any]) -> dict:
    """A tfds record -> a doc: text as str; `*_bytes` fields stay bytes."""
    return {k: (bytes(v) if k.endswith("_bytes") else _decode(v)) for k, v in record.items()}


class Benchmark(abc.ABC):
    """One benchmark. Subclasses set the class attributes and implement the data/prompt/scoring hooks."""

    name: ClassVar[str]
    title: ClassVar[str]
    version: ClassVar[str] = "1.0"  # the task's prompt + scoring; bump when either changes
    layout: ClassVar[str] = ""  # the release layout the data directory must have (shown in errors)
    max_new_tokens: ClassVar[int] = 16
    paper_rows: ClassVar[tuple[str, ...]] = ()  # BLINK.md §7 rows this benchmark fills
    headline_note: ClassVar[str] = ""  # what the headline rows measure, printed under them
    conv_mode: ClassVar[str] = "vicuna_v1"

    # ------------------------------------------------------------------------------------------- data

    @abc.abstractmethod
    def source_files(self, data_dir: Path) -> list[Path]:
        """The annotation files the builder reads (not the images): checked up front and fingerprinted."""

    @abc.abstractmethod
    def read_official(self, data_dir: Path) -> Iterator[dict]:
        """Records for the builder, in release order (`index` is added)."""

    @abc.abstractmethod
    def extra_features(self) -> dict:
        """tfds features beyond `common_features()`."""

    def limit(self, docs: Sequence[dict], n: int | None) -> list[dict]:
        """The first `n` questions of every subset (all when `n` is None)."""
        if n is None:
            return list(docs)
        taken: dict[str, int] = {}
        out = []
        for doc in docs:
            if taken.get(doc["subset"], 0) < n:
                taken[doc["subset"]] = taken.get(doc["subset"], 0) + 1
                out.append(doc)
        return out

    def load_image(self, doc: Mapping[str, Any], data_dir: str | os.PathLike) -> Image.Image:
        """The doc's image as RGB; `ImageError` names the file (or the question) when it cannot be read."""
        if doc.get("image_bytes"):
            try:
                with Image.open(io.BytesIO(doc["image_bytes"])) as img:
                    load_strictly(img)
                    return to_rgb(img)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise ImageError(f"the embedded image of question {doc['question_id']!r} cannot be decoded "
                                 f"(PIL: {e}): check that row of the release file") from None
        if not doc.get("image_file"):
            raise ImageError(f"question {doc['question_id']!r} has no image")
        return load_image(Path(data_dir) / doc["image_file"])

    def image_path(self, doc: Mapping[str, Any], data_dir: str | os.PathLike) -> str | None:
        """Absolute path of the doc's image file, None when embedded."""
        return os.fspath(Path(data_dir).absolute() / doc["image_file"]) if doc.get("image_file") else None

    # ----------------------------------------------------------------------------------------- prompt

    def doc_to_text(self, doc: Mapping[str, Any]) -> str:
        """The user turn after `<image>\\n`, suffix included (LLaVA-1.5's eval prompt for this benchmark)."""
        return f"{doc['question']}\n{SHORT_ANSWER_SUFFIX}"

    # ---------------------------------------------------------------------------------------- scoring

    @abc.abstractmethod
    def process_results(self, doc: Mapping[str, Any], prediction: str) -> dict:
        """Pure: one doc and the model's answer -> what the aggregation needs of this question."""

    def error_result(self, doc: Mapping[str, Any]) -> dict:
        """What `process_results` gives for a question that could not be answered (unreadable image, ...): a
        wrong answer, as the official scripts count a question without a usable answer (BLINK.md §8)."""
        return {**self.process_results(doc, ""), "correct": False, "error": True}

    @abc.abstractmethod
    def aggregate(self, results: Sequence[dict]) -> dict:
        """Pure: per-question results (answered and errored) -> metrics (a JSON-able dict)."""

    def composition(self, docs: Sequence[Mapping[str, Any]]) -> list[str]:
        """How the question set `docs` falls short of the benchmark's official release (missing splits or
        subtasks, fewer questions): one sentence per shortfall, [] when it is the whole benchmark. A run on a
        question set with shortfalls is reported as partial."""
        return []

    def data_set(self, docs: Sequence[Mapping[str, Any]]) -> str:
        """The name of the data set `docs` come from: the benchmark's, unless the builder recognised another set
        in the benchmark's layout (the demo's shapes set in POPE's)."""
        return self.title

    def correctness(self, results: Mapping[str, dict], docs: Mapping[str, dict] | None = None) -> dict[str, bool] | None:
        """question_id -> `process_results(...)` of the answered questions => scoring unit -> right or wrong, for
        paired comparisons between modes (`eval.harness.paired`). The default reads each result's "correct";
        None when the benchmark has no per-answer correctness (MM-Vet's judge scores elsewhere). `docs` (all
        questions by id) lets a unit of several questions leave out the units not completely answered."""
        if not all("correct" in r for r in results.values()):
            return None
        return {q: bool(r["correct"]) for q, r in results.items()}

    def headline(self, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        """The BLINK.md §7 rows this benchmark fills (paper row -> value on the paper's scale)."""
        return {}

    def export(self, samples: Sequence[dict], docs: Mapping[str, dict], out_dir: Path, mode: str) -> list[Path]:
        """Files in the benchmark's official submission format (e.g. MM-Vet's), if it has one."""
        return []

    # ---------------------------------------------------------------------------------------- helpers

    def require(self, data_dir: Path, *candidates: str) -> Path:
        """The first of `candidates` (paths relative to `data_dir`) that exists, else a DataError."""
        for rel in candidates:
            if (data_dir / rel).exists():
                return data_dir / rel
        raise DataError(f"{self.title}: none of {', '.join(repr(c) for c in candidates)} is in the data directory "
                        f"{str(data_dir)!r}. Expected layout:\n{self.layout}")


def fingerprint(bench: Benchmark, data_dir: Path) -> str:
    data_dir = data_dir.absolute()
    files = sorted(bench.source_files(data_dir))
    stats = [(os.fspath(p.relative_to(data_dir)) if p.is_relative_to(data_dir) else os.fspath(p),
              p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([bench.name, bench.version, os.fspath(data_dir), stats])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load_docs(bench: Benchmark, data_dir: str | os.PathLike, tfds_dir: str | os.PathLike | None = None) -> list[dict]:
    """Prepares (once) and reads the benchmark's tfds dataset. -> docs in release order."""
    import tensorflow_datasets as tfds

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{bench.title}: data directory {str(data_dir)!r} does not exist. Expected layout:\n"
                        f"{bench.layout}")
    root = Path(tfds_dir) if tfds_dir is not None else default_tfds_dir()
    prepared = root / f"{bench.name}-{fingerprint(bench, data_dir)}"
    builder = builder_class(bench)(data_dir=os.fspath(prepared), file_format="array_record")
    if not (Path(builder.data_dir) / "dataset_info.json").exists():  # (is_prepared() logs a warning when not)
        print(f"{bench.title}: reading the release files of {data_dir} into {prepared} (once: later runs reuse it)",
              file=sys.stderr)
    # stdout muted: tfds prints "Downloading and preparing ... Unknown size" though nothing is downloaded
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(data_dir)))
    source = builder.as_data_source(split=SPLIT)
    docs = [decode_record(source[i]) for i in range(len(source))]
    docs.sort(key=lambda d: d["index"])
    ids = [d["question_id"] for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(q for q in ids if ids.count(q) > 1)
        raise DataError(f"{bench.title}: question id {dup!r} occurs twice in {str(data_dir)!r}: the release files "
                        f"are duplicated or mixed; keep one copy")
    return docs


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}): re-download it") from None


def read_jsonl_strict(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every non-empty line; a line that is not JSON is a DataError naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number} is not a JSON line ({e}): re-download the file") from None


def count_shortfall(what: str, have: int, official: int, release: str = "the official release") -> list[str]:
    """[] when `have` is the release's count, else the sentence saying so."""
    return [] if have == official else [f"{what}: {have} of {release}'s {official}"]


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def options_text(options: Sequence[str]) -> str:
    """"A. first\\nB. second" (LLaVA-1.5's multiple-choice layout)."""
    return "\n".join(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options))
