"""MMBench and MMBench-CN (dev): the release TSV with base64 images; option letters; circular evaluation.

Release layout:

    DATA/mmbench_dev_20230712.tsv       (MMBench;    any DATA/mmbench_dev_<date>.tsv or mmbench_dev_en_<date>.tsv)
    DATA/mmbench_dev_cn_20231003.tsv    (MMBench-CN; any DATA/mmbench_dev_cn_<date>.tsv)

Columns: index, question, hint, A, B, C, D, answer, category, l2-category, image (base64; a row index
where the release points to another row's image), ...

Prompt (LLaVA's `model_vqa_mmbench.py --single-pred-prompt`): "{hint}\\n" when there is a hint, the
question, "\\nA. ...\\nB. ..." up to the first empty option, then "\\nAnswer with the option's letter from
the given choices directly." (MMBench-CN: "\\n请直接回答选项字母。").

Scoring (MMBench's rules, without the GPT fallback): the option letter is read from the answer as
VLMEvalKit's `can_infer` does (a lone option letter among the words, else a unique option text); circular
accuracy counts a question right only if every copy of it (rows whose index agree modulo 1e6) is answered and
right: an errored or unanswered rotation makes the question wrong.

Submission: `mmbench_<mode>.xlsx` (`mmbench_cn_<mode>.xlsx`), the file LLaVA's
`scripts/convert_mmbench_for_submission.py` writes for the evaluation server: the release TSV's columns without
hint, category, source, image, comment and l2-category, a `prediction` column (the model's answer text, empty
for an errored question) inserted as the 7th, cells read as pandas' `read_table` reads them.

Composition: every question of the release file with all its rotations; `mmbench_dev_20230712.tsv` (the file
LLaVA-1.5 evaluates) must hold MMBench dev's 1164 questions (circular groups; the open-compass/MMBench README's
table and its issue #31). The later files (e.g. `mmbench_dev_cn_20231003.tsv`, about 4330 rows) hold a count
we could not establish, so only their own completeness is checked.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from eval.benchmarks.base import (LETTER_SUFFIX, OPTION_LETTERS, Benchmark, DataError, count_shortfall, mean,
                                  options_text)

CN_SUFFIX = "请直接回答选项字母。"
CIRCULAR_MOD = 1_000_000
_PUNCT = ".()[],:;!*#{}"
OFFICIAL_QUESTIONS = {"mmbench_dev_20230712.tsv": 1164}  # circular groups per release file (module docstring)
# convert_mmbench_for_submission.py drops these columns and inserts `prediction` at this position
SUBMISSION_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_COLUMN = 6
# pandas.read_table's default missing-value strings: such cells are empty in the script's xlsx
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def is_none(value) -> bool:
    """model_vqa_mmbench.py's `is_none` for a TSV cell."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def extract_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer names, or None. A lone option letter among the answer's words (after
    turning `.()[],:;!*#{}` into spaces) wins; otherwise the one option whose text the answer contains."""
    text = prediction
    for ch in _PUNCT:
        text = text.replace(ch, " ")
    words = text.split()
    hits = [letter for letter in options if letter in words]
    if len(hits) == 1:
        return hits[0]
    low = prediction.lower()
    hits = [letter for letter, option in options.items() if str(option).lower() in low]
    return hits[0] if len(hits) == 1 else None


def read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise DataError(f"{path} has no rows")
    missing = {"index", "question", "A", "B", "image"} - set(rows[0])
    if missing:
        raise DataError(f"{path} lacks the columns {sorted(missing)}: it is not an MMBench release TSV")
    return rows


def decode_image(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return b""  # recorded as an unreadable image when the question is asked


class MmBench(Benchmark):
    name = "mmbench"
    title = "MMBench"
    version = "1.1"  # 1.1: errored / unanswered rotations make a question wrong; the TSV row kept for submission
    max_new_tokens = 16
    paper_rows = ("MMBench",)
    headline_note = "circular accuracy x 100 (a question counts when every rotation of its options is right)"
    lang = "en"
    patterns = ("mmbench_dev_[0-9]*.tsv", "mmbench_dev_en_*.tsv")
    layout = "  DATA/mmbench_dev_20230712.tsv  (the release TSV, base64 images inside)"

    def source_files(self, data_dir: Path) -> list[Path]:
        found = sorted({p for pattern in self.patterns for p in data_dir.glob(pattern)})
        if not found:
            raise DataError(f"{self.title}: no {' or '.join(self.patterns)} in {str(data_dir)!r}. Expected "
                            f"layout:\n{self.layout}")
        if len(found) > 1:
            raise DataError(f"{self.title}: several release files in {str(data_dir)!r} "
                            f"({', '.join(p.name for p in found)}): keep one per data directory")
        return found

    def extra_features(self) -> dict:
        import tensorflow_datasets as tfds

        text = tfds.features.Text()
        return {"question": text, "hint": text, "options": tfds.features.Sequence(text), "answer": text,
                "category": text, "l2_category": text, "circular_group": tfds.features.Text(),
                "group_rows": np.int64, "tsv_row": text, "release_file": text, "release_questions": np.int64}

    def read_official(self, data_dir: Path) -> Iterator[dict]:
        path = self.source_files(data_dir)[0]
        rows = read_tsv(path)
        by_index = {row["index"]: row for row in rows}
        group_rows: dict[int, int] = {}
        for row in rows:
            group = int(float(row["index"])) % CIRCULAR_MOD
            group_rows[group] = group_rows.get(group, 0) + 1
        for row in rows:
            image = row["image"]
            if len(image) < 64 and image.strip().isdigit() and image.strip() in by_index:
                image = by_index[image.strip()]["image"]
            options = []
            for letter in OPTION_LETTERS:
                if is_none(row.get(letter)):
                    break
                options.append(row[letter])
            index = int(float(row["index"]))
            yield {"question_id": str(index), "image_bytes": decode_image(image),
                   "question": row["question"], "hint": "" if is_none(row.get("hint")) else row["hint"],
                   "options": options, "answer": (row.get("answer") or "").strip(),
                   "category": row.get("category", ""), "l2_category": row.get("l2-category", ""),
                   "circular_group": str(index % CIRCULAR_MOD), "group_rows": group_rows[index % CIRCULAR_MOD],
                   # the release's cells but the image, in column order: the submission file repeats them
                   "tsv_row": json.dumps([[k, v] for k, v in row.items() if k != "image"], ensure_ascii=False),
                   "release_file": path.name, "release_questions": len(group_rows)}

    def limit(self, docs: Sequence[dict], n: int | None) -> list[dict]:
        """The first `n` questions, each with all its rotations (circular accuracy needs them)."""
        if n is None:
            return list(docs)
        groups = list(dict.fromkeys(d["circular_group"] for d in docs))[:n]
        kept = set(groups)
        return [d for d in docs if d["circular_group"] in kept]

    def doc_to_text(self, doc: Mapping) -> str:
        question = doc["question"]
        if doc["hint"]:
            question = f"{doc['hint']}\n{question}"
        suffix = CN_SUFFIX if self.lang == "cn" else LETTER_SUFFIX
        return f"{question}\n{options_text(doc['options'])}\n{suffix}"

    def process_results(self, doc: Mapping, prediction: str) -> dict:
        options = dict(zip(OPTION_LETTERS, doc["options"]))
        pred = extract_option(prediction, options)
        return {"group": doc["circular_group"], "group_rows": int(doc["group_rows"]), "category": doc["category"],
                "pred": pred, "answer": doc["answer"], "correct": pred is not None and pred == doc["answer"]}

    def aggregate(self, results: Sequence[dict]) -> dict:
        scored = [r for r in results if r["answer"]]
        groups: dict[str, list[bool]] = {}
        size: dict[str, int] = {}
        category: dict[str, str] = {}
        for r in scored:
            groups.setdefault(r["group"], []).append(r["correct"])
            size[r["group"]], category[r["group"]] = r["group_rows"], r["category"]
        # right only when every rotation of the release is here (answered or errored) and right
        right = {g: len(c) == size[g] and all(c) for g, c in groups.items()}
        categories: dict[str, list[bool]] = {}
        for g, ok in right.items():
            categories.setdefault(category[g], []).append(ok)
        return {
            "circular_accuracy": mean(list(right.values())), "accuracy": mean([r["correct"] for r in scored]),
            "questions": len(groups), "rows": len(scored),
            "unparsed": sum(r["pred"] is None and not r.get("error") for r in results),
            "unanswerable_rows": len(results) - len(scored),
            "incomplete_questions": sum(len(c) != size[g] for g, c in groups.items()),
            "categories": {c: mean(v) for c, v in sorted(categories.items())},
        }

    def correctness(self, results: Mapping[str, dict], docs: Mapping[str, dict] | None = None) -> dict[str, bool]:
        """Circular evaluation's unit: a question counts as right only when every rotation of it is. With `docs`,
        a question some rotation of which was not answered (an error) is left out: it has no verdict."""
        groups: dict[str, list[bool]] = {}
        for r in results.values():
            if r["answer"]:
                groups.setdefault(r["group"], []).append(r["correct"])
        if docs is not None:
            size: dict[str, int] = {}
            for d in docs.values():
                if d["answer"]:
                    size[d["circular_group"]] = size.get(d["circular_group"], 0) + 1
            groups = {g: c for g, c in groups.items() if len(c) == size.get(g)}
        return {g: all(c) for g, c in groups.items()}

    def composition(self, docs: Sequence[Mapping]) -> list[str]:
        if not docs:
            return ["no questions"]
        rows: dict[str, int] = {}
        for d in docs:
            rows[d["circular_group"]] = rows.get(d["circular_group"], 0) + 1
        release, total = docs[0]["release_file"], int(docs[0]["release_questions"])
        out = count_shortfall("questions", len(rows), total, release)
        if release in OFFICIAL_QUESTIONS:
            out += count_shortfall(f"questions in {release}", total, OFFICIAL_QUESTIONS[release])
        cut = sum(1 for d in docs if rows[d["circular_group"]] != int(d["group_rows"]))
        return out + ([f"{cut} rows of questions without all their rotations"] if cut else [])

    def headline(self, metrics: Mapping) -> dict:
        return {self.paper_rows[0]: 100 * metrics["circular_accuracy"] if metrics.get("rows") else None}

    def export(self, samples: Sequence[dict], docs: Mapping[str, dict], out_dir: Path, mode: str) -> list[Path]:
        path = Path(out_dir) / f"{self.name}_{mode}.xlsx"
        write_xlsx(path, *submission_table(list(docs.values()), {s["question_id"]: s for s in samples}))
        return [path]


def _cell(column: str, value: str):
    """A TSV cell as pandas.read_table gives it to the script: missing-value strings empty, `index` an int."""
    if value in PANDAS_NA:
        return None
    if column == "index":
        return int(float(value))
    return value


def submission_table(docs: Sequence[Mapping], samples: Mapping[str, Mapping]) -> tuple[list[str], list[list]]:
    """(header, rows) of convert_mmbench_for_submission.py's sheet for `docs` in release order; `samples`:
    question id -> its samples line (an errored or absent question gets an empty prediction)."""
    header: list[str] = []
    rows = []
    for doc in docs:
        cells = [(k, v) for k, v in json.loads(doc["tsv_row"]) if k not in SUBMISSION_DROPPED]
        keys = [k for k, _ in cells]
        header = header or keys[:PREDICTION_COLUMN] + ["prediction"] + keys[PREDICTION_COLUMN:]
        sample = samples.get(doc["question_id"]) or {}
        prediction = sample.get("prediction") if sample.get("error") is None else None
        values = [_cell(k, v) for k, v in cells]
        rows.append(values[:PREDICTION_COLUMN] + [prediction] + values[PREDICTION_COLUMN:])
    return header, rows


def write_xlsx(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """One sheet, a header row then `rows` (None: an empty cell), written atomically."""
    import openpyxl  # only where a submission file is written

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Sheet1"  # pandas' default sheet name
    sheet.append(list(header))
    for row in rows:
        sheet.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        book.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class MmBenchCn(MmBench):
    name = "mmbench_cn"
    title = "MMBench-CN"
    paper_rows = ("MMBench-CN",)
    lang = "cn"
    patterns = ("mmbench_dev_cn_*.tsv",)
    layout = "  DATA/mmbench_dev_cn_20231003.tsv  (the release TSV, base64 images inside)"
