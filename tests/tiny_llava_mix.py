"""A tiny LLaVA-1.5 mix in the official layout, for the training tests.

`make_llava_mix(root)` writes `root/llava_v1_5_mix665k.json` and images under the official folders
(`coco/train2017`, `gqa/images`, `textvqa/train_images`, `vg/VG_100K`), plus the traps the builder must skip:
a text-only sample, a sample whose image file is missing and one whose image file is corrupt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tiny_llava import photo

FOLDERS = ("coco/train2017", "gqa/images", "textvqa/train_images", "vg/VG_100K")
QUESTIONS = (
    "what colour is the circle ?",
    "is there a dog in the image ? please answer yes or no .",
    "how many square is there ?",
    "is the cat left or right ?",
    "what is in the image ?",
    "is there a red triangle ?",
    "how many circle ?",
    "what colour of the square ?",
)


def make_llava_mix(root: str | os.PathLike, num_images: int = 6, seed: int = 0) -> dict:
    """Writes the data set; returns {"valid": [ids with a usable image], "skipped": [ids the builder drops]}."""
    root = Path(root)
    records, valid = [], []
    for i in range(num_images):
        folder = FOLDERS[i % len(FOLDERS)]
        rel = f"{folder}/{i:012d}.{'jpg' if i % 2 == 0 else 'png'}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        width, height = [(60, 84), (97, 70), (84, 84), (50, 120), (131, 77), (64, 64)][i % 6]
        photo(width, height, seed=seed + i).save(root / rel)
        question = QUESTIONS[i % len(QUESTIONS)]
        human = f"<image>\n{question}" if i % 3 else f"{question}\n<image>"
        records.append({"id": f"img-{i}", "image": rel, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "red"},
        ]})
        valid.append(f"img-{i}")
    records.insert(1, {"id": "text-only", "model": "", "conversations": [
        {"from": "human", "value": "what is a cat ?"}, {"from": "gpt", "value": "an animal"}]})
    records.insert(3, {"id": "missing", "image": "coco/train2017/does_not_exist.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a cat"}]})
    corrupt = root / "gqa/images/corrupt.jpg"
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    good = root / records[0]["image"]
    corrupt.write_bytes(good.read_bytes()[:300])  # a JPEG header, then nothing
    records.append({"id": "corrupt", "image": "gqa/images/corrupt.jpg", "conversations": [
        {"from": "human", "value": "<image>\nis there a dog ?"}, {"from": "gpt", "value": "no"}]})
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(records, indent=1))
    return {"valid": valid, "skipped": ["text-only", "missing", "corrupt"]}
