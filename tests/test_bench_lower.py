"""`bench.lower`: every program exported for TPU and GPU from this CPU host, the target platform (not the host's)
choosing the attention kernel, and the exact bytes per device (by hand, and as XLA counts them).

The meshes need 8 simulated CPU devices, i.e. XLA_FLAGS set before JAX starts, so the exports run in a
subprocess (this file, run as a script) that writes what it saw to a JSON file; the checks run here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bench import common
from blink_jax.model import ops

REPO = Path(__file__).resolve().parents[1]
LENGTH = 150  # > CPU_QUERY_BLOCK_CAUSAL (128): a CPU program has two query blocks per decoder layer, TPU/GPU one
PRESETS = ("tpu_v4_8", "tpu_v5e_8", "gpu_8")
PROGRAMS = ("vanilla prefill", "Blink prefill", "decode step", "TokenSR train step")


# Layer 0's q_proj kernel [D=48, N=6, H=8] as a program argument, split over fsdp on D.
Q_PROJ_ARG = re.escape('tensor<48x6x8xbf16> {sdy.sharding = #sdy.sharding<@mesh, [{"fsdp"}, {}, {}]>} '
                       'loc("params[\'language_model\'][\'layers\'][0][\'self_attn\'][\'q_proj\']')


def dot_generals(mlir_text: str) -> int:
    return len(re.findall(r"stablehlo\.dot_general", mlir_text))


# ------------------------------------------------------------------------------------------ the subprocess


def worker(out: Path) -> None:
    from bench import lower
    from blink_jax.config import LlavaConfig

    devices = lower.simulate_host_devices(8)
    # The programs the command builds and the TPU/GPU exports it makes are the ones checked below (each built once:
    # only the CPU exports are new); its search for the largest batch that fits stops at 64, not 4096 (the tiny
    # model fits any batch, and the search costs a memory estimate per batch).
    built, exported_once = {}, {}
    programs, export = lower.programs, lower.export

    def programs_once(size, mesh, **kwargs):
        key = (size, tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat), tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = programs(size, mesh, **kwargs)
        return built[key]

    def export_once(fn, args, kwargs, platform):  # (args: of a program built once, so `id` names them)
        key = (id(fn), id(args), platform)
        if key not in exported_once:
            exported_once[key] = export(fn, args, kwargs, platform)
        return exported_once[key]

    lower.programs, lower.export = programs_once, export_once
    lower.max_batch = functools.partial(lower.max_batch, limit=64)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        lower.main(["--sizes", "tiny", "--presets", ",".join(PRESETS), "--platforms", "tpu,cuda",
                    "--length", str(LENGTH), "--batch", "1,8", "--new-tokens", "4"])
    report, by_command = {"stdout": stdout.getvalue(), "exports": {}}, len(built)
    for preset in PRESETS:
        mesh = lower.preset_mesh(preset, devices)
        progs = lower.programs(common.TINY, mesh, batch=8, length=LENGTH, new_tokens=4, train_batch=16)
        for name, (fn, args, kwargs) in progs.items():
            for platform in ("tpu", "cuda", "cpu"):
                exported = lower.export(fn, args, kwargs, platform)
                text = exported.mlir_module()
                report["exports"][f"{preset}|{name}|{platform}"] = {
                    "platforms": list(exported.platforms), "devices": exported.nr_devices, "dots": dot_generals(text),
                    "q_proj_split": re.search(Q_PROJ_ARG, text) is not None}
        if preset == "tpu_v4_8":
            _, params = lower.abstract_params(LlavaConfig.from_hf_config(common.hf_config(common.TINY)), mesh)
            report["param_bytes_tpu_v4_8"] = lower.param_bytes_per_device(params)
            report["xla_decode_args_tpu_v4_8"] = lower.xla_argument_bytes(*progs["decode step"])
    assert len(built) == by_command, "the checks built programs the command did not: align their arguments"
    out.write_text(json.dumps(report))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("lower") / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------- tests


def test_every_program_is_exported_for_tpu_and_cuda(exported):
    devices = {"tpu_v4_8": 4, "tpu_v5e_8": 8, "gpu_8": 8}
    for preset in PRESETS:
        for program in PROGRAMS:
            for platform in ("tpu", "cuda"):
                e = exported["exports"][f"{preset}|{program}|{platform}"]
                assert e["platforms"] == [platform]
                assert e["devices"] == devices[preset], (preset, program)
    table = [line for line in exported["stdout"].splitlines() if line.startswith("| ") and "| tiny |" in line]
    export_rows = [line for line in table if line.count("|") == 7]
    assert len(export_rows) == len(PRESETS) * len(PROGRAMS) * 2  # the command's table has every export
    memory_rows = [line for line in table if line.count("|") == 12]
    assert len(memory_rows) == len(PRESETS) * 2  # batches 1 and 8
    check_rows = [line for line in table if line.count("|") == 5]
    assert len(check_rows) == len(PRESETS) and "differ" not in exported["stdout"]  # ours == XLA's bytes
    assert "machine:" in exported["stdout"]


def test_parameters_carry_the_rules_sharding(exported):
    """q_proj [D=48, N=6, H=8] is split over fsdp on D (the rules: embed -> fsdp, heads -> tensor of size 1)."""
    for preset in PRESETS:
        for program in ("vanilla prefill", "Blink prefill", "decode step"):
            assert exported["exports"][f"{preset}|{program}|tpu"]["q_proj_split"], (preset, program)


def test_the_export_platform_chooses_the_attention_blocks(exported):
    """At 150 tokens a CPU program has 2 query blocks per decoder layer (2 dot products each), TPU and GPU one;
    CLIP's 37 tokens are one block everywhere. So the CPU export has exactly 2 more dot products per layer."""
    for preset in PRESETS:
        for program in ("vanilla prefill", "Blink prefill"):
            dots = {p: exported["exports"][f"{preset}|{program}|{p}"]["dots"] for p in ("tpu", "cuda", "cpu")}
            assert dots["tpu"] == dots["cuda"], (preset, program, dots)
            assert dots["cpu"] - dots["tpu"] == 2 * common.TINY.text_layers, (preset, program, dots)
        decode = {p: exported["exports"][f"{preset}|decode step|{p}"]["dots"] for p in ("tpu", "cpu")}
        assert decode["tpu"] == decode["cpu"]  # one query: one block everywhere


