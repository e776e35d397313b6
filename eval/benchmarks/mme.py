"""MME, scored exactly as the benchmark's `eval_tool/calculation.py` (BLINK.md §8).

Release layout (`MME_Benchmark_release_version/`, give it or its parent as DATA):

    DATA/<subtask>/<name>.jpg|.png + <name>.txt                       existence, count, position, color, OCR,
                                                                        commonsense_reasoning, numerical_calculation,
                                                                        text_translation, code_reasoning
    DATA/<subtask>/images/<name>.jpg + questions_answers_YN/<name>.txt artwork, celebrity, landmark, posters, scene

Each .txt holds the image's two questions, one "question<TAB>Yes|No" per line.

Prompt as LLaVA-1.5's `llava_mme.jsonl` (BLINK.md §8): the benchmark's question without its trailing
" Please answer yes or no.", then "\\nAnswer the question using a single word or phrase.". `Mme(raw_question=True)`
asks the benchmark's question exactly as the release has it instead (MME's own protocol).

Composition (MME's release, `MME_Benchmark_release_version`): 14 subtasks, every image with 2 questions; the
question counts per subtask are `OFFICIAL_QUESTIONS` (2374 in all, 1187 images: the release's .txt files, and
the same per-subtask counts as lmms-lab/MME on the Hugging Face Hub). A .txt with other than 2 questions is
refused; an image whose .txt is missing leaves its subtask short, so the run is partial.

Scoring: lower-case; exactly "yes"/"no", else the first 4 characters decide ("yes" in them, then "no"),
else "other" (wrong). Per subtask 100 * (acc + acc_plus), acc over questions, acc_plus the share of images
with both questions right; perception and cognition are sums over their subtasks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from blink_jax.processing import SHORT_ANSWER_SUFFIX
from eval.benchmarks.base import Benchmark, DataError, count_shortfall

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
YES_NO = " Please answer yes or no."
RELEASE_FOLDER = "MME_Benchmark_release_version"
QUESTIONS_PER_IMAGE = 2
# Questions per subtask of the release (twice its images).
OFFICIAL_QUESTIONS = {"existence": 60, "count": 60, "position": 60, "color": 60, "posters": 294, "celebrity": 340,
                      "scene": 400, "landmark": 400, "artwork": 400, "OCR": 40, "commonsense_reasoning": 140,
                      "numerical_calculation": 40, "text_translation": 40, "code_reasoning": 40}


def parse_pred_ans(pred_ans: str) -> str:
    """calculation.py's `parse_pred_ans` on the lower-cased answer: 'yes' | 'no' | 'other'."""
    pred_ans = pred_ans.lower()
    if pred_ans in ("yes", "no"):
        return pred_ans
    prefix = pred_ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def subtask_scores(results: Sequence[dict]) -> dict:
    """Per subtask: acc, acc_plus, score = 100 * (acc + acc_plus), counts."""
    out = {}
    for task in SUBTASKS:
        rows = [r for r in results if r["subset"] == task]
        if not rows:
            continue
        images: dict[str, list[bool]] = {}
        for r in rows:
            images.setdefault(r["image"], []).append(r["correct"])
        acc = sum(r["correct"] for r in rows) / len(rows)
        acc_plus = sum(len(c) == 2 and all(c) for c in images.values()) / len(images)
        out[task] = {"n": len(rows), "images": len(images), "acc": acc, "acc_plus": acc_plus,
                     "other": sum(r["pred"] == "other" for r in rows), "score": 100 * (acc + acc_plus)}
    return out


