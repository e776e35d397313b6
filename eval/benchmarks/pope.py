"""POPE (object hallucination), scored exactly as LLaVA's `llava/eval/eval_pope.py` (BLINK.md §8).

Release layout (LLaVA's `playground/data/eval/pope`):

    DATA/coco_pope_{random,popular,adversarial}.json   JSONL: question_id, image, text, label   (or DATA/coco/...)
    DATA/val2014/COCO_val2014_*.jpg

Prompt: the question + "\\nAnswer the question using a single word or phrase." (`vicuna_v1`).
Question ids repeat across the three files, so ours are "{split}/{question_id}". A label other than "yes"/"no"
is refused (eval_pope.py would count it as "yes").

Composition: the three splits of 3000 questions each (500 COCO images x 6), except that LLaVA-1.5 evaluated an
older POPE whose random split has 2910 (AoiDragon/POPE at e3e39262, as haotian-liu/LLaVA issue #626 found); both
are the official release. A folder with `shapes_annotations.json` is the demo's shapes set in POPE's layout
(`demo/data/pope`): its own data set, complete at `n_images * questions_per_image` questions per split.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from demo.pope import SPLITS, confusion_metrics, parse_yes_no
from eval.benchmarks.base import Benchmark, DataError, count_shortfall, read_json, read_jsonl_strict

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
LABELS = ("yes", "no")
# Questions per split of the official release (see the module docstring for the two random-split sizes).
OFFICIAL_SPLIT_SIZES = {"random": (3000, 2910), "popular": (3000,), "adversarial": (3000,)}
SHAPES_MANIFEST = "shapes_annotations.json"  # written beside the demo's shapes set by its generator
SHAPES_SET = "the demo shapes set"


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean over splits; None (undefined) when any split's value is."""
    return None if any(v is None for v in values) else sum(values) / len(values)


class Pope(Benchmark):
    name = "pope"
    title = "POPE"
    version = "1.1"  # 1.1: errored questions count as wrong; undefined precision is None; the data set's name
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

        # data_set / split_size: "" and 0 for the official release; the demo's set names itself and its size
        return {"question": tfds.features.Text(), "label": tfds.features.Text(), "data_set": tfds.features.Text(),
                "split_size": np.int64}

    def shapes_set_size(self, data_dir: Path) -> int | None:
        """Questions per split of the demo's shapes set, None when `data_dir` holds another set."""
        manifest = data_dir / SHAPES_MANIFEST
        if not manifest.is_file():
            return None
        info = read_json(manifest)
        try:
            return int(info["n_images"]) * int(info["questions_per_image"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{manifest} lacks n_images / questions_per_image: rewrite the shapes set with its "
                            f"generator, or remove the file if {data_dir} holds the official POPE") from None

    def read_official(self, data_dir: Path) -> Iterator[dict]:
        size = self.shapes_set_size(data_dir)
        origin = {"data_set": "", "split_size": 0} if size is None else {"data_set": SHAPES_SET, "split_size": size}
        for split, path in self.annotation_files(data_dir).items():
            for number, row in read_jsonl_strict(path):
                missing = {"question_id", "image", "text", "label"} - set(row)
                if missing:
                    raise DataError(f"{path}:{number} lacks {sorted(missing)}: it is not a POPE annotation file")
                if row["label"] not in LABELS:
                    raise DataError(f"{path}:{number}: label {row['label']!r} is not 'yes' or 'no' (POPE's only "
                                    f"labels): correct that line or restore the file from the POPE release")
                yield {"question_id": f"{split}/{row['question_id']}", "subset": split,
                       "image_file": f"val2014/{row['image']}", "question": row["text"], "label": row["label"],
                       **origin}

    def process_results(self, doc: Mapping, prediction: str) -> dict:
        pred = parse_yes_no(prediction)
        return {"subset": doc["subset"], "pred": pred, "label": doc["label"], "correct": pred == doc["label"]}

    def error_result(self, doc: Mapping) -> dict:
        # wrong in every metric: the opposite of the label (a "yes" question a false negative, a "no" one a false
        # positive), as eval_pope.py reads an answer that says nothing usable
        return {"subset": doc["subset"], "pred": "no" if doc["label"] == "yes" else "yes", "label": doc["label"],
                "correct": False, "error": True}

    def aggregate(self, results: Sequence[dict]) -> dict:
        per_split = {}
        for split in SPLITS:
            rows = [r for r in results if r["subset"] == split]
            if rows:
                per_split[split] = confusion_metrics([r["pred"] for r in rows], [r["label"] for r in rows])
        average = {m: mean_or_none([s[m] for s in per_split.values()]) for m in METRICS} if per_split else {}
        return {"splits": per_split, "average": average}

    def data_set(self, docs: Sequence[Mapping]) -> str:
        named = {d.get("data_set") or "" for d in docs}
        return f"{SHAPES_SET} (POPE's layout)" if SHAPES_SET in named else self.title

    def composition(self, docs: Sequence[Mapping]) -> list[str]:
        sizes = {split: sum(d["subset"] == split for d in docs) for split in SPLITS}
        own = {int(d.get("split_size") or 0) for d in docs if d.get("data_set")}
        if own:  # the demo's set: complete against its own size
            (size,) = own
            return [s for split in SPLITS for s in count_shortfall(f"split {split}", sizes[split], size, SHAPES_SET)]
        out = []
        for split in SPLITS:
            if sizes[split] not in OFFICIAL_SPLIT_SIZES[split]:
                official = " or ".join(map(str, OFFICIAL_SPLIT_SIZES[split]))
                out.append(f"split {split}: {sizes[split]} of the official release's {official} questions")
        return out

    def headline(self, metrics: Mapping) -> dict:
        # LLaVA-1.5 reports POPE as the F1 score averaged over the three splits.
        f1 = metrics.get("average", {}).get("f1")
        return {"POPE": None if f1 is None else 100 * f1}
