"""Tiny benchmark directories in each official release layout, for the eval tests.

Images are small photo-like JPEG/PNGs from `tiny_llava.photo`; `corrupt=True` makes one image file
unreadable (a truncated JPEG) so the harness must record it and go on.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import tiny_llava as tl

POPE_QUESTIONS = {
    "random": [("COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes"),
               ("COCO_val2014_000000000001.jpg", "Is there a cat in the image?", "no"),
               ("COCO_val2014_000000000002.jpg", "Is there a red circle in the image?", "yes"),
               ("COCO_val2014_000000000003.jpg", "Is there a blue square in the image?", "no")],
    "popular": [("COCO_val2014_000000000002.jpg", "Is there a green triangle in the image?", "no"),
                ("COCO_val2014_000000000003.jpg", "Is there a dog in the image?", "yes"),
                ("COCO_val2014_000000000001.jpg", "Is there a user in the image?", "yes")],
    "adversarial": [("COCO_val2014_000000000003.jpg", "Is there a cat in the image?", "no"),
                    ("COCO_val2014_000000000002.jpg", "Is there a square in the image?", "yes")],
}
CORRUPT_POPE_IMAGE = "COCO_val2014_000000000009.jpg"


def save_photo(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tl.photo(*size, seed=seed).save(path)


def write_corrupt_jpeg(path: Path) -> None:
    """A JPEG header and nothing else: PIL identifies it, then fails to decode it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    tl.photo(20, 20, seed=99).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[:60])


def make_pope(root: Path, *, corrupt: bool = True, in_coco_folder: bool = False) -> dict[str, list[str]]:
    """coco_pope_{split}.json (JSONL) + val2014/; -> {split: [question ids]}. With `corrupt`, the random split
    gets one more question whose image is broken: question id "random/<n>"."""
    root = Path(root)
    ann_dir = root / "coco" if in_coco_folder else root
    ann_dir.mkdir(parents=True, exist_ok=True)
    images = sorted({img for rows in POPE_QUESTIONS.values() for img, _, _ in rows})
    for seed, name in enumerate(images):
        save_photo(root / "val2014" / name, seed, size=(40 + 7 * seed, 30 + 5 * seed))
    ids = {}
    for split, rows in POPE_QUESTIONS.items():
        rows = list(rows)
        if corrupt and split == "random":
            rows.append((CORRUPT_POPE_IMAGE, "Is there a dog in the image?", "yes"))
            write_corrupt_jpeg(root / "val2014" / CORRUPT_POPE_IMAGE)
        lines = [json.dumps({"question_id": i + 1, "image": img, "text": text, "label": label})
                 for i, (img, text, label) in enumerate(rows)]
        (ann_dir / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
        ids[split] = [f"{split}/{i + 1}" for i in range(len(rows))]
    return ids


MME_TASKS = {
    # subtask: (layout, [(image stem, extension, [(question, answer), (question, answer)])])
    "existence": ("flat", [("000000006040", ".jpg", [("Is there a dog in this image? Please answer yes or no.", "Yes"),
                                                     ("Is there a cat in this image? Please answer yes or no.", "No")]),
                           ("000000018150", ".jpg", [("Is there a red circle in this image? Please answer yes or no.", "Yes"),
                                                     ("Is there a blue square in this image? Please answer yes or no.", "No")])]),
    "artwork": ("nested", [("10002", ".jpg", [("Is this artwork created by a dog? Please answer yes or no.", "Yes"),
                                              ("Is this artwork created by a cat? Please answer yes or no.", "No")])]),
    "code_reasoning": ("flat", [("0020", ".png", [("Is the output two? Please answer yes or no.", "Yes"),
                                                  ("Is the output three? Please answer yes or no.", "No")])]),
}


def make_mme(root: Path, *, release_folder: bool = False) -> list[str]:
    """MME_Benchmark_release_version layout (optionally under `root`); -> question ids in release order."""
    base = Path(root) / "MME_Benchmark_release_version" if release_folder else Path(root)
    ids = []
    seed = 10
    for task, (layout, images) in MME_TASKS.items():
        image_dir = base / task / "images" if layout == "nested" else base / task
        qa_dir = base / task / "questions_answers_YN" if layout == "nested" else base / task
        qa_dir.mkdir(parents=True, exist_ok=True)
        for stem, ext, qas in images:
            save_photo(image_dir / f"{stem}{ext}", seed, size=(36 + seed, 44))
            seed += 1
            (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qas))
            ids += [f"{task}/{stem}{ext}#{k}" for k in range(len(qas))]
    return ids


