"""Compilations of an eval: `eval.harness.runner.run_eval` on 100 POPE questions of mixed prompt lengths, every
mode, counting the programs compiled against the number of length buckets.

    python -m bench.compilations [--questions 100] [--bucket 64] [--batch-size 8] [--modes vanilla,interp,blink]

The model is a tiny random LLaVA (84 px images, a 6x6 grid; compilation counts do not depend on its size);
the questions are POPE-style with 0-260 filler words, so their prompts fall into several length buckets. Counted:
new entries in the jit caches of the entry points (`blink_jax.runtime._generate`/`_prefill`, which serve
vanilla and Blink) and every XLA backend compilation in the process
(`/jax/core/compile/backend_compile_duration` events, which also catch small helper programs).
Target: per mode, entry-point programs <= length buckets.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

TESTS = Path(__file__).resolve().parents[1] / "tests"
LAYERS, REGION = (1, 2), 3
OBJECTS = ("dog", "cat", "circle", "square", "triangle", "user")
FILLER = "please answer the question using a single word or phrase is there in image".split()


def make_data(root: Path, questions: int, seed: int = 0) -> dict[str, int]:
    """A POPE directory with `questions` questions over three splits; -> {split: count}."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import tiny_benchmarks as tb

    rng = np.random.default_rng(seed)
    images = [f"COCO_val2014_{i:012d}.jpg" for i in range(1, 6)]
    for i, name in enumerate(images):
        tb.save_photo(root / "val2014" / name, i, size=(40 + 7 * i, 30 + 5 * i))
    counts = {}
    splits = ("random", "popular", "adversarial")
    for s, split in enumerate(splits):
        n = questions // 3 + (1 if s < questions % 3 else 0)
        lines = []
        for q in range(n):
            filler = " ".join(rng.choice(FILLER, size=int(rng.integers(0, 260))))
            text = f"Is there a {rng.choice(OBJECTS)} in the image? {filler}".strip()
            lines.append(json.dumps({"question_id": q + 1, "image": str(rng.choice(images)), "text": text,
                                     "label": str(rng.choice(["yes", "no"]))}))
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
        counts[split] = n
    return counts


def make_model(root: Path) -> tuple[Path, Path]:
    """A tiny HF LLaVA directory and a trained-format TokenSR directory; -> (model dir, tokensr dir)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import tiny_llava as tl
    from flax import nnx

    from blink_jax.blink import BlinkConfig, TokenSRBank
    from blink_jax.blink.checkpoint import save_tokensr

    tl.save_hf_model(root / "model", seed=0, vision_image_size=84, text_num_hidden_layers=3,
                     vision_num_hidden_layers=2)
    cfg = BlinkConfig(layers=LAYERS, region_size=REGION, tokensr_kind="conv", tokensr_channels=7)
    dim = tl.tiny_hf_config().text_config.hidden_size
    save_tokensr(root / "tokensr", TokenSRBank(cfg, dim, rngs=nnx.Rngs(0)), cfg, dim=dim)
    return root / "model", root / "tokensr"


def _entry_points():
    from blink_jax import runtime

    return {"runtime._generate": runtime._generate, "runtime._prefill": runtime._prefill}


def run(questions: int, bucket: int, batch_size: int, modes: tuple[str, ...], work: Path) -> str:
    import jax

    from eval.harness.batching import bucket_length
    from eval.harness.runner import EvalConfig, Runner, load_model, run_eval
    from eval import benchmarks

    model_dir, tokensr_dir = make_model(work)
    make_data(work / "pope", questions)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration"
        else None)

    base = dict(bench="pope", model=str(model_dir), data_dir=str(work / "pope"), tokensr=str(tokensr_dir),
                batch_size=batch_size, bucket=bucket, max_new_tokens=3, layers=LAYERS, region_size=REGION,
                tau_exp=0.26, tau_drop=0.255, dtype="float32", tfds_dir=str(work / "tfds"), progress=False)
    model_and_tok = load_model(EvalConfig(out=str(work / "unused"), **base))
    # The buckets the harness will use: the prompts' token lengths through the runner's own preparation.
    bench = benchmarks.get("pope")
    docs = benchmarks.load_docs(bench, work / "pope", work / "tfds")
    prepared = Runner(EvalConfig(out=str(work / "unused"), **base), bench, docs, *model_and_tok).prepared
    lengths = [len(p.ids) for p in prepared if p.ids is not None]
    buckets = collections.Counter(bucket_length(n, bucket) for n in lengths)

    rows = ["| mode | questions | length buckets | entry-point programs compiled | all XLA compilations "
            "| of which > 1 s | compile time (s) | eval wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        entry = _entry_points()
        before = {name: fn._cache_size() for name, fn in entry.items()}
        start_compiles = len(compiles)
        start = time.perf_counter()
        doc = run_eval(EvalConfig(out=str(work / f"out_{mode}"), modes=(mode,), **base), model_and_tokenizer=model_and_tok)
        wall = time.perf_counter() - start
        new = {name: fn._cache_size() - before[name] for name, fn in entry.items()}
        programs = sum(new.values())
        mine = compiles[start_compiles:]
        answered = doc["modes"][mode]["counts"]["answered"]
        detail = ", ".join(f"{k} {v}" for k, v in new.items() if v)
        rows.append(f"| {mode} | {answered} | {len(buckets)} | {programs} ({detail}) | {len(mine)} "
                    f"| {sum(s > 1 for s in mine)} | {sum(mine):.1f} | {wall:.1f} |")
    hist = ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items()))
    return (f"prompt lengths {min(lengths)}-{max(lengths)} tokens, bucket {bucket}, batch size {batch_size}; "
            f"questions per bucket: {hist}\n\n" + "\n".join(rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--bucket", type=int, default=64, help="prompts are left-padded to a multiple of this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--modes", default="vanilla,interp,blink")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_compilations_") as work:
        table = run(a.questions, a.bucket, a.batch_size, tuple(a.modes.split(",")), Path(work))
    print(f"machine: {common.machine()}\n\n{table}")


if __name__ == "__main__":
    main()
