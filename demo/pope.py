"""POPE's release format and LLaVA's `llava/eval/eval_pope.py` scoring (BLINK.md §8), used by the POPE benchmark
(`eval.benchmarks.pope`), the shapes set's writer (`demo.shapes.write_pope`) and the demo trainer's evaluation.

Files: `coco_pope_{split}.json` for each of `SPLITS`, JSONL lines `question_id`, `image`, `text`, `label`.
"""

from __future__ import annotations

from collections.abc import Sequence

SPLITS = ("random", "popular", "adversarial")


def parse_yes_no(text: str) -> str:
    """eval_pope.py: keep the text before the first '.', drop ',', split on ' '; 'no' if any word is
    'No', 'not' or 'no', else 'yes'."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def confusion_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict:
    """eval_pope.py's numbers for one split (positive = "yes"). Where eval_pope.py would divide by zero the
    metric is undefined: None (precision of a split answered "no" throughout; recall without a "yes" label).
    F1 is then 2TP / (2TP + FP + FN), 0 when TP = 0, as its limit; None only with no positives at all."""
    pos = lambda x: x != "no"  # eval_pope maps label 'no' -> 0, anything else -> 1
    tp = sum(pos(p) and pos(l) for p, l in zip(preds, labels))
    fp = sum(pos(p) and not pos(l) for p, l in zip(preds, labels))
    tn = sum(not pos(p) and not pos(l) for p, l in zip(preds, labels))
    fn = sum(not pos(p) and pos(l) for p, l in zip(preds, labels))
    div = lambda a, b: a / b if b else None
    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)  # eval_pope.py's expression, to the last bit
    else:
        f1 = div(2 * tp, 2 * tp + fp + fn)
    return {
        "n": len(preds), "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        "accuracy": div(tp + tn, tp + tn + fp + fn), "precision": precision, "recall": recall,
        "f1": f1, "yes_ratio": div(sum(map(pos, preds)), len(preds)),
    }