def make_gqa(root: Path) -> dict:
    root = Path(root)
    questions = {
        "201307251": {"imageId": "n161313", "question": "Is it a dog?", "answer": "yes", "isBalanced": True,
                      "types": {"structural": "verify"}},
        "201640614": {"imageId": "n235859", "question": "What colour is the circle?", "answer": "red",
                      "isBalanced": True, "types": {"structural": "query"}},
        "202225914": {"imageId": "n161313", "question": "What animal is it?", "answer": "dog", "isBalanced": True,
                      "types": {"structural": "query"}},
        "999": {"imageId": "n161313", "question": "Unbalanced?", "answer": "no", "isBalanced": False,
                "types": {"structural": "verify"}},
    }
    (root / "testdev_balanced_questions.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    for seed, image in enumerate(("n161313", "n235859")):
        save_photo(root / "images" / f"{image}.jpg", seed)
    return questions


def _b64_photo(seed: int) -> str:
    buf = io.BytesIO()
    tl.photo(32, 24, seed=seed).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


MMBENCH_ROWS = [
    # index, question, hint, A, B, C, D, answer, category
    (0, "What colour is the circle?", "nan", "red", "green", "blue", "nan", "A", "color"),
    (1000000, "What colour is the circle?", "nan", "green", "blue", "red", "nan", "C", "color"),
    (1, "How many dogs are there?", "Look closely.", "one", "two", "three", "four", "B", "count"),
    (2, "Which animal is shown?", "nan", "cat", "dog", "nan", "nan", "B", "animal"),
]


def make_mmbench(root: Path, *, cn: bool = False) -> list[dict]:
    """mmbench_dev_20230712.tsv (or mmbench_dev_cn_20231003.tsv); row 2 points to row 1's image by index."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = "mmbench_dev_cn_20231003.tsv" if cn else "mmbench_dev_20230712.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = []
    for k, (index, question, hint, a, b, c, d, answer, category) in enumerate(MMBENCH_ROWS):
        image = "1" if index == 2 else _b64_photo(k)
        rows.append(dict(zip(header, [index, question, hint, a, b, c, d, answer, category, "perception", "dev", image])))
    with open(root / name, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def make_scienceqa(root: Path) -> dict:
    root = Path(root)
    problems = {
        "5": {"question": "Which animal is a dog?", "choices": ["cat", "dog"], "answer": 1, "hint": "",
              "image": "image.png", "split": "test"},
        "7": {"question": "Which colour is red?", "choices": ["red", "green", "blue"], "answer": 0,
              "hint": "Look at the circle.", "image": "image.png", "split": "test"},
        "8": {"question": "No image here?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
              "split": "test"},
        "9": {"question": "A training question", "choices": ["yes", "no"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train"},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["5", "7", "8"], "train": ["9"]}))
    for seed, pid in enumerate(("5", "7", "9")):
        path = root / "images" / "test" / pid / "image.png"
        save_photo(path, seed)
    return problems


def make_mmvet(root: Path) -> dict:
    root = Path(root)
    data = {"v1_0": {"imagename": "v1_0.png", "question": "What is in the image?", "answer": "a dog",
                     "capability": ["rec"]},
            "v1_1": {"imagename": "v1_1.jpg", "question": "What colour is the circle?", "answer": "red",
                     "capability": ["rec", "ocr"]}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "mm-vet.json").write_text(json.dumps(data))
    save_photo(root / "images" / "v1_0.png", 1)
    save_photo(root / "images" / "v1_1.jpg", 2)
    return data