def test_parameter_bytes_per_device_by_hand(exported):
    """tpu_v4_8 = fsdp:4: every weight with a model-width dim (text 48, vision 32, both divisible by 4) is split
    4 ways along it; norms, biases and the class embedding are whole. bfloat16: 2 bytes. XLA's own count of the
    decode step's arguments (compiled for the CPU devices with the same shardings; the vision tower and projector
    are unused there) is the language model's share plus the tokens and the KV cache of 2 of the 8 examples."""
    s = common.TINY
    d, layers, n, kv, f, v = s.text_width, s.text_layers, s.text_heads, s.text_kv_heads, s.text_ffn, s.vocab
    hd = d // n
    dv, lv, fv = s.vision_width, s.vision_layers, 4 * s.vision_width
    positions = (s.image_size // s.patch) ** 2 + 1
    # embedding, LM head; per layer q, o; k, v; gate, up, down. Whole: the RMSNorm scales.
    text_split = 2 * v * d + layers * (2 * d * n * hd + 2 * d * kv * hd + 3 * d * f)
    text_whole = layers * 2 * d + d
    split = (text_split
             + s.patch * s.patch * 3 * dv + positions * dv  # patch and position embeddings
             + lv * (4 * dv * dv + 2 * dv * fv)  # q, k, v, out; fc1, fc2
             + dv * d + d * d)  # projector
    whole = (text_whole
             + dv + 2 * 2 * dv  # class embedding; pre/post layer norms
             + lv * (4 * dv + fv + dv + 2 * 2 * dv)  # q, k, v, out biases; fc1, fc2 biases; two layer norms
             + 2 * d)  # projector biases
    assert exported["param_bytes_tpu_v4_8"] == 2 * (split // 4 + whole) == 56744

    b, slots = 8 // 4, LENGTH + 4  # examples per device; cache slots: prompt + 4 new tokens
    cache = layers * (2 * b * slots * kv * hd * 2 + b * slots) + 4 + b * 4  # k, v (bf16), valid; index, positions
    tokens = b * 4
    assert exported["xla_decode_args_tpu_v4_8"] == 2 * (text_split // 4 + text_whole) + cache + tokens


def test_query_block_is_the_target_platforms():
    assert ops.query_block("cpu", 650, causal=True) == ops.CPU_QUERY_BLOCK_CAUSAL
    assert ops.query_block("cpu", 650, causal=False) == ops.CPU_QUERY_BLOCK
    assert ops.query_block("cpu", 30, causal=False) == 30
    for platform in ("tpu", "cuda", "rocm"):
        assert ops.query_block(platform, 650, causal=True) == 650


def test_attention_exported_for_tpu_from_cpu_is_one_block():
    """An attention over 300 queries: 3 causal blocks (6 dot products) when lowered for CPU, one block for TPU,
    whatever backend this process runs on; the CPU export still computes softmax attention."""
    b, t, n, kv, h = 1, 300, 4, 2, 8
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, kv, h)).astype(np.float32) for _ in range(2))
    mask = np.tril(np.ones((t, t), bool))[None]
    fn = jax.jit(lambda q, k, v, m: ops.attention(q, k, v, m, causal=True))
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, mask)]
    texts = {p: jax.export.export(fn, platforms=[p])(*args).mlir_module() for p in ("cpu", "tpu", "cuda")}
    assert dot_generals(texts["tpu"]) == dot_generals(texts["cuda"]) == 2
    assert dot_generals(texts["cpu"]) == 2 * math.ceil(t / ops.CPU_QUERY_BLOCK_CAUSAL)
    got = jax.export.export(fn, platforms=["cpu"])(*args).call(q, k, v, mask)
    g = n // kv
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, g, axis=2)) / math.sqrt(h)
    logits = np.where(mask[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), np.repeat(v, g, axis=2))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
