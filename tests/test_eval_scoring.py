"""Each benchmark's builder, prompt and scorer against hand-computed numbers on tiny release-layout fixtures."""

from __future__ import annotations

import json

import pytest

import tiny_benchmarks as tb
from blink_jax.processing import build_prompt
from eval import benchmarks
from eval.benchmarks.mmbench import extract_option
from eval.benchmarks.mme import parse_pred_ans
from demo.pope import parse_yes_no
from eval.benchmarks.scienceqa import parse_answer, pred_index
from eval.harness.io import append_lines, open_append_jsonl, read_jsonl
from eval.harness.paper import paper_value
from eval.harness.results import answered_results, markdown_table, results_document, score_records

SHORT = "Answer the question using a single word or phrase."


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def load(name, data_dir, tfds_dir):
    bench = benchmarks.get(name)
    return bench, {d["question_id"]: d for d in benchmarks.load_docs(bench, data_dir, tfds_dir)}


def score(bench, docs, predictions: dict[str, str]):
    records = [{"question_id": q, "prediction": p, "error": None} for q, p in predictions.items()]
    return score_records(bench, docs, records)


# ------------------------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize("text, expected", [
    ("No.", "no"), ("not sure", "no"), ("Yes, there is", "yes"), ("Yes", "yes"), ("no", "no"),
    ("Yes, there is no dog.", "no"),  # "no" before the first '.'
    ("There is a dog. No.", "yes"),  # only the first sentence counts
    ("No,there", "yes"),  # ',' is dropped, not split on: "Nothere"
    ("NO", "yes"), ("Nope", "yes"), ("", "yes"),  # case-sensitive words; anything else is "yes"
])
def test_pope_parse_matches_eval_pope(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_scores_by_hand(tmp_path, tfds_dir):
    tb.make_pope(tmp_path, corrupt=False, in_coco_folder=True)
    bench, docs = load("pope", tmp_path, tfds_dir)
    assert len(docs) == 9 and docs["random/1"]["image_file"] == "val2014/COCO_val2014_000000000001.jpg"
    # random labels: yes no yes no -> parsed yes, no, no, yes: TP=1 TN=1 FN=1 FP=1.
    # popular labels: no yes yes -> parsed no, no, yes: TN=1 FN=1 TP=1.
    # adversarial labels: no yes -> parsed yes, yes: FP=1 TP=1.
    scores = score(bench, docs, {
        "random/1": "Yes, there is", "random/2": "No.", "random/3": "not sure", "random/4": "Yes",
        "popular/1": "no", "popular/2": "No, there is not.", "popular/3": "yes",
        "adversarial/1": "There is a cat. No.", "adversarial/2": "",
    })
    s = scores["metrics"]["splits"]
    assert (s["random"]["TP"], s["random"]["TN"], s["random"]["FP"], s["random"]["FN"]) == (1, 1, 1, 1)
    assert s["random"]["accuracy"] == pytest.approx(0.5) and s["random"]["f1"] == pytest.approx(0.5)
    assert s["random"]["yes_ratio"] == pytest.approx(0.5)
    assert s["popular"]["precision"] == pytest.approx(1.0) and s["popular"]["recall"] == pytest.approx(0.5)
    assert s["popular"]["f1"] == pytest.approx(2 / 3) and s["popular"]["accuracy"] == pytest.approx(2 / 3)
    assert s["popular"]["yes_ratio"] == pytest.approx(1 / 3)
    assert s["adversarial"]["precision"] == pytest.approx(0.5) and s["adversarial"]["recall"] == pytest.approx(1.0)
    assert s["adversarial"]["f1"] == pytest.approx(2 / 3) and s["adversarial"]["yes_ratio"] == pytest.approx(1.0)
    avg = scores["metrics"]["average"]
    assert avg["f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert avg["accuracy"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert scores["headline"]["POPE"] == pytest.approx(100 * avg["f1"])
    assert scores["counts"] == {"questions": 9, "answered": 9, "errors": 0, "missing": 0, "unknown_ids": 0}


def test_pope_undefined_precision_is_none_not_zero(tmp_path, tfds_dir):
    tb.make_pope(tmp_path, corrupt=False)
    bench, docs = load("pope", tmp_path, tfds_dir)
    # popular/1, random/2: labels no, answered no: all TN -> no positive anywhere: precision, recall, F1 undefined.
    # adversarial: labels no, yes, answered no, no: TN=1 FN=1 -> precision undefined, recall 0, F1 0.
    scores = score(bench, docs, {"popular/1": "No", "random/2": "no", "adversarial/1": "No", "adversarial/2": "No"})
    s = scores["metrics"]["splits"]
    assert s["popular"]["precision"] is None and s["popular"]["recall"] is None and s["popular"]["f1"] is None
    assert s["popular"]["accuracy"] == 1.0 and s["popular"]["yes_ratio"] == 0.0
    assert s["adversarial"]["precision"] is None and s["adversarial"]["recall"] == 0.0
    assert s["adversarial"]["f1"] == 0.0 and s["adversarial"]["accuracy"] == 0.5
    assert scores["metrics"]["average"]["precision"] is None  # undefined in one split: undefined on average
    assert scores["counts"]["missing"] == 5 and set(s) == {"random", "popular", "adversarial"}
    doc = results_document(bench, [{"name": "vanilla", "kind": "vanilla", "label": "Vanilla", "settings": {},
                                    "score": scores}], {}, {})
    assert "| splits.popular.precision | n/a |" in markdown_table(doc)


def test_pope_prompt_is_llava_eval_prompt(tmp_path, tfds_dir):
    tb.make_pope(tmp_path, corrupt=False)
    bench, docs = load("pope", tmp_path, tfds_dir)
    assert build_prompt(bench.doc_to_text(docs["random/1"]), suffix=None) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs there a dog in the image?\n"
        "Answer the question using a single word or phrase. ASSISTANT:")


# ------------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("nope", "no"), ("", "other"), ("No", "no"), ("Yes, it is", "yes"),
    ("Not really", "no"), ("I don't know", "other"), ("unknown", "other"), ("Maybe yes", "other"),
])
def test_mme_parse_matches_calculation_py(text, expected):
    assert parse_pred_ans(text) == expected


