"""Rescore saved predictions with the benchmark's official rules.

    python -m eval.score --bench pope --samples out/samples_pope_blink.jsonl --data-dir DATA [--out scores.json]

Prints the metrics (as results.json has them for that mode), and says so on stderr when they are partial
(not the whole benchmark) or count errored questions as wrong. The work is in `eval.harness.results`.
"""

from __future__ import annotations

import argparse
import json
import sys

from eval.benchmarks import NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, choices=NAMES)
    p.add_argument("--samples", required=True, help="a samples_<bench>_<mode>.jsonl file")
    p.add_argument("--data-dir", required=True, help="the benchmark's release files, in their official layout")
    p.add_argument("--tfds-dir", help="where prepared datasets go (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--out", help="also write the scores to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from eval import benchmarks
    from eval.harness.io import atomic_write_json
    from eval.harness.results import score_file

    bench = benchmarks.get(args.bench)
    try:
        docs = {d["question_id"]: d for d in benchmarks.load_docs(bench, args.data_dir, args.tfds_dir)}
        scores = score_file(bench, docs, args.samples)
    except (benchmarks.DataError, FileNotFoundError) as e:
        print(f"eval.score: {e}", file=sys.stderr)
        return 2
    unknown = scores["counts"]["unknown_ids"]
    if unknown:
        print(f"eval.score: {unknown} question ids of {args.samples} are not in the {args.bench} data of "
              f"{args.data_dir}: these samples come from another data set; give its --data-dir", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_json(args.out, scores)
    print(json.dumps(scores, indent=2, ensure_ascii=False))
    if not scores["coverage"]["complete"]:
        print(f"eval.score: partial: these scores are not {bench.title}'s whole benchmark "
              f"({'; '.join(scores['coverage']['partial'])})", file=sys.stderr)
    if scores["counts"]["errors"]:
        print(f"eval.score: {scores['counts']['errors']} errored question(s) count as wrong", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
