"""MM-Vet: long answers, graded by an external GPT-4 judge; we export the official submission file.

Release layout:

    DATA/mm-vet.json    {"v1_0": {"imagename": "v1_0.png", "question": ..., "answer": ..., "capability": [...]}, ...}
    DATA/images/<imagename>

Prompt (LLaVA-1.5's `llava-mm-vet.jsonl` with `model_vqa`): the question alone, no suffix; long answers
(max_new_tokens 1024 as `model_vqa.py`).
Output: `mmvet_<mode>.json`, {question id: answer} as LLaVA's `convert_mmvet_for_eval.py` writes it, for the
MM-Vet evaluator (`mm-vet_evaluator`, GPT-4 graded). It holds every question of the run, an errored or
unanswered one with an empty answer (the judge grades it wrong; a missing id would stop the evaluator with a
KeyError). No score is computed here.

Composition: the release has 218 questions (v1_0 ... v1_217).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from eval.benchmarks.base import Benchmark, DataError, count_shortfall, read_json
from eval.harness.io import atomic_write_json

ANNOTATIONS = "mm-vet.json"
OFFICIAL_QUESTIONS = 218


class MmVet(Benchmark):
    name = "mmvet"
    title = "MM-Vet"
    version = "1.1"  # 1.1: the export holds every question
    max_new_tokens = 1024
    paper_rows = ("MM-Vet",)
    headline_note = "scored by MM-Vet's GPT-4 judge from the exported file (none here)"
    layout = f"  DATA/{ANNOTATIONS}\n  DATA/images/<imagename>"

    def source_files(self, data_dir: Path) -> list[Path]:
        return [self.require(data_dir, ANNOTATIONS)]

    def extra_features(self) -> dict:
        import tensorflow_datasets as tfds

        text = tfds.features.Text()
        return {"question": text, "answer": text, "capability": tfds.features.Sequence(text)}

    def read_official(self, data_dir: Path) -> Iterator[dict]:
        path = self.source_files(data_dir)[0]
        for qid, item in read_json(path).items():
            try:
                yield {"question_id": str(qid), "image_file": f"images/{item['imagename']}",
                       "question": item["question"], "answer": str(item.get("answer", "")),
                       "capability": list(item.get("capability", []))}
            except (KeyError, TypeError, AttributeError):
                raise DataError(f"{path}: entry {qid!r} lacks 'imagename'/'question': it is not mm-vet.json") from None

    def doc_to_text(self, doc: Mapping) -> str:
        return doc["question"]

    def process_results(self, doc: Mapping, prediction: str) -> dict:
        return {"question_id": doc["question_id"], "prediction": prediction}

    def error_result(self, doc: Mapping) -> dict:
        return {"question_id": doc["question_id"], "prediction": "", "error": True}  # no verdict here: the judge's

    def aggregate(self, results: Sequence[dict]) -> dict:
        return {"answered": sum(not r.get("error") for r in results), "score": None,
                "note": "MM-Vet needs its GPT-4 judge: submit the exported mmvet_<mode>.json to the MM-Vet evaluator"}

    def composition(self, docs: Sequence[Mapping]) -> list[str]:
        return count_shortfall("questions", len(docs), OFFICIAL_QUESTIONS)

    def headline(self, metrics: Mapping) -> dict:
        return {"MM-Vet": None}

    def submission(self, samples: Sequence[dict], docs: Mapping[str, dict]) -> dict[str, str]:
        """{question id: answer} for every question of `docs`, in release order; "" where there is no answer."""
        answers = {s["question_id"]: s.get("prediction") or "" for s in samples if s.get("error") is None}
        return {q: answers.get(q, "") for q in docs}

    def export(self, samples: Sequence[dict], docs: Mapping[str, dict], out_dir: Path, mode: str) -> list[Path]:
        return [atomic_write_json(Path(out_dir) / f"mmvet_{mode}.json", self.submission(samples, docs))]
