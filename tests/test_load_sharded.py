"""`blink_jax.load_pretrained(..., mesh=...)`: every parameter born sharded as the rules table says, from an HF
directory and from a converted one, holding exactly the values of the unsharded load, with equal logits; for
LLaVA and for Qwen2.5-VL (whose Blink prefill on the mesh is compared too).

8 simulated CPU devices need XLA_FLAGS set before JAX starts, so the sharded loads run in a subprocess (this file,
run as a script); the unsharded loads they are compared with run here, on one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("hf", "converted", "qwen_hf", "qwen_converted")
# Tiny model with MLP widths that the tensor axis divides (64) and one that it does not (45): both rules show.
OVERRIDES = dict(text_intermediate_size=64, vision_intermediate_size=45)
MESHES = {"cpu_8": "cpu_8", "tp": "fsdp:4,tensor:2"}
# (mesh, source, dtype) loads compared; sources are the HF directory and a bfloat16 converted directory, and a
# tiny Qwen2.5-VL's HF directory and float32 converted directory (logits of float32 loads only: each compiles).
LOADS = (("cpu_8", "hf", "float32"), ("tp", "hf", "float32"), ("tp", "converted", "float32"),
         ("tp", "hf", "bfloat16"), ("cpu_8", "converted", "bfloat16"),
         ("tp", "qwen_hf", "float32"), ("cpu_8", "qwen_converted", "bfloat16"))
# Tiny Qwen2.5-VL (`test_qwen2_5_vl.make_hf_model`'s form): widths the fsdp axis divides, a vision MLP (45) and
# heads (2, 64 wide) that the tensor axis must leave whole or may split.
QWEN_SPEC = dict(
    text=dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0, "mrope_section": [2, 3, 3]}),
    vision=dict(depth=2, hidden_size=32, intermediate_size=45, num_heads=2, out_hidden_size=64, window_size=56,
                fullatt_block_indexes=[1]),
    top=dict(tie_word_embeddings=False))

# Hand-written from the rules (embed -> fsdp; heads, mlp, vocab -> tensor; a dim the axes do not divide stays
# whole). Tiny shapes: text D=48, 6 heads x 8 (3 kv heads), MLP 64, vocab 96; vision D=40, 5 heads, MLP 45.
EXPECTED_SPECS = {
    "tp": {
        "language_model.embed_tokens.embedding": ("tensor", "fsdp"),  # [96, 48]
        "language_model.lm_head.kernel": ("fsdp", "tensor"),  # [48, 96]
        "language_model.layers.1.self_attn.q_proj.kernel": ("fsdp", "tensor", None),  # [48, 6, 8]
        "language_model.layers.1.self_attn.k_proj.kernel": ("fsdp", None, None),  # [48, 3, 8]: 3 kv heads, 2 chips
        "language_model.layers.1.self_attn.o_proj.kernel": ("tensor", None, "fsdp"),  # [6, 8, 48]
        "language_model.layers.1.mlp.gate_proj.kernel": ("fsdp", "tensor"),  # [48, 64]
        "language_model.layers.1.mlp.down_proj.kernel": ("tensor", "fsdp"),  # [64, 48]
        "language_model.layers.1.input_layernorm.scale": (None,),
        "vision_tower.encoder.layers.0.mlp.fc1.kernel": ("fsdp", None),  # [40, 45]: 45 stays whole
        "vision_tower.encoder.layers.0.self_attn.q_proj.kernel": ("fsdp", None, None),  # [40, 5, 8]
        "vision_tower.embeddings.patch_embedding.kernel": (None, None, None, "fsdp"),  # [14, 14, 3, 40]
        "multi_modal_projector.linear_1.kernel": ("fsdp", "tensor"),  # [40, 48]
        # Qwen2.5-VL: text D=64, 4 heads x 16 (2 kv heads), MLP 48, vocab 46; vision D=32, MLP 45, merger 128
        "qwen/language_model.embed_tokens.embedding": ("tensor", "fsdp"),  # [46, 64]
        "qwen/language_model.lm_head.kernel": ("fsdp", "tensor"),  # [64, 46]
        "qwen/language_model.layers.1.self_attn.q_proj.kernel": ("fsdp", "tensor", None),  # [64, 4, 16]
        "qwen/language_model.layers.1.self_attn.k_proj.kernel": ("fsdp", "tensor", None),  # [64, 2, 16]
        "qwen/language_model.layers.1.self_attn.k_proj.bias": ("tensor", None),  # [2, 16]
        "qwen/language_model.layers.1.self_attn.o_proj.kernel": ("tensor", None, "fsdp"),  # [4, 16, 64]
        "qwen/language_model.layers.0.mlp.up_proj.kernel": ("fsdp", "tensor"),  # [64, 48]
        "qwen/visual.patch_embed.kernel": (None, "fsdp"),  # [1176, 32]
        "qwen/visual.blocks.0.attn.qkv.kernel": ("fsdp", None),  # [32, 96]: q|k|v fused, kept whole
        "qwen/visual.blocks.0.attn.proj.kernel": (None, "fsdp"),  # [32, 32]
        "qwen/visual.blocks.1.mlp.gate_proj.kernel": ("fsdp", None),  # [32, 45]: 45 stays whole
        "qwen/visual.blocks.1.norm1.scale": (None,),
        "qwen/visual.merger.ln_q.scale": (None,),
        "qwen/visual.merger.fc1.kernel": ("fsdp", "tensor"),  # [128, 128]
        "qwen/visual.merger.fc2.kernel": ("tensor", "fsdp"),  # [128, 64]
    },
    "cpu_8": {  # data:2, fsdp:4: parameters split over fsdp only, replicated over data
        "language_model.embed_tokens.embedding": (None, "fsdp"),
        "language_model.layers.1.self_attn.q_proj.kernel": ("fsdp", None, None),
        "language_model.layers.1.mlp.down_proj.kernel": (None, "fsdp"),
        "vision_tower.embeddings.patch_embedding.kernel": (None, None, None, "fsdp"),
        "qwen/language_model.layers.1.self_attn.k_proj.kernel": ("fsdp", None, None),
        "qwen/visual.merger.fc2.kernel": (None, "fsdp"),
    },
}
# Blink on one Qwen load: every participating layer expands (tau_exp 0), regions of one merged cell.
QWEN_BLINK = dict(layers=(0, 1), region_size=1, tau_exp=0.0, tau_drop=0.0)
BLINK_LOAD = ("tp", "qwen_hf", "float32")


def _inputs(model_dir) -> dict:
    from checkpoints_conversion.hf_to_orbax import sample_batch

    return sample_batch(model_dir, batch=2, seed=3)


def _specs(mesh_name: str, source: str) -> dict:
    """The expected placements of this source's model (Qwen's are named `qwen/...` in `EXPECTED_SPECS`)."""
    qwen = source.startswith("qwen")
    return {name.removeprefix("qwen/"): spec for name, spec in EXPECTED_SPECS[mesh_name].items()
            if name.startswith("qwen/") == qwen}


def _flat(llava) -> dict[str, object]:
    from flax import nnx

    from blink_jax.weights.params import path_str

    return {path_str(path): var[...] for path, var in nnx.to_flat_state(llava.params)}


# ------------------------------------------------------------------------------------------ the subprocess


def worker(dirs: dict[str, Path], out: Path) -> None:
    """Loads every `LOADS` entry on its mesh, checks placements, writes parameters and logits to `out` (npz)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from blink_jax import load_pretrained, sharding
    from blink_jax.blink import BlinkConfig

    assert jax.device_count() == 8, jax.devices()
    saved = {}
    for mesh_name, source, dtype in LOADS:
        mesh = sharding.make_mesh(MESHES[mesh_name])
        llava = load_pretrained(dirs[source], dtype=dtype, mesh=mesh)
        params = _flat(llava)
        for name, spec in _specs(mesh_name, source).items():
            x = params[name]
            want = NamedSharding(mesh, P(*spec))
            assert x.sharding.is_equivalent_to(want, x.ndim), (mesh_name, source, name, x.sharding, spec)
        for name, x in params.items():  # every parameter placed on the whole mesh, split where its rule says
            assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, (name, x.sharding)
            assert len(x.sharding.device_set) == 8, (name, x.sharding)
            assert x.dtype == np.dtype(dtype if dtype != "bfloat16" else jax.numpy.bfloat16), (name, x.dtype)
            saved[f"{mesh_name}/{source}/{dtype}/param/{name}"] = np.asarray(x.astype(np.float32))
        if dtype == "float32":
            saved[f"{mesh_name}/{source}/{dtype}/logits"] = np.asarray(llava(**_inputs(dirs[source])).logits)
        if (mesh_name, source, dtype) == BLINK_LOAD:
            out_blink = llava(**_inputs(dirs[source]), blink=BlinkConfig(**QWEN_BLINK))
            saved[f"{mesh_name}/{source}/{dtype}/blink_logits"] = np.asarray(out_blink.logits)
    np.savez(out, **saved)


