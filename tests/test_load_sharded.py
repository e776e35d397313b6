"""`blink_jax.load_pretrained(..., mesh=...)`: every parameter born sharded as the rules table says, from an HF
directory and from a converted one, holding exactly the values of the unsharded load, with equal logits.

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
# Tiny model with MLP widths that the tensor axis divides (64) and one that it does not (45): both rules show.
OVERRIDES = dict(text_intermediate_size=64, vision_intermediate_size=45)
MESHES = {"cpu_8": "cpu_8", "tp": "fsdp:4,tensor:2"}
# (mesh, source, dtype) loads compared; sources are the HF directory and a bfloat16 converted directory.
LOADS = (("cpu_8", "hf", "float32"), ("tp", "hf", "float32"), ("tp", "converted", "float32"),
         ("tp", "hf", "bfloat16"), ("cpu_8", "converted", "bfloat16"))

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
    },
    "cpu_8": {  # data:2, fsdp:4: parameters split over fsdp only, replicated over data
        "language_model.embed_tokens.embedding": (None, "fsdp"),
        "language_model.layers.1.self_attn.q_proj.kernel": ("fsdp", None, None),
        "language_model.layers.1.mlp.down_proj.kernel": (None, "fsdp"),
        "vision_tower.embeddings.patch_embedding.kernel": (None, None, None, "fsdp"),
    },
}


def _inputs(cfg):
    from checkpoints_conversion.hf_to_orbax import sample_inputs

    return sample_inputs(cfg, batch=2, seed=3)


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

    assert jax.device_count() == 8, jax.devices()
    saved = {}
    for mesh_name, source, dtype in LOADS:
        mesh = sharding.make_mesh(MESHES[mesh_name])
        llava = load_pretrained(dirs[source], dtype=dtype, mesh=mesh)
        params = _flat(llava)
        for name, spec in EXPECTED_SPECS[mesh_name].items():
            x = params[name]
            want = NamedSharding(mesh, P(*spec))
            assert x.sharding.is_equivalent_to(want, x.ndim), (mesh_name, source, name, x.sharding, spec)
        for name, x in params.items():  # every parameter placed on the whole mesh, split where its rule says
            assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, (name, x.sharding)
            assert len(x.sharding.device_set) == 8, (name, x.sharding)
            assert x.dtype == np.dtype(dtype if dtype != "bfloat16" else jax.numpy.bfloat16), (name, x.dtype)
            saved[f"{mesh_name}/{source}/{dtype}/param/{name}"] = np.asarray(x.astype(np.float32))
        if dtype == "float32":
            logits = llava(**dict(zip(("input_ids", "pixel_values", "attention_mask"), _inputs(llava.config))))
            saved[f"{mesh_name}/{source}/{dtype}/logits"] = np.asarray(logits.logits)
    np.savez(out, **saved)


# ---------------------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    import tiny_llava as tl
    from checkpoints_conversion.hf_to_orbax import convert

    root = tmp_path_factory.mktemp("sharded")
    tl.save_hf_model(root / "hf", seed=5, **OVERRIDES)
    convert(root / "hf", root / "converted", "bfloat16", progress=False)
    return {"hf": root / "hf", "converted": root / "converted"}


@pytest.fixture(scope="module")
def sharded(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_out") / "loads.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(dirs["hf"]), str(dirs["converted"]), str(out)], cwd=REPO,
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
        want = np.asarray(llava(**dict(zip(("input_ids", "pixel_values", "attention_mask"),
                                           _inputs(llava.config)))).logits)
        np.testing.assert_allclose(sharded[f"{prefix}/logits"], want, rtol=1e-5, atol=1e-5)


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
    worker({"hf": Path(sys.argv[1]), "converted": Path(sys.argv[2])}, Path(sys.argv[3]))
