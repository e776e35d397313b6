"""This checkout against another one (e.g. the commit before the decoder redesign): compile time of the 7B-shaped
vanilla and Blink prefills, and run time of both at a CPU-sized model, each measured in fresh processes that
alternate between the two checkouts.

    git worktree add /tmp/before <commit>
    python -m bench.redesign --before /tmp/before [--rounds 2] [--compile-size 7b] [--run-size mid]

Compile: the prefill entry points lowered and compiled on abstract bfloat16 parameters (nothing allocated), batch 1,
650 tokens; Blink is Blink-interp with LLaVA-1.5's participating layers 12-18 and region size 6. Run: the same
entry points at `--run-size` with random float32 weights, interleaved repetitions, medians. Ratios are this
checkout over the other, per round, then the median over rounds. A worker reads the other checkout's own
`blink_jax` and `bench.common`; it knows the entry points of both layouts (before: `runtime._prefill` for vanilla
and `blink.runner._prefill` for Blink; after: one `runtime._prefill` for both).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _entry_points(num_layers: int, grid: int, dim: int):
    """mode -> (lower(graphdef, params, ids, px, mask), call(compiled, params, ids, px, mask)) of that checkout."""
    import jax
    from blink_jax import runtime
    from blink_jax.blink import BlinkConfig

    first = (num_layers * 12) // 32
    blink = BlinkConfig(layers=tuple(range(first, first + max(1, (num_layers * 7) // 32))),
                        region_size=next(r for r in (6, 3, 2, 1) if grid % r == 0), expansion="fixed")
    static, thresholds = blink.split()
    key = jax.random.key(0)
    if "bank_def" in inspect.signature(runtime._prefill).parameters:  # one pair of entry points
        from blink_jax.blink import runner

        args = runner.prepare(blink, None, None, num_layers=num_layers, grid=grid, dim=dim)
        vanilla = runner.BlinkArgs(None, None, None, None, None)
        return {mode: (lambda gd, p, i, x, m, b=b: runtime._prefill.lower(
                           gd, p, b.bank_def, b.bank_state, i, x, m, b.thresholds, b.key, static=b.static),
                       lambda c, p, i, x, m, b=b: c(p, b.bank_state, i, x, m, b.thresholds, b.key))
                for mode, b in (("vanilla", vanilla), ("Blink", args))}
    from blink_jax.blink import runner  # before: a pair of entry points each

    bank_def, bank_state = runner._interp_bank(static, dim)
    return {"vanilla": (lambda gd, p, i, x, m: runtime._prefill.lower(gd, p, i, x, m),
                        lambda c, p, i, x, m: c(p, i, x, m)),
            "Blink": (lambda gd, p, i, x, m: runner._prefill.lower(gd, p, bank_def, bank_state, i, x, m, thresholds,
                                                                   key, static=static),
                      lambda c, p, i, x, m: c(p, bank_state, i, x, m, thresholds, key))}


def worker(task: str, size_name: str, reps: int) -> dict:
    """Runs in the checkout under test (its `blink_jax` and `bench.common` first on the path)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench import common
    from blink_jax.config import LlavaConfig

    size = {**common.SIZES, "7b": common.LLAVA_7B}[size_name]
    if task == "compile":
        try:
            from blink_jax.weights.params import abstract_model
        except ImportError:  # a checkout from before the library held its checkpoint code
            from blink_jax.loading import abstract_model

        cfg = LlavaConfig.from_hf_config(common.hf_config(size))
        gd, params = nnx.split(abstract_model(cfg, jnp.bfloat16))
        ids = jax.ShapeDtypeStruct((1, 650), jnp.int32)
        px = jax.ShapeDtypeStruct((1, 3, size.image_size, size.image_size), jnp.float32)
        out = {}
        for mode, (lower, _) in _entry_points(cfg.text.num_hidden_layers, cfg.vision.grid,
                                              cfg.text.hidden_size).items():
            start = time.perf_counter()
            lower(gd, params, ids, px, ids).compile()
            out[mode] = time.perf_counter() - start
        return out
    _, ours = common.make_models(size, with_torch=False)
    ids, px, mask = (jnp.asarray(x) for x in common.prompt_batch(ours, 1, 650))
    cfg = ours.config
    fns = {}
    for mode, (lower, call) in _entry_points(cfg.text.num_hidden_layers, cfg.vision.grid,
                                             cfg.text.hidden_size).items():
        compiled = lower(ours.graphdef, ours.params, ids, px, mask).compile()
        fns[mode] = lambda c=compiled, call=call: jax.block_until_ready(call(c, ours.params, ids, px, mask))
    times = common.interleaved(fns, reps=reps)
    return {mode: statistics.median(ts) for mode, ts in times.items()}


def measure(tree: Path, task: str, size: str, reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(HERE), "--worker", task, "--size", size, "--reps", str(reps)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {task} worker failed in {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, help="the other checkout (a git worktree of the older commit)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of fresh processes per checkout")
    p.add_argument("--compile-size", default="7b", help="model shape for compile times (abstract parameters)")
    p.add_argument("--run-size", default="mid", help="model shape for run times (random weights on this host)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per run worker")
    p.add_argument("--worker", choices=("compile", "run"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.size, a.reps)))
        return
    if a.before is None or not (a.before / "blink_jax").is_dir():
        p.error("--before must be a checkout of blink-jax (a directory holding blink_jax/), e.g. from "
                "`git worktree add /tmp/before <commit>`")
    from bench import common

    this = HERE.parents[1]
    results = {"compile": {"before": [], "after": []}, "run": {"before": [], "after": []}}
    for _ in range(a.rounds):
        for task, size in (("compile", a.compile_size), ("run", a.run_size)):
            for label, tree in (("before", a.before), ("after", this)):
                results[task][label].append(measure(tree, task, size, a.reps))
    rows = ["| measure | mode | before (s) | after (s) | after / before (median of rounds) |", "|---|---|---|---|---|"]
    for task, size in (("compile", a.compile_size), ("run", a.run_size)):
        for mode in ("vanilla", "Blink"):
            before = [r[mode] for r in results[task]["before"]]
            after = [r[mode] for r in results[task]["after"]]
            ratio = statistics.median(x / y for x, y in zip(after, before))
            rows.append(f"| {task} ({size}) | {mode} | {statistics.median(before):.3f} | "
                        f"{statistics.median(after):.3f} | {ratio:.2f} |")
    print(f"machine: {common.machine()}\n\n" + "\n".join(rows) + "\n\nraw: " + json.dumps(results))


if __name__ == "__main__":
    main()
