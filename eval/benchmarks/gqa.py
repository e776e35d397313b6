"""GQA test-dev balanced: exact match, as LLaVA's `convert_gqa_for_eval.py` + GQA's official `eval.py`.

Release layout:

    DATA/testdev_balanced_questions.json   {qid: {imageId, question, answer, isBalanced, types, ...}}
                                           (or DATA/questions/testdev_balanced_questions.json)
    DATA/images/<imageId>.jpg

Prompt: the question + "\\nAnswer the question using a single word or phrase.".
Scoring: prediction.rstrip('.').lower() == answer, over the balanced questions; "open" (structural type
"query") and "binary" accuracies as eval.py reports them.

Composition: test-dev balanced has 12578 questions (LLaVA-1.5's `llava_gqa_testdev_balanced.jsonl`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from eval.benchmarks.base import Benchmark, DataError, count_shortfall, mean, read_json

QUESTIONS = "testdev_balanced_questions.json"
OFFICIAL_QUESTIONS = 12578


def normalize_prediction(text: str) -> str:
    """convert_gqa_for_eval.py: `text.rstrip('.').lower()`."""
    return text.rstrip(".").lower()


class Gqa(Benchmark):
    name = "gqa"
    title = "GQA"
    version = "1.1"  # 1.1: errored questions count as wrong
    max_new_tokens = 16
    paper_rows = ("GQA",)
    headline_note = "exact-match accuracy x 100 on testdev-balanced"
    layout = (f"  DATA/{QUESTIONS}  (or DATA/questions/{QUESTIONS})\n  DATA/images/<imageId>.jpg")

    def source_files(self, data_dir: Path) -> list[Path]:
        return [self.require(data_dir, QUESTIONS, f"questions/{QUESTIONS}")]

    def extra_features(self) -> dict:
        import tensorflow_datasets as tfds

        return {"question": tfds.features.Text(), "answer": tfds.features.Text(), "structural": tfds.features.Text()}

    def read_official(self, data_dir: Path) -> Iterator[dict]:
        path = self.source_files(data_dir)[0]
        questions = read_json(path)
        if not isinstance(questions, dict):
            raise DataError(f"{path} is not GQA's questions file (a dict question id -> question)")
        for qid, q in questions.items():
            if not q.get("isBalanced", True):
                continue
            try:
                yield {"question_id": str(qid), "image_file": f"images/{q['imageId']}.jpg", "question": q["question"],
                       "answer": q["answer"], "structural": q.get("types", {}).get("structural", "")}
            except KeyError as e:
                raise DataError(f"{path}: question {qid!r} lacks {e}: it is not GQA's questions file") from None

    def process_results(self, doc: Mapping, prediction: str) -> dict:
        pred = normalize_prediction(prediction)
        return {"correct": pred == doc["answer"], "open": doc["structural"] == "query"}

    def aggregate(self, results: Sequence[dict]) -> dict:
        return {"accuracy": mean([r["correct"] for r in results]), "n": len(results),
                "open": mean([r["correct"] for r in results if r["open"]]),
                "binary": mean([r["correct"] for r in results if not r["open"]])}

    def composition(self, docs: Sequence[Mapping]) -> list[str]:
        return count_shortfall("balanced questions", len(docs), OFFICIAL_QUESTIONS)

    def headline(self, metrics: Mapping) -> dict:
        return {"GQA": 100 * metrics["accuracy"] if metrics.get("n") else None}
