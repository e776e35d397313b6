"""The LLaVA-1.5 instruction mix (`llava_v1_5_mix665k.json`) as a tensorflow-datasets builder.

Written as array_record and read with `builder.as_data_source()`, so neither needs TensorFlow. The manual
directory holds the annotation file and the image folders it refers to:

    <manual_dir>/llava_v1_5_mix665k.json
    <manual_dir>/coco/train2017/  gqa/images/  ocr_vqa/images/  textvqa/train_images/  vg/VG_100K{,_2}/

Each annotation is `{"id", "image" (relative path, absent for text-only samples), "conversations": [{"from":
"human"|"gpt", "value"}, ...]}`. Kept per example: its id, the image path, the image file's bytes exactly as
stored (decoded at training time), the first human turn without the `<image>` placeholder (the question SGS
scans with) and the whole conversation as JSON. Text-only samples are skipped; a missing or undecodable image
is logged and skipped, never an error.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

ANNOTATION_FILE = "llava_v1_5_mix665k.json"
IMAGE_PLACEHOLDER = "<image>"
log = logging.getLogger(__name__)


def first_question(conversations: list[dict]) -> str | None:
    """The first human turn with `<image>` (and the newline next to it) removed."""
    for turn in conversations:
        if turn.get("from") == "human":
            text = str(turn.get("value", ""))
            text = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace("\n" + IMAGE_PLACEHOLDER, "")
            return text.replace(IMAGE_PLACEHOLDER, "").strip()
    return None


def check_image(data: bytes) -> str | None:
    """None if `data` decodes as an image, else PIL's complaint. JPEGs decode at 1/8 scale (`draft`): the
    whole entropy-coded stream is still read, so truncation is caught at a fraction of the cost."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


class LlavaMix(tfds.core.GeneratorBasedBuilder):
    """LLaVA-1.5's 665k instruction-tuning mix, image samples only."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Image samples of llava_v1_5_mix665k.json; image bytes as stored."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {ANNOTATION_FILE} (huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K) in one folder, "
        "with the images under coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images, vg/VG_100K and "
        "vg/VG_100K_2, as in LLaVA's docs/Data.md; pass it as --data-dir."
    )
    # No checksums file to find: tfds' lookup of one needs `importlib_resources`, absent on Python >= 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA-1.5 instruction mix (image samples), for TokenSR training.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image_path": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes
                "question": tfds.features.Text(),
                "conversations": tfds.features.Text(),  # JSON
            }),
            homepage="https://github.com/haotian-liu/LLaVA",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        annotation = root / ANNOTATION_FILE
        if not annotation.is_file():
            raise FileNotFoundError(f"{annotation} does not exist. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {"train": self._generate_examples(root, annotation)}

    def _generate_examples(self, root: Path, annotation: Path):
        try:
            records = json.loads(annotation.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{annotation} is not valid JSON ({e}): download it again") from None
        counts = {"kept": 0, "text-only": 0, "missing image": 0, "corrupt image": 0, "no question": 0}
        for index, record in enumerate(records):
            rel = record.get("image")
            if not rel:
                counts["text-only"] += 1
                continue
            path = root / rel
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("skipping sample %s: image %s cannot be read (%s)", record.get("id"), path, e.strerror)
                counts["missing image"] += 1
                continue
            problem = check_image(data)
            if problem is not None:
                log.warning("skipping sample %s: image %s does not decode (%s)", record.get("id"), path, problem)
                counts["corrupt image"] += 1
                continue
            conversations = record.get("conversations") or []
            question = first_question(conversations)
            if question is None:
                counts["no question"] += 1
                continue
            counts["kept"] += 1
            yield index, {
                "id": str(record.get("id", index)),
                "image_path": str(rel),
                "image": data,
                "question": question,
                "conversations": json.dumps(conversations, ensure_ascii=False),
            }
        log.info("%s: %s", annotation, ", ".join(f"{k} {v}" for k, v in counts.items()))


def builder(data_dir: str | os.PathLike) -> LlavaMix:
    return LlavaMix(data_dir=str(data_dir), file_format="array_record")


def prepare(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> LlavaMix:
    """Builds the array_record files under `data_dir` from `manual_dir` unless they are already there."""
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {manual_dir} is not a directory. {LlavaMix.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    b = builder(data_dir)
    prepared = (Path(b.data_dir) / "dataset_info.json").exists()
    if not prepared and not (manual_dir / ANNOTATION_FILE).is_file():  # before tfds creates any folder
        raise FileNotFoundError(f"--data-dir {manual_dir} has no {ANNOTATION_FILE}: it is not the LLaVA-1.5 mix "
                                f"folder. {LlavaMix.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if not prepared:
        log.info("reading the LLaVA mix of %s into %s (once: later runs reuse it)", manual_dir, data_dir)
    # stdout muted: tfds prints "Downloading and preparing ... Unknown size" though nothing is downloaded
    with contextlib.redirect_stdout(io.StringIO()):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return b


def data_source(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *, build: bool = True):
    """The `train` split as a random-access data source (records are dicts of bytes / numpy)."""
    b = prepare(manual_dir, data_dir) if build else builder(data_dir)
    return b.as_data_source(split="train")
