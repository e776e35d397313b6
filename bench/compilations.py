"""Compilations of an eval: `python -m eval.run` on 100 POPE questions of mixed prompt lengths, once per mode,
counting the programs it compiles against the number of length buckets.

    python -m bench.compilations [--questions 100] [--bucket 64] [--batch-size 8] [--modes vanilla,interp,blink]

The model is a tiny random LLaVA (84 px images, a 6x6 grid; compilation counts do not depend on its size);
the questions are POPE-style with 0-150 filler words, so their prompts fall into several length buckets. Each mode
runs as the user runs it, `python -m eval.run ... --modes MODE` in its own process with JAX_LOG_COMPILES=1, and its
log is read: "Finished XLA compilation of jit(NAME) in S sec" is one compiled program. Counted: the programs of the
library's entry points (`blink_jax.runtime._generate`/`_prefill`, which serve vanilla and Blink) and every XLA
compilation of the eval's process (model loading's small programs included). The length buckets are counted from
the prompts of the samples file (tokenized as the harness does, with the library's `build_prompt` and
`tokenize_with_image`) and checked against the shapes results.json says the harness ran.
Target: per mode, entry-point programs <= length buckets.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common
from blink_jax import runtime
from blink_jax.processing import Processor, build_prompt, tokenize_with_image

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
LAYERS, REGION = (1, 2), 3
OBJECTS = ("dog", "cat", "circle", "square", "triangle", "user")
FILLER = "please answer the question using a single word or phrase is there in image".split()
# Log names of the library's jitted entry points -> the names the table gives them.
ENTRY_POINTS = {f"jit({fn.__name__})": f"runtime.{fn.__name__}" for fn in (runtime._generate, runtime._prefill)}
COMPILED = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.eE+-]+) sec")


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
            # 0-150 words: prompts of several length buckets that still fit the tiny model's 256 positions
            filler = " ".join(rng.choice(FILLER, size=int(rng.integers(0, 150))))
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


def compilations(log: str) -> list[tuple[str, float]]:
    """(program name, seconds) of every XLA compilation a JAX_LOG_COMPILES=1 process logged, in order."""
    return [(m.group(1), float(m.group(2))) for m in COMPILED.finditer(log)]


def prompt_lengths(samples: Path, model_dir: Path) -> list[int]:
    """Token lengths (image tokens included) of the prompts of a samples file's answered questions, tokenized as the
    eval harness does (a question recorded with an error, e.g. past the model's context, was never batched)."""
    processor = Processor.from_pretrained(model_dir)
    cfg = processor.config
    records = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in records if r["error"] is None]
    return [len(tokenize_with_image(processor.tokenizer, build_prompt(p, suffix=None), cfg.image_token_index,
                                    cfg.num_image_tokens)) for p in prompts]


def bucket_of(length: int, bucket: int) -> int:
    """eval.run's --bucket: prompts are left-padded to a multiple of it."""
    return max(bucket, -(-length // bucket) * bucket)


def run_mode(mode: str, base: list[str], out: Path) -> tuple[dict, str, float]:
    """`python -m eval.run` for one mode, compile log on. -> (its results.json, its stderr, its wall seconds)."""
    cmd = [sys.executable, "-m", "eval.run", *base, "--modes", mode, "--out", str(out), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "JAX_LOG_COMPILES": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text()), proc.stderr, wall


def run(questions: int, bucket: int, batch_size: int, modes: tuple[str, ...], work: Path) -> str:
    model_dir, tokensr_dir = make_model(work)
    make_data(work / "pope", questions)
    base = ["--bench", "pope", "--model", str(model_dir), "--data-dir", str(work / "pope"), "--tokensr",
            str(tokensr_dir), "--batch-size", str(batch_size), "--bucket", str(bucket), "--max-new-tokens", "3",
            "--layers", ",".join(map(str, LAYERS)), "--region-size", str(REGION), "--tau-exp", "0.26",
            "--tau-drop", "0.255", "--dtype", "float32", "--tfds-dir", str(work / "tfds")]
    rows = ["| mode | questions | length buckets | entry-point programs compiled | all XLA compilations "
            "| of which > 1 s | compile time (s) | eval wall (s) |", "|---|---|---|---|---|---|---|---|"]
    buckets = None
    for mode in modes:
        out = work / f"out_{mode}"
        doc, log, wall = run_mode(mode, base, out)
        if buckets is None:
            lengths = prompt_lengths(out / doc["modes"][mode]["files"]["samples"], model_dir)
            buckets = collections.Counter(bucket_of(n, bucket) for n in lengths)
        ran = {shape[1] for shape in doc["config"]["programs"][mode]}  # [batch, length, new tokens]
        if ran != set(buckets):
            raise RuntimeError(f"mode {mode}: eval.run ran prompt lengths {sorted(ran)}, but the prompts tokenize into "
                               f"buckets {sorted(buckets)}: update prompt_lengths to the harness's prompt building")
        compiled = compilations(log)
        new = collections.Counter(ENTRY_POINTS[name] for name, _ in compiled if name in ENTRY_POINTS)
        seconds = [s for _, s in compiled]
        answered = doc["modes"][mode]["counts"]["answered"]
        detail = ", ".join(f"{k} {v}" for k, v in new.items())
        rows.append(f"| {mode} | {answered} | {len(buckets)} | {sum(new.values())} ({detail}) | {len(seconds)} "
                    f"| {sum(s > 1 for s in seconds)} | {sum(seconds):.1f} | {wall:.1f} |")
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