def test_mme_release_layout_and_scores_by_hand(tmp_path, tfds_dir):
    ids = tb.make_mme(tmp_path, release_folder=True)
    bench, docs = load("mme", tmp_path, tfds_dir)
    assert list(docs) == ids
    assert docs["artwork/10002.jpg#0"]["image_file"] == "MME_Benchmark_release_version/artwork/images/10002.jpg"
    assert bench.doc_to_text(docs["existence/000000006040.jpg#0"]) == f"Is there a dog in this image?\n{SHORT}"
    scores = score(bench, docs, {
        # existence: image 1 both right; image 2 both wrong ("nope" -> no, "" -> other): acc 2/4, acc+ 1/2 -> 100
        "existence/000000006040.jpg#0": "Yes", "existence/000000006040.jpg#1": "no",
        "existence/000000018150.jpg#0": "nope", "existence/000000018150.jpg#1": "",
        # artwork: one right: acc 1/2, acc+ 0 -> 50
        "artwork/10002.jpg#0": "yes.", "artwork/10002.jpg#1": "Yes",
        # code_reasoning (cognition): both right -> 200
        "code_reasoning/0020.png#0": "Yes", "code_reasoning/0020.png#1": "No",
    })
    m = scores["metrics"]
    assert m["subtasks"]["existence"]["score"] == pytest.approx(100.0)
    assert m["subtasks"]["existence"]["other"] == 1
    assert m["subtasks"]["artwork"]["score"] == pytest.approx(50.0)
    assert m["subtasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert m["perception"] == pytest.approx(150.0) and m["cognition"] == pytest.approx(200.0)
    assert scores["headline"] == {"MME Perception": pytest.approx(150.0), "MME Cognition": pytest.approx(200.0),
                                  "MME total": pytest.approx(350.0)}
    assert "OCR" in m["missing_subtasks"]


def test_mme_limit_keeps_whole_images(tmp_path, tfds_dir):
    tb.make_mme(tmp_path)
    bench, docs = load("mme", tmp_path, tfds_dir)
    kept = [d["question_id"] for d in bench.limit(list(docs.values()), 1)]
    assert kept == ["existence/000000006040.jpg#0", "existence/000000006040.jpg#1", "artwork/10002.jpg#0",
                    "artwork/10002.jpg#1", "code_reasoning/0020.png#0", "code_reasoning/0020.png#1"]


# Lines in the format of LLaVA-1.5's playground/data/eval/MME/llava_mme.jsonl, written out by hand: the question
# the release's .txt holds (left), the prompt text LLaVA asked (right).
LLAVA_MME_LINES = [
    ("Is a python code shown in the picture? Please answer yes or no.",
     '{"question_id": "code_reasoning/0020.png", "image": "code_reasoning/0020.png", "text": "Is a python code '
     'shown in the picture?\\nAnswer the question using a single word or phrase.", "category": "code_reasoning"}'),
    ("Are there two dogs in the image? Please answer yes or no.",
     '{"question_id": "count/000000000001.jpg", "image": "count/000000000001.jpg", "text": "Are there two dogs in '
     'the image?\\nAnswer the question using a single word or phrase.", "category": "count"}'),
    ("Is the word in the logo \"high time coffee shop\"? Please answer yes or no.",
     '{"question_id": "OCR/0001.jpg", "image": "OCR/0001.jpg", "text": "Is the word in the logo \\"high time coffee '
     'shop\\"?\\nAnswer the question using a single word or phrase.", "category": "OCR"}'),
]


@pytest.mark.parametrize("question, line", LLAVA_MME_LINES)
def test_mme_prompt_is_llava_mme_jsonl(question, line):
    from eval.benchmarks.mme import Mme

    expected = json.loads(line)["text"]
    assert Mme().doc_to_text({"question": question}) == expected
    assert Mme().doc_to_text({"question": question + " "}) == expected  # the release's stray trailing space
    assert Mme(raw_question=True).doc_to_text({"question": question}) == question  # the option: as released


def test_mme_image_without_two_questions_is_refused(tmp_path, tfds_dir):
    tb.make_mme(tmp_path)
    (tmp_path / "code_reasoning" / "0020.txt").write_text("Is the output two? Please answer yes or no.\tYes\n")
    with pytest.raises(benchmarks.DataError, match=r"0020.txt has 1 question line.*restore"):
        benchmarks.load_docs(benchmarks.get("mme"), tmp_path, tfds_dir)


# ------------------------------------------------------------------------------------------------- GQA


def test_gqa_exact_match(tmp_path, tfds_dir):
    tb.make_gqa(tmp_path)
    bench, docs = load("gqa", tmp_path, tfds_dir)
    assert set(docs) == {"201307251", "201640614", "202225914"}  # the unbalanced question is left out
    assert docs["201640614"]["image_file"] == "images/n235859.jpg"
    scores = score(bench, docs, {"201307251": "Yes.", "201640614": "Red", "202225914": "a dog"})
    m = scores["metrics"]
    assert m["accuracy"] == pytest.approx(2 / 3) and m["open"] == pytest.approx(0.5) and m["binary"] == 1.0
    assert scores["headline"]["GQA"] == pytest.approx(200 / 3)
    assert bench.doc_to_text(docs["201307251"]) == f"Is it a dog?\n{SHORT}"


# --------------------------------------------------------------------------------------------- MMBench


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B.", "B"), ("The answer is C", "C"), ("(B) green", "B"), ("red", "A"), ("A or B", None),
    ("none of these", None),
])
def test_mmbench_option_extraction(text, expected):
    assert extract_option(text, {"A": "red", "B": "green", "C": "blue"}) == expected


