"""The lmms-eval plugin: lmms-eval's own POPE task (its YAML and utils.py, pointed at a local copy of a few dozen
questions of the bundled demo data) run offline by lmms-eval's evaluator with `--model blink_jax`, found through
the `lmms_eval.models` entry point. Its predictions must be `eval.run`'s for the same questions and mode, and its
scores what `eval.score` gives on the predictions lmms-eval logged."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import pytest

from eval import run as eval_run
from eval import score as eval_score
from eval.demo import DEMO

ROOT = Path(__file__).resolve().parents[1]
TASK = "pope_blink_local"
QUESTIONS = 30  # the first questions of the demo's random split


def pinned_version() -> str:
    return re.search(r'"lmms-eval==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def local_pope(tmp_path: Path) -> tuple[Path, Path]:
    """(data_dir, task_dir): the demo's first questions in POPE's release layout (for eval.run / eval.score), and
    lmms-eval's POPE task with its dataset swapped for the same questions saved with `datasets` as lmms-lab/POPE
    has them (question_id, question, answer, image, category)."""
    import datasets
    import lmms_eval

    source = DEMO.data_dir("pope")
    rows = [json.loads(line) for line in open(source / "coco_pope_random.json")][:QUESTIONS]
    data_dir = tmp_path / "pope"
    data_dir.mkdir()
    (data_dir / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data_dir / "val2014").symlink_to(source / "val2014")

    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image_source": datasets.Value("string"),
                                  "image": datasets.Image(), "category": datasets.Value("string")})
    table = {"question_id": [str(r["question_id"]) for r in rows], "question": [r["text"] for r in rows],
             "answer": [r["label"] for r in rows], "image_source": [r["image"] for r in rows],
             "image": [str(source / "val2014" / r["image"]) for r in rows], "category": ["random"] * len(rows)}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        str(tmp_path / "pope_hf"))

    pope = Path(lmms_eval.__file__).parent / "tasks" / "pope"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    shutil.copy(pope / "utils.py", task_dir / "utils.py")
    yaml = (pope / "pope.yaml").read_text()
    for old, new in (("dataset_path: lmms-lab-encoder/POPE\n", f"dataset_path: {tmp_path / 'pope_hf'}\n"),
                     ("dataset_kwargs:\n  token: True\n", "dataset_kwargs:\n  load_from_disk: True\n"),
                     ('task: "pope"\n', f'task: "{TASK}"\n')):
        assert yaml.count(old) == 1, f"lmms-eval's pope.yaml no longer has {old!r}: update this test"
        yaml = yaml.replace(old, new)
    (task_dir / f"{TASK}.yaml").write_text(yaml)
    return data_dir, task_dir


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    from huggingface_hub import constants
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lmms")
    data_dir, task_dir = local_pope(tmp)
    model_args = (f"pretrained={DEMO.model},mode=blink,tokensr={DEMO.tokensr},tau_exp={DEMO.tau_exp},"
                  f"tau_drop={DEMO.tau_drop},dtype={DEMO.dtype}")
    with pytest.MonkeyPatch.context() as offline:  # nothing may come from the network
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            offline.setenv(name, "1")
        offline.setattr(constants, "HF_HUB_OFFLINE", True)  # (huggingface_hub reads it at import)
        results = evaluator.simple_evaluate(
            model="blink_jax", model_args=model_args, tasks=[TASK], batch_size=8, log_samples=True,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return tmp, data_dir, results


def test_the_tested_lmms_eval_is_the_pinned_one_and_finds_the_plugin():
    from lmms_eval.models import get_model

    assert importlib.metadata.version("lmms-eval") == pinned_version()
    assert get_model("blink_jax").__module__ == "eval.lmms_plugin", \
        "the lmms_eval.models entry point is missing: reinstall blink-jax (pip install -e .)"


def test_lmms_eval_pope_answers_as_eval_run_and_scores_as_eval_score(lmms_run):
    tmp, data_dir, results = lmms_run
    samples = results["samples"][TASK]
    assert len(samples) == QUESTIONS
    predictions = {f"random/{s['doc']['question_id']}": s["filtered_resps"][0] for s in samples}

    # the same questions through eval.run, in the same mode: the same answers, question by question
    out = tmp / "eval_run"
    assert eval_run.main(["--bench", "pope", "--model", str(DEMO.model), "--data-dir", str(data_dir), "--out",
                          str(out), "--modes", "blink", "--tokensr", str(DEMO.tokensr), "--tau-exp", str(DEMO.tau_exp),
                          "--tau-drop", str(DEMO.tau_drop), "--dtype", DEMO.dtype, "--no-progress"]) == 0
    ours = {r["question_id"]: r["prediction"] for r in map(json.loads, open(out / "samples_pope_blink.jsonl"))}
    assert predictions == ours

    # lmms-eval's POPE scores an answer by exact match; on plain yes/no answers that is eval_pope.py's rule
    assert {p.lower() for p in predictions.values()} <= {"yes", "no"}
    samples_file = tmp / "lmms_samples.jsonl"
    samples_file.write_text("".join(json.dumps({"question_id": q, "prediction": p, "error": None}) + "\n"
                                    for q, p in predictions.items()))
    scores_file = tmp / "scores.json"
    assert eval_score.main(["--bench", "pope", "--samples", str(samples_file), "--data-dir", str(data_dir),
                            "--tfds-dir", str(tmp / "tfds"), "--out", str(scores_file)]) == 0
    official = json.loads(scores_file.read_text())["metrics"]["splits"]["random"]
    reported = results["results"][TASK]
    for lmms_name, ours_name in (("pope_accuracy", "accuracy"), ("pope_precision", "precision"),
                                 ("pope_recall", "recall"), ("pope_f1_score", "f1")):
        assert reported[f"{lmms_name},none"] == pytest.approx(official[ours_name], abs=1e-12), lmms_name
    # lmms-eval's "yes ratio" is the share of "yes" labels, not of "yes" answers as in eval_pope.py
    labels = [json.loads(line)["label"] for line in open(data_dir / "coco_pope_random.json")]
    assert reported["pope_yes_ratio,none"] == pytest.approx(labels.count("yes") / len(labels))
    assert 0 < official["accuracy"] < 1  # answers both right and wrong: the comparison can tell rules apart


@pytest.mark.parametrize("args, message", [
    ({"mesh": "gpu_8"}, "mesh='gpu_8': inference .* runs on one device"),
    ({"mode": "crop"}, "mode=crop .* runs in python -m eval.run --modes crop"),
    ({"mode": "blink"}, "mode 'blink' needs trained TokenSR"),
    ({"dtype": "int8"}, "dtype='int8' is unknown"),
    ({"batch_size": "auto"}, "--batch_size='auto' must be a number"),
    ({"device": "cuda:0"}, "JAX picks the device"),
    ({"tau": 0.3}, r"unknown model_args \['tau'\]"),
    ({"pretrained": None}, "lack pretrained="),
    ({"pretrained": "tiny-org/absent"}, "'tiny-org/absent' is neither a local directory"),
])
def test_model_args_are_checked(args, message, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from eval.lmms_plugin import BlinkJax

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        BlinkJax(**{"pretrained": str(DEMO.model), **args})
