"""Write a benchmark's submission files from saved predictions (what `eval.run` writes after every mode).

    python -m eval.export --bench mmbench --samples out/samples_mmbench_blink.jsonl --data-dir DATA [--out DIR]

MMBench / MMBench-CN: `<bench>_<mode>.xlsx`, as LLaVA's `scripts/convert_mmbench_for_submission.py` writes it for
the evaluation server; MM-Vet: `mmvet_<mode>.json` with every question id, for MM-Vet's evaluator. The mode is
read from the samples file's name (`samples_<bench>_<mode>.jsonl`) unless --mode says it. The work is in each
benchmark's `export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.benchmarks import NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, choices=NAMES)
    p.add_argument("--samples", required=True, help="a samples_<bench>_<mode>.jsonl file")
    p.add_argument("--data-dir", required=True, help="the benchmark's release files, in their official layout")
    p.add_argument("--tfds-dir", help="where prepared datasets go (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--mode", help="the mode's name in the file names (default: read from --samples' name)")
    p.add_argument("--out", help="output directory (default: the samples file's directory)")
    return p


def mode_of(samples: Path, bench: str) -> str | None:
    prefix = f"samples_{bench}_"
    return samples.stem[len(prefix):] or None if samples.stem.startswith(prefix) else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from eval import benchmarks
    from eval.harness.io import read_jsonl
    from eval.harness.results import latest_records

    bench = benchmarks.get(args.bench)
    samples = Path(args.samples)
    mode = args.mode or mode_of(samples, bench.name)
    if mode is None:
        print(f"eval.export: {samples.name} is not named samples_{bench.name}_<mode>.jsonl: give --mode",
              file=sys.stderr)
        return 2
    try:
        docs = {d["question_id"]: d for d in benchmarks.load_docs(bench, args.data_dir, args.tfds_dir)}
        latest = latest_records(read_jsonl(samples))
    except (benchmarks.DataError, FileNotFoundError) as e:
        print(f"eval.export: {e}", file=sys.stderr)
        return 2
    unknown = [q for q in latest if q not in docs]
    if unknown:
        print(f"eval.export: {len(unknown)} question ids of {samples} are not in the {bench.name} data of "
              f"{args.data_dir}: these samples come from another data set; give its --data-dir", file=sys.stderr)
        return 2
    written = bench.export(list(latest.values()), docs, Path(args.out or samples.parent), mode)
    if not written:
        print(f"eval.export: {bench.title} has no submission format (its scores are eval.score's)", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