@pytest.mark.parametrize("cn", [False, True])
def test_mmbench_tsv_prompt_and_circular_accuracy(tmp_path, tfds_dir, cn):
    tb.make_mmbench(tmp_path, cn=cn)
    bench, docs = load("mmbench_cn" if cn else "mmbench", tmp_path, tfds_dir)
    assert list(docs) == ["0", "1000000", "1", "2"]
    assert docs["2"]["image_bytes"] == docs["1"]["image_bytes"]  # row 2 points at row 1's image
    assert bench.load_image(docs["2"], tmp_path).size == (32, 24)
    suffix = "请直接回答选项字母。" if cn else "Answer with the option's letter from the given choices directly."
    assert bench.doc_to_text(docs["1"]) == (
        f"Look closely.\nHow many dogs are there?\nA. one\nB. two\nC. three\nD. four\n{suffix}")
    assert bench.doc_to_text(docs["2"]) == f"Which animal is shown?\nA. cat\nB. dog\n{suffix}"
    # question 0 and its circular copy 1000000: the copy is wrong -> the question is wrong.
    scores = score(bench, docs, {"0": "A", "1000000": "A", "1": "B", "2": "dog"})
    m = scores["metrics"]
    assert m["accuracy"] == pytest.approx(3 / 4) and m["circular_accuracy"] == pytest.approx(2 / 3)
    assert m["questions"] == 3 and m["categories"]["color"] == 0.0
    assert scores["headline"]["MMBench-CN" if cn else "MMBench"] == pytest.approx(200 / 3)
    # Paired comparisons count the same unit: a question with its rotations.
    results = answered_results(bench, docs, {q: {"prediction": p} for q, p in
                                             {"0": "A", "1000000": "A", "1": "B", "2": "dog"}.items()})
    units = bench.correctness(results)
    assert len(units) == m["questions"] and sum(units.values()) / len(units) == pytest.approx(m["circular_accuracy"])
    # A question whose circular copy was not answered (an error) has no verdict: left out of paired comparisons.
    del results["1000000"]
    assert "0" not in bench.correctness(results, docs) and len(bench.correctness(results, docs)) == 2


