"""The decoder MLP's GEMM (fp32, and bf16 operands) under each of XLA:CPU's matmul back ends, beside torch's.

    python -m bench.gemm_backends [--rows 5200] [--inner 1024] [--outer 2816] [--reps 3]

XLA_FLAGS must be set before jax starts, so each back end runs in its own child process; one round runs every
back end once (a child times the GEMM `--inner-reps` times and reports the median), and the table gives the
median over rounds. Answers "would another XLA:CPU GEMM kernel win the batch-8 prefill?" (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench import common

BACKENDS = {
    "XLA default (Eigen)": "",
    "XLA + XNNPACK": "--xla_cpu_use_xnnpack=true",
    "XLA + oneDNN": "--xla_cpu_use_onednn=true",
    "XLA + XNN dot fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "XLA + YNN dot fusion": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "XLA + oneDNN dot fusion": "--xla_cpu_experimental_onednn_fusion_type=dot",
}
# (name, XLA_FLAGS, operand dtype): every back end in fp32, then bf16 operands (this CPU has AVX512_BF16).
VARIANTS = [(name, flags, "float32") for name, flags in BACKENDS.items()] + [
    ("XLA default, bf16 operands", "", "bfloat16"),
    ("XLA + oneDNN, bf16 operands", "--xla_cpu_use_onednn=true", "bfloat16"),
]

_CHILD = """
import json, statistics, sys, time
import numpy as np
import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16"
rows, inner, outer, reps, kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
dtype = sys.argv[6]
rng = np.random.default_rng(0)
a = rng.standard_normal((rows, inner), np.float32)
b = rng.standard_normal((inner, outer), np.float32)
if kind == "torch":
    import os, torch
    torch.set_num_threads(os.cpu_count())
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    run = lambda: ta @ tb
else:
    import jax
    ja, jb = jax.device_put(a.astype(dtype)), jax.device_put(b.astype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    run = lambda: f(ja, jb).block_until_ready()
run()
times = []
for _ in range(reps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times)))
"""


def _time(flags: str | None, rows: int, inner: int, outer: int, reps: int, dtype: str = "float32") -> float:
    env = dict(os.environ)
    kind = "torch" if flags is None else "jax"
    if flags is not None:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(rows), str(inner), str(outer), str(reps), kind, dtype],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} child with XLA_FLAGS='{flags}' failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(rows: int, inner: int, outer: int, reps: int, inner_reps: int) -> str:
    variants = VARIANTS + [("torch (MKL)", None, "float32")]
    times = {name: [] for name, _, _ in variants}
    for _ in range(reps):
        for name, flags, dtype in variants:
            times[name].append(_time(flags, rows, inner, outer, inner_reps, dtype))
    flop = 2 * rows * inner * outer
    base = times["XLA default (Eigen)"]
    table = ["| GEMM back end | seconds | GFLOP/s | time / XLA default |", "|---|---|---|---|"]
    for name, ts in times.items():
        sec = common.median(ts)
        table.append(f"| {name} | {sec:.3f} | {flop / sec / 1e9:.0f} | {common.paired_ratio(ts, base):.2f} |")
    return "\n".join(table + ["", common.raw_line("seconds per round", times)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5200, help="GEMM rows (batch 8 x 650 tokens)")
    p.add_argument("--inner", type=int, default=1024, help="contracted width (the decoder's model width)")
    p.add_argument("--outer", type=int, default=2816, help="output width (the decoder's MLP width)")
    p.add_argument("--reps", type=int, default=3, help="rounds over every back end")
    p.add_argument("--inner-reps", type=int, default=5, help="timed GEMMs per child (median)")
    a = p.parse_args(argv)
    print(f"machine: {common.machine()}\nGEMM {a.rows} x {a.inner} x {a.outer} fp32\n\n"
          f"{run(a.rows, a.inner, a.outer, a.reps, a.inner_reps)}")


if __name__ == "__main__":
    main()
