"""POPE (object hallucination), scored exactly as LLaVA's `llava/eval/eval_pope.py` (BLINK.md §8).

Release layout (LLaVA's `playground/data/eval/pope`):

    DATA/coco_pope_{random,popular,adversarial}.json   JSONL: question_id, image, text, label   (or DATA/coco/...)
    DATA/val2014/COCO_val2014_*.jpg

Prompt: the question + "\\nAnswer the question using a single word or phrase." (`vicuna_v1`).
Question ids repeat across the three files, so ours are "{split}/{question_id}".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from demo.pope import SPLITS, confusion_metrics, parse_yes_no
from eval.benchmarks.base import Benchmark, DataError, read_jsonl_strict

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class Pope(Benchmark):
    name = "pope"
    title = "POPE"
    version = "1.0"
    max_new_tokens = 16
    paper_rows = ("POPE",)
    headline_note = "F1 x 100, averaged over the random, popular and adversarial splits (as LLaVA-1.5 reports POPE)"
    layout = ("  DATA/coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json  (JSONL; or in "
              "DATA/coco/)\n  DATA/val2014/COCO_val2014_*.jpg")

    def annotation_files(self, data_dir: Path) -> dict[str, Path]:
        found = {}
        for split in SPLITS:
            for folder in (data_dir, data_dir / "coco"):
                if (folder / f"coco_pope_{split}.json").is_file():
                    found[split] = folder / f"coco_pope_{split}.json"
                    break
        if not found:
            raise DataError(f"POPE: no coco_pope_{{{','.join(SPLITS)}}}.json in {str(data_dir)!r} or its coco/ "
                            f"folder. Expected layout:\n{self.layout}")
        return found

    def source_files(self, data_dir: Path) -> list[Path]:
        return list(self.annotation_files(data_dir).values())

    def extra_features(self) -> dict:
        import tensorflow_datasets as tfds

        return {"question": tfds.features.Text(), "label": tfds.features.Text()}

    def read_official(self, data_dir: Path) -> Iterator[dict]:
        for split, path in self.annotation_files(data_dir).items():
            for row in read_jsonl_strict(path):
                missing = {"question_id", "image", "text", "label"} - set(row)
                if missing:
                    raise DataError(f"{path}: a line lacks {sorted(missing)}: it is not a POPE annotation file")
                yield {"question_id": f"{split}/{row['question_id']}", "subset": split,
                       "image_file": f"val2014/{row['image']}", "question": row["text"], "label": row["label"]}

    def process_results(self, doc: Mapping, prediction: str) -> dict:
        pred = parse_yes_no(prediction)
        return {"subset": doc["subset"], "pred": pred, "label": doc["label"],
                "correct": (pred != "no") == (doc["label"] != "no")}  # eval_pope's positives: all but 'no'


    def aggregate(self, results: Sequence[dict]) -> dict:
        per_split = {}
        for split in SPLITS:
            rows = [r for r in results if r["subset"] == split]
            if rows:
                per_split[split] = confusion_metrics([r["pred"] for r in rows], [r["label"] for r in rows])
        average = {m: sum(s[m] for s in per_split.values()) / len(per_split) for m in METRICS} if per_split else {}
        return {"splits": per_split, "average": average}

    def headline(self, metrics: Mapping) -> dict:
        # LLaVA-1.5 reports POPE as the F1 score averaged over the three splits.
        f1 = metrics.get("average", {}).get("f1")
        return {"POPE": None if f1 is None else 100 * f1}