# ------------------------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B. dog", "B"), ("The answer is A.", "A"), ("So, The answer is C. Yes.", "C"),
    ("The answer is B,", "B"),  # the script's dot is unescaped: any character after the letter
    ("The answer is B", "FAILED"),  # nothing after the letter: no match
    ("I think The answer is C", "FAILED"),
    ("The answer is A. The answer is B.", "FAILED"), ("The answer is A. The answer is A.", "FAILED"),  # two matches
    ("A\nB", "FAILED"), ("B\n", "FAILED"), (" B", "FAILED"),  # nothing stripped, no newline rewritten
    ("A.", "FAILED"), ("a", "FAILED"), ("\nB", "FAILED"), ("dog", "FAILED"),
])
def test_scienceqa_parse_matches_eval_science_qa(text, letter):
    assert parse_answer(text) == letter


def test_scienceqa_img_scores_by_hand(tmp_path, tfds_dir):
    tb.make_scienceqa(tmp_path)
    bench, docs = load("scienceqa", tmp_path, tfds_dir)
    assert list(docs) == ["5", "7"]  # test questions with an image only
    assert bench.doc_to_text(docs["7"]) == ("Context: Look at the circle.\nWhich colour is red?\nA. red\nB. green\n"
                                           "C. blue\nAnswer with the option's letter from the given choices directly.")
    assert bench.doc_to_text(docs["5"]).startswith("Which animal is a dog?\nA. cat\nB. dog\n")
    assert pred_index("C", 2) == -1  # a letter beyond the question's options is wrong
    scores = score(bench, docs, {"5": "B", "7": "A."})
    assert scores["metrics"] == {"accuracy": 0.5, "n": 2, "failed": 1}
    assert scores["headline"]["ScienceQA"] == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------- MM-Vet


def test_mmvet_submission_format(tmp_path, tfds_dir):
    tb.make_mmvet(tmp_path / "data")
    bench, docs = load("mmvet", tmp_path / "data", tfds_dir)
    assert bench.doc_to_text(docs["v1_1"]) == "What colour is the circle?"  # no suffix: long answers
    samples = [{"question_id": "v1_0", "prediction": "A dog on grass.", "error": None},
               {"question_id": "v1_1", "prediction": None, "error": "ImageError: ..."}]
    (path,) = bench.export(samples, docs, tmp_path, "blink")
    # every id: the errored one with an empty answer, so MM-Vet's evaluator finds each of its questions
    assert path.name == "mmvet_blink.json" and json.loads(path.read_text()) == {"v1_0": "A dog on grass.", "v1_1": ""}
    assert score(bench, docs, {"v1_0": "x"})["headline"] == {"MM-Vet": None}
    assert bench.correctness(answered_results(bench, docs, {"v1_0": {"prediction": "x"}})) is None  # judged elsewhere


# ------------------------------------------------------------------------------------------ harness bits


def test_errors_and_retries_are_counted_once(tmp_path, tfds_dir):
    tb.make_pope(tmp_path, corrupt=False)
    bench, docs = load("pope", tmp_path, tfds_dir)
    records = [{"question_id": "random/1", "prediction": None, "error": "ImageError: bad"},
               {"question_id": "random/2", "prediction": "No", "error": None},
               {"question_id": "random/1", "prediction": "Yes", "error": None},  # retried: the last line wins
               {"question_id": "random/3", "prediction": None, "error": "ImageError: gone"},
               {"question_id": "elsewhere/1", "prediction": "Yes", "error": None}]
    scores = score_records(bench, docs, records)
    assert scores["counts"] == {"questions": 9, "answered": 2, "errors": 1, "missing": 6, "unknown_ids": 1}
    assert scores["errors"] == [{"question_id": "random/3", "error": "ImageError: gone"}]
    # the errored question counts, as wrong: label yes -> a false negative
    assert scores["metrics"]["splits"]["random"]["n"] == 3 and scores["metrics"]["splits"]["random"]["FN"] == 1


def test_append_after_torn_line_keeps_every_record(tmp_path):
    path = tmp_path / "s.jsonl"
    with open_append_jsonl(path) as f:
        append_lines(f, [{"question_id": "a"}, {"question_id": "b"}])
    with open(path, "a") as f:
        f.write('{"question_id": "c", "predic')  # a kill in the middle of a write
    with open_append_jsonl(path) as f:
        append_lines(f, [{"question_id": "c"}])
    assert [r["question_id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_paper_values():
    assert paper_value("POPE", "blink") == 85.23
    assert paper_value("MME total", "vanilla") == pytest.approx(1863.58)
    assert paper_value("MME total", "blink", "fixed") == 1840.46
    assert paper_value("GQA", "blink", "fixed") is None and paper_value("GQA", "vanilla", "fixed") == 61.93


def test_missing_release_files_name_the_layout(tmp_path, tfds_dir):
    with pytest.raises(benchmarks.DataError, match="coco_pope_"):
        benchmarks.load_docs(benchmarks.get("pope"), tmp_path, tfds_dir)