class Mme(Benchmark):
    name = "mme"
    title = "MME"
    version = "1.1"  # 1.1: LLaVA-1.5's prompt (no " Please answer yes or no."); errored questions count as wrong
    max_new_tokens = 16
    paper_rows = ("MME Perception", "MME Cognition", "MME total")
    headline_note = "sums over subtasks of 100 x (accuracy + accuracy+)"
    layout = ("  DATA/<subtask>/<name>.jpg + <name>.txt  (existence, count, position, color, OCR, and the cognition "
              "subtasks)\n  DATA/<subtask>/images/<name>.jpg + DATA/<subtask>/questions_answers_YN/<name>.txt  "
              "(artwork, celebrity, landmark, posters, scene)\n  each .txt: two lines 'question<TAB>Yes|No'; DATA may "
              f"also be the parent of {RELEASE_FOLDER}/")

    def __init__(self, raw_question: bool = False):
        self.raw_question = raw_question

    def root(self, data_dir: Path) -> Path:
        return data_dir / RELEASE_FOLDER if (data_dir / RELEASE_FOLDER).is_dir() else data_dir

    def subtask_dirs(self, data_dir: Path) -> dict[str, tuple[Path, Path]]:
        """subtask -> (image folder, question folder)."""
        root = self.root(data_dir)
        found = {}
        for task in SUBTASKS:
            folder = root / task
            if not folder.is_dir():
                continue
            if (folder / "images").is_dir():
                found[task] = (folder / "images", folder / "questions_answers_YN")
                if not found[task][1].is_dir():
                    raise DataError(f"MME: {folder} has images/ but no questions_answers_YN/: restore it from the "
                                    f"release")
            else:
                found[task] = (folder, folder)
        if not found:
            raise DataError(f"MME: no subtask folder ({', '.join(SUBTASKS)}) in {str(root)!r}. Expected layout:\n"
                            f"{self.layout}")
        return found

    def source_files(self, data_dir: Path) -> list[Path]:
        return sorted(p for _, qa in self.subtask_dirs(data_dir).values() for p in qa.glob("*.txt"))

    def extra_features(self) -> dict:
        import tensorflow_datasets as tfds

        return {"question": tfds.features.Text(), "answer": tfds.features.Text(), "image_id": tfds.features.Text()}

    def read_official(self, data_dir: Path) -> Iterator[dict]:
        data_dir = data_dir.absolute()
        for task, (image_dir, qa_dir) in self.subtask_dirs(data_dir).items():
            for txt in sorted(qa_dir.glob("*.txt")):
                candidates = [image_dir / (txt.stem + ext) for ext in IMAGE_EXTENSIONS]
                image = next((c for c in candidates if c.is_file()), candidates[0])
                lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
                if len(lines) != QUESTIONS_PER_IMAGE:
                    raise DataError(f"MME: {txt} has {len(lines)} question line(s); every MME image has "
                                    f"{QUESTIONS_PER_IMAGE} ('question<TAB>Yes|No' each): restore the file from the "
                                    f"MME release")
                for k, line in enumerate(lines):
                    parts = line.strip().split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise DataError(f"{txt}:{k + 1} is not 'question<TAB>Yes|No': fix the line or restore the "
                                        f"file from the MME release")
                    yield {"question_id": f"{task}/{image.name}#{k}", "subset": task,
                           "image_file": str(image.relative_to(data_dir)), "image_id": f"{task}/{image.name}",
                           "question": parts[0], "answer": parts[1].strip()}

    def limit(self, docs: Sequence[dict], n: int | None) -> list[dict]:
        """The first `n` questions of every subtask, rounded up to whole images (acc_plus needs both)."""
        if n is None:
            return list(docs)
        kept_images: set[str] = set()
        counts: dict[str, int] = {}
        out = []
        for doc in docs:
            if doc["image_id"] not in kept_images:
                if counts.get(doc["subset"], 0) >= n:
                    continue
                kept_images.add(doc["image_id"])
            counts[doc["subset"]] = counts.get(doc["subset"], 0) + 1
            out.append(doc)
        return out

    def doc_to_text(self, doc: Mapping) -> str:
        question = doc["question"].strip()
        if self.raw_question:
            return question
        if question.endswith(YES_NO.strip()):
            question = question[:-len(YES_NO.strip())].rstrip()
        return f"{question}\n{SHORT_ANSWER_SUFFIX}"

    def process_results(self, doc: Mapping, prediction: str) -> dict:
        pred = parse_pred_ans(prediction)
        label = doc["answer"].strip().lower()
        return {"subset": doc["subset"], "image": doc["image_id"], "pred": pred, "label": label,
                "correct": pred == label}

    def aggregate(self, results: Sequence[dict]) -> dict:
        tasks = subtask_scores(results)
        perception = sum(tasks[t]["score"] for t in PERCEPTION if t in tasks)
        cognition = sum(tasks[t]["score"] for t in COGNITION if t in tasks)
        missing = [t for t in SUBTASKS if t not in tasks]
        return {"perception": perception, "cognition": cognition, "total": perception + cognition,
                "subtasks": tasks, "missing_subtasks": missing}

    def composition(self, docs: Sequence[Mapping]) -> list[str]:
        have = {t: sum(d["subset"] == t for d in docs) for t in SUBTASKS}
        absent = [t for t in SUBTASKS if not have[t]]
        out = [f"{len(absent)} of the {len(SUBTASKS)} subtasks absent ({', '.join(absent)})"] if absent else []
        for task in SUBTASKS:
            if have[task]:
                out += count_shortfall(f"subtask {task}", have[task], OFFICIAL_QUESTIONS[task])
        return out

    def headline(self, metrics: Mapping) -> dict:
        return {"MME Perception": metrics.get("perception"), "MME Cognition": metrics.get("cognition"),
                "MME total": metrics.get("total")}
