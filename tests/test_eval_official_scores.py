"""`python -m eval.score` and `python -m eval.export` against hand-scored fixtures: a few saved predictions per
benchmark (an errored question among them) whose metrics are worked out by hand in the comments and written
here as literal numbers; the partial-run rules against the official releases' compositions; the submission
files read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny_benchmarks as tb
from eval import benchmarks
from eval import export as eval_export
from eval import score as eval_score
from eval.demo import DEMO
from eval.harness.results import markdown_table, results_document

ERROR = object()  # a question recorded as an error (unreadable image, ...)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def write_samples(path: Path, predictions: dict) -> Path:
    lines = [{"question_id": q, "prediction": None, "error": "ImageError: broken"} if p is ERROR else
             {"question_id": q, "prediction": p, "error": None} for q, p in predictions.items()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def rescore(capsys, bench: str, data: Path, samples: Path, tfds_dir) -> tuple[dict, str]:
    """eval.score's printed scores and its stderr."""
    capsys.readouterr()
    assert eval_score.main(["--bench", bench, "--samples", str(samples), "--data-dir", str(data),
                            "--tfds-dir", str(tfds_dir)]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


# ------------------------------------------------------------------------------------------------ POPE


def test_pope_by_hand(tmp_path, tfds_dir, capsys):
    tb.make_pope(tmp_path / "data", corrupt=False)
    samples = write_samples(tmp_path / "samples_pope_blink.jsonl", {
        # random (labels yes, no, yes, no): TP, error on a "no" -> FP, FN ("No, there is not."), TN
        "random/1": "Yes", "random/2": ERROR, "random/3": "No, there is not.", "random/4": "no",
        # popular (labels no, yes, yes): TN, TP, error on a "yes" -> FN
        "popular/1": "No", "popular/2": "Yes", "popular/3": ERROR,
        # adversarial (labels no, yes): TN, FN: never "yes" -> precision undefined, recall 0, F1 0
        "adversarial/1": "No", "adversarial/2": "No",
    })
    scores, err = rescore(capsys, "pope", tmp_path / "data", samples, tfds_dir)
    s = scores["metrics"]["splits"]
    assert s["random"] == {"n": 4, "TP": 1, "FP": 1, "TN": 1, "FN": 1, "accuracy": 0.5, "precision": 0.5,
                           "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    assert (s["popular"]["TP"], s["popular"]["FP"], s["popular"]["TN"], s["popular"]["FN"]) == (1, 0, 1, 1)
    assert s["popular"]["precision"] == 1.0 and s["popular"]["recall"] == 0.5
    assert s["popular"]["f1"] == pytest.approx(0.666667, abs=1e-6)  # 2 * 1 * 0.5 / 1.5
    assert s["adversarial"]["precision"] is None and s["adversarial"]["recall"] == 0.0 and s["adversarial"]["f1"] == 0.0
    average = scores["metrics"]["average"]
    assert average["f1"] == pytest.approx(0.388889, abs=1e-6)  # (0.5 + 2/3 + 0) / 3 = 7/18
    assert average["accuracy"] == pytest.approx(0.555556, abs=1e-6)  # (1/2 + 2/3 + 1/2) / 3
    assert average["precision"] is None
    assert scores["headline"]["POPE"] == pytest.approx(38.8889, abs=1e-4)
    assert scores["counts"] == {"questions": 9, "answered": 7, "errors": 2, "missing": 0, "unknown_ids": 0}
    assert {e["question_id"] for e in scores["errors"]} == {"random/2", "popular/3"}
    assert scores["coverage"] == {"data_set": "POPE", "complete": False, "partial": [
        "split random: 4 of the official release's 3000 or 2910 questions",
        "split popular: 3 of the official release's 3000 questions",
        "split adversarial: 2 of the official release's 3000 questions"]}
    assert "partial" in err and "2 errored question(s) count as wrong" in err

    # results.md: the partial run's headline carries the word beside the paper's number; undefined is "n/a"
    doc = results_document(benchmarks.get("pope"), [{"name": "blink", "kind": "blink", "label": "Blink",
                                                     "settings": {}, "score": scores}], {}, {})
    table = markdown_table(doc)
    assert doc["partial"] is True
    assert "| POPE | 38.89 (partial) | 85.23 |" in table and "**Partial run** (Blink)" in table
    assert "| splits.adversarial.precision | n/a |" in table
    assert "count as wrong in every metric: Blink 2" in table


def test_pope_label_other_than_yes_no_is_refused(tmp_path, tfds_dir):
    tb.make_pope(tmp_path, corrupt=False)
    path = tmp_path / "coco_pope_popular.json"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"label": "yes"', '"label": "Yes "')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(benchmarks.DataError, match=r"coco_pope_popular.json:2: label 'Yes ' is not 'yes' or 'no'.*"
                                                   r"correct that line"):
        benchmarks.load_docs(benchmarks.get("pope"), tmp_path, tfds_dir)


def test_pope_composition_of_the_official_releases():
    pope = benchmarks.get("pope")
    docs = lambda random, popular, adversarial: ([{"subset": "random"}] * random + [{"subset": "popular"}] * popular
                                                 + [{"subset": "adversarial"}] * adversarial)
    assert pope.composition(docs(3000, 3000, 3000)) == []
    assert pope.composition(docs(2910, 3000, 3000)) == []  # the older POPE that LLaVA-1.5 evaluated
    assert pope.composition(docs(3000, 0, 0)) == ["split popular: 0 of the official release's 3000 questions",
                                                  "split adversarial: 0 of the official release's 3000 questions"]
    assert pope.composition(docs(3000, 2999, 3000)) == ["split popular: 2999 of the official release's 3000 questions"]


def test_the_demo_shapes_set_is_its_own_data_set(tmp_path, tfds_dir):
    tb.make_pope(tmp_path, corrupt=False)  # 4, 3, 2 questions per split
    (tmp_path / "shapes_annotations.json").write_text(json.dumps({"n_images": 2, "questions_per_image": 2}))
    pope = benchmarks.get("pope")
    docs = benchmarks.load_docs(pope, tmp_path, tfds_dir)
    assert pope.data_set(docs) == "the demo shapes set (POPE's layout)"
    assert pope.composition(docs) == ["split popular: 3 of the demo shapes set's 4",
                                      "split adversarial: 2 of the demo shapes set's 4"]


@pytest.mark.skipif(bool(DEMO.missing()), reason="the demo/ folder is not bundled in this checkout")
def test_the_bundled_demo_set_is_complete_as_its_own_data_set(tfds_dir):
    pope = benchmarks.get("pope")
    docs = benchmarks.load_docs(pope, DEMO.data_dir("pope"), tfds_dir)
    assert len(docs) == 900 and pope.composition(docs) == []  # 150 images x 2 questions, per split
    assert pope.data_set(docs) == "the demo shapes set (POPE's layout)"
    assert pope.composition(pope.limit(docs, 6))[0] == "split random: 6 of the demo shapes set's 300"


# ------------------------------------------------------------------------------------------------- MME


def test_mme_by_hand(tmp_path, tfds_dir, capsys):
    tb.make_mme(tmp_path / "data")
    samples = write_samples(tmp_path / "samples_mme_vanilla.jsonl", {
        # existence: image 1 both right; image 2 errored (wrong) + right: acc 3/4, acc+ 1/2 -> 125
        "existence/000000006040.jpg#0": "Yes", "existence/000000006040.jpg#1": "No",
        "existence/000000018150.jpg#0": ERROR, "existence/000000018150.jpg#1": "no",
        # artwork (yes, no): right, wrong: acc 1/2, acc+ 0 -> 50
        "artwork/10002.jpg#0": "Yes", "artwork/10002.jpg#1": "Yes",
        # code_reasoning (yes, no): "Yes, it is" -> yes (first 4 characters); "I think no" -> other: 50
        "code_reasoning/0020.png#0": "Yes, it is", "code_reasoning/0020.png#1": "I think no",
    })
    scores, _ = rescore(capsys, "mme", tmp_path / "data", samples, tfds_dir)
    tasks = scores["metrics"]["subtasks"]
    assert tasks["existence"] == {"n": 4, "images": 2, "acc": 0.75, "acc_plus": 0.5, "other": 1, "score": 125.0}
    assert tasks["artwork"]["score"] == 50.0 and tasks["code_reasoning"]["score"] == 50.0
    assert scores["headline"] == {"MME Perception": 175.0, "MME Cognition": 50.0, "MME total": 225.0}
    assert scores["counts"]["errors"] == 1 and scores["coverage"]["complete"] is False
    assert scores["coverage"]["partial"][0].startswith("11 of the 14 subtasks absent (count, position, color,")
    assert "subtask existence: 4 of the official release's 60" in scores["coverage"]["partial"]


def test_mme_composition_of_the_release():
    # MME_Benchmark_release_version: questions per subtask (two per image), 2374 in all
    release = {"existence": 60, "count": 60, "position": 60, "color": 60, "posters": 294, "celebrity": 340,
               "scene": 400, "landmark": 400, "artwork": 400, "OCR": 40, "commonsense_reasoning": 140,
               "numerical_calculation": 40, "text_translation": 40, "code_reasoning": 40}
    assert sum(release.values()) == 2374
    docs = [{"subset": task} for task, n in release.items() for _ in range(n)]
    mme = benchmarks.get("mme")
    assert mme.composition(docs) == []
    assert mme.composition(docs[2:]) == ["subtask existence: 58 of the official release's 60"]


# ------------------------------------------------------------------------------------------------- GQA


def test_gqa_by_hand(tmp_path, tfds_dir, capsys):
    tb.make_gqa(tmp_path / "data")
    samples = write_samples(tmp_path / "samples_gqa_blink.jsonl", {
        "201307251": "Yes.",  # verify, "yes": right
        "201640614": ERROR,  # query, "red": wrong
        "202225914": "Dog",  # query, "dog": right
    })
    scores, _ = rescore(capsys, "gqa", tmp_path / "data", samples, tfds_dir)
    assert scores["metrics"]["accuracy"] == pytest.approx(0.666667, abs=1e-6)
    assert scores["metrics"]["open"] == 0.5 and scores["metrics"]["binary"] == 1.0 and scores["metrics"]["n"] == 3
    assert scores["headline"]["GQA"] == pytest.approx(66.6667, abs=1e-4)
    assert scores["coverage"]["partial"] == ["balanced questions: 3 of the official release's 12578"]


# --------------------------------------------------------------------------------------------- MMBench


@pytest.mark.parametrize("cn", [False, True])
def test_mmbench_by_hand_and_its_submission_file(tmp_path, tfds_dir, capsys, cn):
    import openpyxl

    name = "mmbench_cn" if cn else "mmbench"
    tb.make_mmbench(tmp_path / "data", cn=cn)
    samples = write_samples(tmp_path / f"samples_{name}_blink.jsonl", {
        "0": "A", "1000000": "C",  # question 0 and its rotation: both right -> right
        "1": ERROR,  # question 1: errored -> wrong
        "2": "B",  # question 2: right
    })
    scores, _ = rescore(capsys, name, tmp_path / "data", samples, tfds_dir)
    m = scores["metrics"]
    assert m["accuracy"] == 0.75 and m["circular_accuracy"] == pytest.approx(0.666667, abs=1e-6)
    assert m["questions"] == 3 and m["incomplete_questions"] == 0
    assert scores["headline"]["MMBench-CN" if cn else "MMBench"] == pytest.approx(66.6667, abs=1e-4)

    # a rotation without an answer: question 0 is not right (2 of its 2 rows needed), and the run is partial
    partial = write_samples(tmp_path / f"samples_{name}_interp.jsonl", {"0": "A", "1": "B", "2": "B"})
    scores, _ = rescore(capsys, name, tmp_path / "data", partial, tfds_dir)
    assert scores["metrics"]["circular_accuracy"] == pytest.approx(0.666667, abs=1e-6)
    assert scores["metrics"]["incomplete_questions"] == 1
    assert "1 of the 4 questions have no answer in the samples file" in scores["coverage"]["partial"]

    # the server's xlsx, as convert_mmbench_for_submission.py writes it: TSV columns without hint, category,
    # l2-category and image; `prediction` 7th; "nan" cells empty; the errored question's prediction empty
    assert eval_export.main(["--bench", name, "--samples", str(samples), "--data-dir", str(tmp_path / "data"),
                             "--tfds-dir", str(tfds_dir), "--out", str(tmp_path / "upload")]) == 0
    sheet = openpyxl.load_workbook(tmp_path / "upload" / f"{name}_blink.xlsx").active
    assert [list(row) for row in sheet.iter_rows(values_only=True)] == [
        ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"],
        [0, "What colour is the circle?", "red", "green", "blue", None, "A", "A", "dev"],
        [1000000, "What colour is the circle?", "green", "blue", "red", None, "C", "C", "dev"],
        [1, "How many dogs are there?", "one", "two", "three", "four", None, "B", "dev"],
        [2, "Which animal is shown?", "cat", "dog", None, None, "B", "B", "dev"],
    ]


def test_mmbench_limit_keeps_every_rotation(tmp_path, tfds_dir):
    tb.make_mmbench(tmp_path)
    bench = benchmarks.get("mmbench")
    docs = benchmarks.load_docs(bench, tmp_path, tfds_dir)
    assert [d["question_id"] for d in bench.limit(docs, 1)] == ["0", "1000000"]
    assert bench.composition(docs) == ["questions in mmbench_dev_20230712.tsv: 3 of the official release's 1164"]
    assert bench.composition(bench.limit(docs, 1)) == [
        "questions: 1 of mmbench_dev_20230712.tsv's 3",
        "questions in mmbench_dev_20230712.tsv: 3 of the official release's 1164"]
    # a file whose official count we do not know: complete when all of it is asked
    cn = benchmarks.get("mmbench_cn")
    tb.make_mmbench(tmp_path / "cn", cn=True)
    cn_docs = benchmarks.load_docs(cn, tmp_path / "cn", tfds_dir)
    assert cn.composition(cn_docs) == [] and cn.composition(cn.limit(cn_docs, 2)) == [
        "questions: 2 of mmbench_dev_cn_20231003.tsv's 3"]


# ------------------------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("five, seven, accuracy, failed", [
    ("B", ERROR, 0.5, 1),  # right; errored -> wrong
    ("The answer is B.", "The answer is A,", 1.0, 0),  # one match each (the dot matches any character)
    ("The answer is B", "A\nB", 0.0, 2),  # no match; not a bare letter
    ("The answer is B. The answer is B.", "A. red", 0.5, 1),  # two matches; "X. " opening
    ("C", "A", 0.5, 0),  # "C" is no option of a two-choice question: wrong, though parsed
])
def test_scienceqa_by_hand(tmp_path, tfds_dir, capsys, five, seven, accuracy, failed):
    tb.make_scienceqa(tmp_path / "data")  # question 5: answer B of 2; question 7: answer A of 3
    samples = write_samples(tmp_path / "samples_scienceqa_blink.jsonl", {"5": five, "7": seven})
    scores, _ = rescore(capsys, "scienceqa", tmp_path / "data", samples, tfds_dir)
    assert scores["metrics"] == {"accuracy": accuracy, "n": 2, "failed": failed}
    assert scores["headline"]["ScienceQA"] == 100 * accuracy


