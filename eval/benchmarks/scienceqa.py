"""ScienceQA-IMG (the test questions that have an image), scored as LLaVA's `llava/eval/eval_science_qa.py`.

Release layout (the ScienceQA repository's `data/scienceqa` + images):

    DATA/problems.json        {pid: {question, choices, answer (index), hint, image ("image.png" | null), split}}
    DATA/pid_splits.json      {"test": [pid, ...], ...}            (both may sit in DATA/data/scienceqa/)
    DATA/images/test/<pid>/image.png                              (or DATA/test/<pid>/image.png)

Prompt (LLaVA-1.5's `llava_test_CQM-A.json` + `--single-pred-prompt`, as lmms-eval writes it):
"Context: {hint}\\n" when there is a hint, the question, "\\nA. ...\\nB. ...", with doubled spaces made single
as ScienceQA's prompt builder does for LLaVA's question file (`text.replace("  ", " ")`), then
"\\nAnswer with the option's letter from the given choices directly.".

Scoring as LLaVA-1.5's `llava/eval/eval_science_qa.py` (haotian-liu/LLaVA): the answer is exactly an option
letter (A-E), or starts "X. " with X an option letter, or holds exactly one match of the regex
`The answer is ([A-Z]).` (the dot unescaped, as the script has it: any character); anything else is "FAILED".
The letter must then be one of the question's options (`get_pred_idx`), else the answer is wrong. Nothing is
stripped or rewritten first: "A\\nB", "The answer is B" (nothing after the letter) and two matches are wrong.

Composition: ScienceQA's test split has 2017 questions with an image (ScienceQA-IMG, as LLaVA reports it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from eval.benchmarks.base import (LETTER_SUFFIX, OPTION_LETTERS, Benchmark, DataError, count_shortfall, mean,
                                  options_text, read_json)

_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # eval_science_qa.py's pattern, unescaped dot included
OFFICIAL_QUESTIONS = 2017


def parse_answer(text: str, options: Sequence[str] = OPTION_LETTERS) -> str:
    """eval_science_qa.py's main loop: the letter read from an answer, or "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    matches = _ANSWER_IS.findall(text)
    return matches[0] if len(matches) == 1 else "FAILED"


def pred_index(answer: str, num_choices: int, options: Sequence[str] = OPTION_LETTERS) -> int:
    """eval_science_qa.py's `get_pred_idx`: the option index of a parsed letter, -1 if it is not an option."""
    return options.index(answer) if answer in options[:num_choices] else -1


class ScienceQa(Benchmark):
    name = "scienceqa"
    title = "ScienceQA-IMG"
    version = "1.1"  # 1.1: eval_science_qa.py's letter rule exactly; single spaces; errored questions wrong
    max_new_tokens = 16
    paper_rows = ("ScienceQA",)
    headline_note = "accuracy x 100 on the test questions with an image (ScienceQA-IMG)"
    layout = ("  DATA/problems.json, DATA/pid_splits.json  (or in DATA/data/scienceqa/)\n"
              "  DATA/images/test/<pid>/image.png  (or DATA/test/<pid>/image.png)")

    def source_files(self, data_dir: Path) -> list[Path]:
        problems = self.require(data_dir, "problems.json", "data/scienceqa/problems.json")
        return [problems, self.require(data_dir, "pid_splits.json", "data/scienceqa/pid_splits.json")]

    def extra_features(self) -> dict:
        import tensorflow_datasets as tfds

        text = tfds.features.Text()
        return {"question": text, "hint": text, "options": tfds.features.Sequence(text), "answer": np.int64}

    def read_official(self, data_dir: Path) -> Iterator[dict]:
        problems_file, splits_file = self.source_files(data_dir)
        problems, splits = read_json(problems_file), read_json(splits_file)
        if "test" not in splits:
            raise DataError(f"{splits_file} has no 'test' list: it is not ScienceQA's pid_splits.json")
        image_root = "images/test" if (data_dir / "images" / "test").is_dir() else "test"
        for pid in splits["test"]:
            problem = problems.get(pid)
            if problem is None:
                raise DataError(f"{splits_file} lists problem {pid!r}, which {problems_file} lacks: use files from "
                                f"one release")
            if not problem.get("image"):
                continue  # ScienceQA-IMG: questions with an image only
            yield {"question_id": str(pid), "image_file": f"{image_root}/{pid}/{problem['image']}",
                   "question": problem["question"], "hint": problem.get("hint") or "",
                   "options": list(problem["choices"]), "answer": int(problem["answer"])}

    def doc_to_text(self, doc: Mapping) -> str:
        context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
        text = f"{context}{doc['question']}\n{options_text(doc['options'])}".replace("  ", " ").strip()
        return f"{text}\n{LETTER_SUFFIX}"

    def process_results(self, doc: Mapping, prediction: str) -> dict:
        parsed = parse_answer(prediction)
        index = pred_index(parsed, len(doc["options"]))
        return {"parsed": parsed, "correct": index == int(doc["answer"])}

    def aggregate(self, results: Sequence[dict]) -> dict:
        return {"accuracy": mean([r["correct"] for r in results]), "n": len(results),
                "failed": sum(r["parsed"] == "FAILED" for r in results)}

    def composition(self, docs: Sequence[Mapping]) -> list[str]:
        return count_shortfall("questions with an image", len(docs), OFFICIAL_QUESTIONS)

    def headline(self, metrics: Mapping) -> dict:
        return {"ScienceQA": 100 * metrics["accuracy"] if metrics.get("n") else None}

