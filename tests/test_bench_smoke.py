"""Each bench script runs end to end on a tiny config with one repetition. Nothing here times anything: the
numbers belong in bench/RESULTS.md, measured on a quiet machine with the commands written there."""

from __future__ import annotations

import re

import pytest

from bench import (accelerator, before_after, blink_cost, compilations, components, conversion, gemm_backends,
                   prefill_decode, scan_layers, train_tokensr)

TINY = ["--size", "tiny", "--batch", "1", "--length", "80", "--reps", "1"]


def table_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_prefill_decode(capsys):
    prefill_decode.main(TINY + ["--new-tokens", "3"])
    rows = table_rows(capsys.readouterr().out)
    assert rows[0].startswith("| batch | prefill torch") and len(rows) == 2


def test_blink_cost(capsys):
    blink_cost.main(TINY + ["--layers", "1,2", "--region-size", "3"])
    rows = table_rows(capsys.readouterr().out)
    assert "two-pass" in rows[0] and len(rows) == 2


def test_components(capsys):
    components.main(["--size", "tiny", "--batch", "1", "--length", "80", "--reps", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert [r.split("|")[1].strip().split()[0] for r in rows[1:]] == ["GEMM", "LM"]


def test_before_after(capsys):
    before_after.main(TINY + ["--new-tokens", "3", "--layers", "1,2"])
    rows = table_rows(capsys.readouterr().out)
    assert [r.split("|")[2].strip() for r in rows[1:]] == ["before", "after", "after/before", "after/before, CPU time"]


def test_compilations(capsys):
    compilations.main(["--questions", "4", "--bucket", "32", "--batch-size", "4", "--modes", "interp"])
    rows = table_rows(capsys.readouterr().out)
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["interp"]
    for row in rows[1:]:
        buckets, programs, everything = row.split("|")[3:6]
        # counts, not timings; each mode runs in a fresh process, so every bucket compiles at least once
        assert 1 <= int(programs.split()[0]) <= int(buckets) and int(programs.split()[0]) <= int(everything)


def test_conversion(capsys, tmp_path):
    conversion.main(["--size", "tiny", "--reps", "1", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert "peak - baseline" in out and len(table_rows(out)) == 2


@pytest.mark.filterwarnings("ignore")
def test_train_tokensr(capsys):
    train_tokensr.main(["--size", "tiny", "--batch-size", "2", "--images", "4", "--steps", "1", "--layers", "1,2",
                        "--channels", "8", "--max-prompt-len", "96"])
    rows = table_rows(capsys.readouterr().out)
    assert rows[1].startswith("| computed from crops") and rows[2].startswith("| warm cache")
    hits, computed = map(int, re.search(r"\((\d+) hits, (\d+) computed\)", rows[2]).groups())
    assert hits == 2 * 2 and computed == 0  # batch 2 x layers 1, 2, every target from the warm cache


def test_accelerator(capsys):
    accelerator.main(TINY + ["--dtype", "bfloat16", "--torch-device", "cpu", "--peak-tflops", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert [r.split("|")[2].strip() for r in rows[1:]] == ["ours vanilla", "ours Blink, expand every layer",
                                                           "torch vanilla"]
    assert all(r.rstrip(" |").endswith("%") for r in rows[1:])  # an MFU, given the peak


def test_accelerator_peak_lookup():
    assert accelerator.peak_for_kind("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert accelerator.peak_for_kind("NVIDIA H100 PCIe", "bfloat16") == 756.0  # before the H100 SXM entry
    assert accelerator.peak_for_kind("TPU v5 lite", "bfloat16") == 197.0
    assert [accelerator.peak_for_kind(f"NVIDIA {k}", "bfloat16") for k in ("L40S", "L40", "L4", "H100 NVL")] == [
        362.0, 181.0, 121.0, 835.0]
    assert accelerator.peak_for_kind("NVIDIA H100 80GB HBM3", "float32") is None  # no fp32 table: --peak-tflops
    assert accelerator.peak_for_kind("cpu", "bfloat16") is None


def test_accelerator_default_layers():
    assert accelerator.default_layers(32) == tuple(range(12, 19))  # BLINK.md's 12-18 on LLaVA-1.5-7B
    assert accelerator.default_layers(8) == (3, 4, 5)


def test_prefill_flops_match_xla_cost_analysis():
    """The analytic count behind MFU agrees with XLA's own count of the compiled prefill (which also counts
    the elementwise work, a few percent at this width)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench import common
    from blink_jax.config import LlavaConfig
    from blink_jax.weights.params import abstract_model
    from blink_jax.model import forward

    size = common.Size(vision_width=128, vision_layers=3, vision_heads=4, text_width=256, text_layers=2,
                       text_heads=4, text_kv_heads=2, text_ffn=704, vocab=1000)
    batch, length = 2, 650
    cfg = LlavaConfig.from_hf_config(common.hf_config(size))
    graphdef, state = nnx.split(abstract_model(cfg))
    prefill = jax.jit(lambda p, i, x, m: forward.prefill(nnx.merge(graphdef, p), i, x, m)[0])
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    pixels = jax.ShapeDtypeStruct((batch, 3, size.image_size, size.image_size), jnp.float32)
    cost = prefill.lower(state, ids, pixels, ids).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = accelerator.prefill_flops(size, batch, length)
    assert 0.9 < ours / xla <= 1.0, (ours, xla)


def test_gemm_backends(capsys):
    gemm_backends.main(["--rows", "32", "--inner", "16", "--outer", "16", "--reps", "1", "--inner-reps", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert [r.split("|")[1].strip() for r in rows[1:]] == [name for name, _, _ in gemm_backends.VARIANTS] + ["torch (MKL)"]


def test_scan_layers(capsys):
    scan_layers.main(TINY)  # also checks that both variants give the same logits
    rows = table_rows(capsys.readouterr().out)
    assert [r.split("|")[2].strip() for r in rows[1:]] == ["vanilla unrolled", "vanilla scan", "Blink unrolled",
                                                           "Blink scan"]
    scan_layers.main(["--size", "tiny", "--length", "80", "--compile-only"])
    assert len(table_rows(capsys.readouterr().out)) == 5
    with pytest.raises(SystemExit):
        scan_layers.main(["--size", "7b"])  # 7b runs only compile-only on a host


def test_blink_extra_flops_match_xla_cost_analysis():
    """The SR tokens' share of the analytic count (Blink's MFU row) agrees with what XLA counts for the compiled
    Blink prefill beyond the vanilla one (XLA's also holds the saliency scan and interpolation)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench import common
    from blink_jax import runtime
    from blink_jax.blink import BlinkConfig, runner
    from blink_jax.config import LlavaConfig
    from blink_jax.weights.params import abstract_model
    from blink_jax.model import forward

    size = common.Size(vision_width=128, vision_layers=3, vision_heads=4, text_width=256, text_layers=4,
                       text_heads=4, text_kv_heads=2, text_ffn=704, vocab=1000)
    batch, length, first = 2, 650, 1
    cfg = LlavaConfig.from_hf_config(common.hf_config(size))
    graphdef, state = nnx.split(abstract_model(cfg))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    pixels = jax.ShapeDtypeStruct((batch, 3, size.image_size, size.image_size), jnp.float32)
    flops = lambda lowered: (lambda c: (c[0] if isinstance(c, list) else c)["flops"])(lowered.compile().cost_analysis())
    vanilla = flops(jax.jit(lambda p, i, x, m: forward.prefill(nnx.merge(graphdef, p), i, x, m)[0]).lower(
        state, ids, pixels, ids))
    blink = BlinkConfig(layers=(first, first + 1), region_size=6, expansion="fixed")
    static, thresholds = blink.split()
    bank_def, bank_state = runner._interp_bank(static, cfg.text.hidden_size)
    with_sr = flops(runtime._prefill.lower(graphdef, state, bank_def, bank_state, ids, pixels, ids, thresholds,
                                           jax.random.key(0), static=static))
    sr_tokens = (blink.region_size * blink.scale) ** 2
    ours = (accelerator.prefill_flops(size, batch, length, sr_tokens=sr_tokens, sr_layers=size.text_layers - 1 - first)
            - accelerator.prefill_flops(size, batch, length))
    assert 0.85 < ours / (with_sr - vanilla) <= 1.0, (ours, with_sr - vanilla)