# ---------------------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    import tiny_llava as tl
    from checkpoints_conversion.hf_to_orbax import convert

    from test_qwen2_5_vl import save_model_dir

    root = tmp_path_factory.mktemp("sharded")
    tl.save_hf_model(root / "hf", seed=5, **OVERRIDES)
    convert(root / "hf", root / "converted", "bfloat16", progress=False)
    save_model_dir(root / "qwen_hf", "sharded", seed=6, spec=QWEN_SPEC)
    convert(root / "qwen_hf", root / "qwen_converted", progress=False)
    return {"hf": root / "hf", "converted": root / "converted", "qwen_hf": root / "qwen_hf",
            "qwen_converted": root / "qwen_converted"}


@pytest.fixture(scope="module")
def sharded(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_out") / "loads.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, *(str(dirs[name]) for name in SOURCES), str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return dict(np.load(out))


@pytest.mark.parametrize("mesh_name,source,dtype", LOADS)
def test_sharded_load_equals_unsharded(sharded, dirs, mesh_name, source, dtype):
    import blink_jax

    llava = blink_jax.load_pretrained(dirs[source], dtype=dtype)
    params = _flat(llava)
    prefix = f"{mesh_name}/{source}/{dtype}"
    got = {k.removeprefix(f"{prefix}/param/"): v for k, v in sharded.items() if k.startswith(f"{prefix}/param/")}
    assert set(got) == set(params)
    for name, value in params.items():  # the same bits: sharding moves values, never changes them
        np.testing.assert_array_equal(got[name], np.asarray(value.astype(np.float32)), err_msg=name)
    if dtype == "float32":
        want = np.asarray(llava(**_inputs(dirs[source])).logits)
        # Qwen's logits are larger (|x| ~ 3) and sharded matmuls sum in another order: 1e-4, the parity tolerance
        atol = 1e-4 if source.startswith("qwen") else 1e-5
        np.testing.assert_allclose(sharded[f"{prefix}/logits"], want, rtol=1e-5, atol=atol)
    if (mesh_name, source, dtype) == BLINK_LOAD:
        from blink_jax.blink import EXPAND, BlinkConfig

        out = llava(**_inputs(dirs[source]), blink=BlinkConfig(**QWEN_BLINK))
        assert (out.trace.action == EXPAND).any(), "Blink never expanded: the comparison would be vanilla's"
        np.testing.assert_allclose(sharded[f"{prefix}/blink_logits"], np.asarray(out.logits), rtol=1e-5, atol=1e-4)


def test_sharded_load_rejects_a_converted_dir_that_does_not_fit(dirs, tmp_path):
    """The orbax path checks the stored shapes against the model before reading anything."""
    import json
    import shutil

    import jax

    from blink_jax import CheckpointError, load_pretrained, sharding

    bad = tmp_path / "bad"
    shutil.copytree(dirs["converted"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 60
    (bad / "config.json").write_text(json.dumps(config))
    mesh = sharding.make_mesh("data:1", jax.devices()[:1])
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.kernel' has shape \(48, 64\), "
                                              r"expected \(48, 60\)"):
        load_pretrained(bad, mesh=mesh)


if __name__ == "__main__":
    worker({name: Path(arg) for name, arg in zip(SOURCES, sys.argv[1:-1])}, Path(sys.argv[-1]))