def test_scienceqa_prompt_has_no_doubled_spaces():
    doc = {"hint": "The  circle is  red.", "question": "Which  colour is it? ", "options": ["red", "two  words"]}
    assert benchmarks.get("scienceqa").doc_to_text(doc) == (
        "Context: The circle is red.\nWhich colour is it? \nA. red\nB. two words\n"
        "Answer with the option's letter from the given choices directly.")


# ---------------------------------------------------------------------------------------------- MM-Vet


def test_mmvet_scores_nothing_and_exports_every_id(tmp_path, tfds_dir, capsys):
    tb.make_mmvet(tmp_path / "data")
    samples = write_samples(tmp_path / "samples_mmvet_blink.jsonl", {"v1_1": ERROR})
    scores, _ = rescore(capsys, "mmvet", tmp_path / "data", samples, tfds_dir)
    assert scores["headline"] == {"MM-Vet": None} and scores["metrics"]["answered"] == 0
    assert scores["counts"] == {"questions": 2, "answered": 0, "errors": 1, "missing": 1, "unknown_ids": 0}
    assert eval_export.main(["--bench", "mmvet", "--samples", str(samples), "--data-dir", str(tmp_path / "data"),
                             "--tfds-dir", str(tfds_dir)]) == 0
    # the evaluator looks every question up: the errored and the unanswered one are there, empty
    assert json.loads((tmp_path / "mmvet_blink.json").read_text()) == {"v1_0": "", "v1_1": ""}
