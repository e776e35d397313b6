"""Failures said in a sentence, nothing stranded (issue 14): a TokenSR saved on another device setup loads here,
torn JSONL lines are repaired or named, config.json is written whole, one run per directory, flags and
questions the model cannot take are named, a checkpoint of another process count is refused in words."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_benchmarks as tb
import tiny_llava as tl
from blink_jax import rundir
from blink_jax.blink import BlinkConfig, TokenSRBank
from blink_jax.blink.checkpoint import fingerprint, load_tokensr, save_tokensr
from eval import predict as eval_predict
from eval import run as eval_run
from eval import score as eval_score
from eval.harness.io import TornLineWarning, append_lines, open_append_jsonl, read_jsonl
from eval.harness.questions import question_error
from train import tokensr as train_cli
from train.config import TrainConfig, TrainConfigError

ROOT = Path(__file__).resolve().parents[1]
BLINK = BlinkConfig(layers=(1, 2), region_size=3, tokensr_kind="conv", tokensr_channels=7)
DIM = tl.tiny_hf_config().text_config.hidden_size


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    tl.save_hf_model(root / "model", seed=0, vision_image_size=84, text_num_hidden_layers=3, vision_num_hidden_layers=2)
    tl.photo(90, 70, seed=1).save(root / "a.png")
    return root


def eval_args(env: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--bench", "pope", "--model", str(env / "model"), "--data-dir", str(data), "--modes", "vanilla",
            "--out", str(out), "--tfds-dir", str(env / "tfds"), "--batch-size", "4", "--bucket", "32",
            "--max-new-tokens", "3", "--dtype", "float32", "--no-progress", *extra]


# ----------------------------------------------------------------------------- 1. TokenSR on any device setup

def _move_saved_arrays_to(ckpt: Path, device: str) -> None:
    """Rewrites the orbax sharding metadata as if every array had been saved on `device` (e.g. a TPU core)."""
    meta = ckpt / "params" / "_sharding"
    entries = json.loads(meta.read_text())
    assert entries and all("device_str" in json.loads(v) for v in entries.values())
    meta.write_text(json.dumps({k: json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": device})
                                for k in entries}))


def test_tokensr_saved_on_a_device_this_machine_lacks_loads_here(tmp_path):
    bank = TokenSRBank(BLINK, DIM, rngs=nnx.Rngs(3))
    save_tokensr(tmp_path / "sr", bank, BLINK, dim=DIM)
    _move_saved_arrays_to(tmp_path / "sr", "TPU_5(process=0,(1,1,0,0))")
    loaded, cfg = load_tokensr(tmp_path / "sr")
    assert cfg == BLINK and fingerprint(loaded) == fingerprint(bank)
    here = jax.local_devices()[0]
    for _, value in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
        assert value[...].devices() == {here}
    # ... or onto a mesh the caller gives (replicated over it).
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_mesh, _ = load_tokensr(tmp_path / "sr", sharding=replicated)
    assert fingerprint(on_mesh) == fingerprint(bank)
    for _, value in nnx.to_flat_state(nnx.state(on_mesh, nnx.Param)):
        assert value[...].sharding == replicated


def test_bundled_demo_tokensr_loads_whatever_device_it_names(tmp_path):
    shutil.copytree(ROOT / "demo" / "tokensr", tmp_path / "tokensr")
    _move_saved_arrays_to(tmp_path / "tokensr", "cuda:3")
    moved, cfg = load_tokensr(tmp_path / "tokensr")
    original, original_cfg = load_tokensr(ROOT / "demo" / "tokensr")
    assert cfg == original_cfg and fingerprint(moved) == fingerprint(original)


TWO_PROCESSES = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=60)
from blink_jax.blink.checkpoint import fingerprint, load_tokensr
bank, _ = load_tokensr(sys.argv[3])
print("fingerprint", fingerprint(bank), flush=True)
"""


def test_demo_tokensr_loads_in_each_process_of_a_two_process_run():
    """Process 1 has no device cpu:0 (the demo's arrays were saved there): it used to refuse the checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    children = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, address, str(i), str(ROOT / "demo" / "tokensr")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
                for i in range(2)]
    outputs = [c.communicate(timeout=180)[0] for c in children]
    expected = fingerprint(load_tokensr(ROOT / "demo" / "tokensr")[0])
    for i, (child, output) in enumerate(zip(children, outputs)):
        assert child.returncode == 0 and f"fingerprint {expected}" in output, (i, output[-2000:])


# ----------------------------------------------------------------------------- 5. torn lines, atomic config.json

def test_a_torn_last_line_is_cut_off_with_a_warning_and_a_whole_one_kept(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"question_id": "a"}\n{"question_id": "b"}\n{"question_id": "c", "predic')
    with pytest.warns(TornLineWarning, match=f"{path}: dropped the torn last line"):
        with open_append_jsonl(path) as f:
            append_lines(f, [{"question_id": "c", "prediction": "yes"}])
    assert path.read_text() == '{"question_id": "a"}\n{"question_id": "b"}\n{"question_id": "c", "prediction": "yes"}\n'
    # A whole record whose newline was not written yet is a record: it gets its newline, nothing is dropped.
    path.write_text('{"question_id": "a"}\n{"question_id": "b"}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_append_jsonl(path).close()
    assert [r["question_id"] for r in read_jsonl(path)] == ["a", "b"] and path.read_text().endswith("}\n")


def test_rescoring_a_file_with_a_torn_line_names_it_and_says_partial(env, tmp_path, capsys):
    ids = tb.make_pope(tmp_path / "pope", corrupt=False)
    questions = [q for split in ids.values() for q in split]
    path = tmp_path / "samples_pope_vanilla.jsonl"
    lines = [json.dumps({"question_id": q, "prediction": "yes", "error": None}) for q in questions[:-1]]
    path.write_text("\n".join(lines) + '\n{"question_id": "' + questions[-1] + '", "predic')
    with pytest.warns(TornLineWarning, match=f"{path}:{len(questions)}: skipped a line that is not JSON"):
        assert eval_score.main(["--bench", "pope", "--samples", str(path), "--data-dir", str(tmp_path / "pope"),
                                "--tfds-dir", str(env / "tfds")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["counts"]["missing"] == 1
    assert "eval.score: partial" in out.err and "1 of the" in out.err


def test_config_json_is_replaced_whole_and_a_cut_one_is_named(tmp_path, monkeypatch, capsys):
    cfg = TrainConfig(model="m", data_dir="d", workdir=str(tmp_path))
    path = tmp_path / "config.json"
    cfg.save(path)
    assert TrainConfig.from_json(path) == cfg
    # A write that dies before it is complete (here: the disk refuses the fsync) leaves the old file.
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        TrainConfig(model="other", data_dir="d", workdir=str(tmp_path)).save(path)
    monkeypatch.undo()
    assert TrainConfig.from_json(path) == cfg and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    # A config.json cut short (written by an older version, or by hand) is named with the fix.
    path.write_text(cfg.to_json()[:40])
    with pytest.raises(TrainConfigError, match=f"{path} is not a whole training config .* Delete it and rerun"):
        TrainConfig.from_json(path)
    assert train_cli.main(["--export-only", "--workdir", str(tmp_path)]) == 2
    assert f"{path} is not a whole training config" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. one run per directory

HOLDER = """
import sys, time
from blink_jax import rundir
with rundir.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A directory held by another process (a run in progress), and that process."""
    directory = tmp_path / "busy"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline().strip() == "held"
    yield directory, child
    child.kill()
    child.wait()


def test_a_held_directory_is_refused_at_once_and_freed_by_a_kill(held):
    directory, child = held
    with pytest.raises(rundir.DirectoryBusy, match=f"{directory} is in use by another run \\(pid {child.pid} "):
        with rundir.hold(directory, flag="--out"):
            pass
    with rundir.hold(directory, process=1):  # another process of a multi-process run locks its own file
        pass
    os.kill(child.pid, signal.SIGKILL)  # killed mid-run: its lock file stays, its lock does not
    child.wait()
    assert rundir.lock_path(directory).exists()
    with rundir.hold(directory) as path:
        assert f"pid {os.getpid()} " in path.read_text()
    assert not rundir.lock_path(directory).exists()


def test_a_lock_is_released_and_an_unused_new_directory_removed(tmp_path):
    with rundir.hold(tmp_path / "new"):
        with pytest.raises(rundir.DirectoryBusy):  # a second holder in the same process is refused as well
            with rundir.hold(tmp_path / "new"):
                pass
    assert not (tmp_path / "new").exists()
    with rundir.hold(tmp_path / "kept"):
        (tmp_path / "kept" / "results.json").write_text("{}")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["results.json"]


def test_eval_and_training_refuse_a_directory_another_run_holds(env, held, capsys):
    directory, child = held
    assert eval_run.main(eval_args(env, env / "no_data_needed", directory)) == 2
    err = capsys.readouterr().err
    assert f"eval.run: {directory} is in use by another run (pid {child.pid} " in err and "another --out" in err
    assert train_cli.main(["--model", str(env / "model"), "--data-dir", str(env), "--workdir", str(directory),
                           "--layers", "1,2", "--region-size", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{directory} is in use by another run (pid {child.pid} " in err and "another --workdir" in err
    assert sorted(p.name for p in directory.iterdir()) == [".lock-process-0"]  # neither wrote anything


# ----------------------------------------------------------------------------- 7. flags

@pytest.mark.parametrize("value", ["-3", "0"])
def test_max_new_tokens_must_be_positive(env, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        eval_run.main(eval_args(env, tmp_path, tmp_path / "out", "--max-new-tokens", value))
    assert e.value.code == 2
    assert f"--max-new-tokens: {value!r} is not a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing left that a rerun would trip over
    with pytest.raises(SystemExit):
        eval_predict.main(["--model", str(env / "model"), "--image", str(env / "a.png"), "--question", "q",
                           "--max-new-tokens", value])
    assert "is not a positive integer" in capsys.readouterr().err


def test_predict_names_a_tokensr_of_another_model(env, tmp_path):
    save_tokensr(tmp_path / "sr", TokenSRBank(BLINK, DIM + 4, rngs=nnx.Rngs(0)), BLINK, dim=DIM + 4)
    with pytest.raises(SystemExit) as e:
        eval_predict.main(["--model", str(env / "model"), "--image", str(env / "a.png"), "--question", "what is it ?",
                           "--tokensr", str(tmp_path / "sr")])
    assert f"--tokensr {tmp_path / 'sr'}: " in str(e.value) and "trained for hidden size" in str(e.value)


# ----------------------------------------------------------------------------- 8. questions the model cannot take

def test_question_error_rules():
    ok = {"question": "Is there a dog?"}
    assert question_error(ok, [1] * 200, max_positions=256, max_new_tokens=56) is None
    assert "empty" in question_error({"question": "  "}, [1] * 10, max_positions=256, max_new_tokens=3)
    message = question_error(ok, [1] * 200, max_positions=256, max_new_tokens=57)
    assert "257 positions, past the model's context of 256 (max_position_embeddings)" in message
    assert "200 tokens" in message


def test_empty_and_too_long_questions_are_recorded_as_errors(env, tmp_path):
    ids = tb.make_pope(tmp_path / "pope", corrupt=False)
    path = tmp_path / "pope" / "coco_pope_random.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["text"] = ""
    rows[1]["text"] = "is there a dog " * 60 + "?"  # 240 words: past the tiny model's 256 positions with the image
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert eval_run.main(eval_args(env, tmp_path / "pope", out)) == 0
    results = json.loads((out / "results.json").read_text())
    errors = {e["question_id"]: e["error"] for e in results["modes"]["vanilla"]["errors"]}
    assert set(errors) == {f"random/{rows[0]['question_id']}", f"random/{rows[1]['question_id']}"}
    assert "the question is empty" in errors[f"random/{rows[0]['question_id']}"]
    assert "max_position_embeddings" in errors[f"random/{rows[1]['question_id']}"]
    answered = [r for r in read_jsonl(out / "samples_pope_vanilla.jsonl") if r["error"] is None]
    assert len(answered) == sum(map(len, ids.values())) - 2  # the others are answered as before


# ----------------------------------------------------------------------------- 9. another process count

def test_a_checkpoint_of_two_processes_is_refused_in_one_in_a_sentence(tmp_path):
    import grain

    from blink_jax import CheckpointError
    from train.checkpointing import Checkpointer

    loader = grain.DataLoader(data_source=list(range(20)), sampler=grain.samplers.IndexSampler(
        num_records=20, shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True), shuffle=True,
        num_epochs=None, seed=0), operations=[grain.transforms.Batch(batch_size=2)], worker_count=0)
    iterator = iter(loader)
    next(iterator)
    state = {"w": jnp.arange(5.0), "step": jnp.asarray(1)}
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    ckpt.save(1, state, iterator)
    ckpt.wait()
    ckpt.close()
    data = tmp_path / "checkpoints" / "1" / "data"
    # The layout a 2-process run leaves: one iterator position per process.
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    with pytest.raises(CheckpointError, match="saved by 2 process\\(es\\) .* and this run has 1: .* Resume with the "
                                              "process count it was saved with, or export .* --export-only --workdir "
                                              f"{tmp_path}"):
        ckpt.restore(1, abstract, iter(loader))
    # What does not depend on the data order (the export) still reads it.
    np.testing.assert_array_equal(np.asarray(ckpt.restore_state(1, abstract)["w"]), np.arange(5.0))
    ckpt.close()


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit PNG opens in PIL as "I;16"; `convert("RGB")` clips it at 255 (a white image). Scaled instead,
    v * 255 / 65535 rounded, by the library's loader and the benchmarks' embedded-image path alike."""
    import io

    from PIL import Image

    from blink_jax.processing import load_image
    from eval.benchmarks import get

    wide = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)  # 0 .. 64155
    Image.fromarray(wide).save(tmp_path / "g16.png")
    want = np.round(wide.astype(np.float64) * 255 / 65535).astype(np.uint8)
    got = np.asarray(load_image(tmp_path / "g16.png"))
    assert got.shape == (6, 8, 3) and got[..., 0].max() < 255
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], want)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    embedded = get("pope").load_image({"question_id": "q", "image_bytes": buffer.getvalue()}, tmp_path)
    np.testing.assert_array_equal(np.asarray(embedded)[..., 1], want)


# ----------------------------------------------------------------------------- 4. outputs checked before work

def test_unwritable_outputs_are_named_before_the_model_loads(env, tmp_path, monkeypatch, capsys):
    """An --out below a file, or a disk with too little free space, is one sentence before anything loads
    (the model loader is made to fail loudly if it is reached)."""
    import shutil as shutil_lib

    from blink_jax import rundir
    from eval.harness import runner
    from train import tokensr as train_cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(runner, "load_model", no_loading)
    (tmp_path / "a_file").write_text("x")
    assert eval_run.main(eval_args(env, tmp_path, tmp_path / "a_file" / "out")) == 2
    assert "--out" in capsys.readouterr().err
    assert train_cli.main(["--model", str(env / "model"), "--data-dir", str(tmp_path), "--workdir",
                           str(tmp_path / "a_file" / "w"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--workdir" in err and "is a file, not a directory" in err
    usage = shutil_lib.disk_usage(tmp_path)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage._replace(free=3 << 20))
    assert eval_run.main(eval_args(env, tmp_path, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "only 3 MiB free" in err
    assert not (tmp_path / "out").exists()  # nothing created


def test_a_disk_that_fills_mid_run_is_one_sentence_and_the_rerun_resumes(env, tmp_path, monkeypatch, capsys):
    import errno

    from eval.harness import runner

    ids = tb.make_pope(tmp_path / "pope", corrupt=False)
    out = tmp_path / "out"
    write_results = runner.write_results

    def full_disk(*args, **kwargs):  # the answers are on disk; the results file is what no longer fits
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "results.json"))

    monkeypatch.setattr(runner, "write_results", full_disk)
    assert eval_run.main(eval_args(env, tmp_path / "pope", out)) == 1
    err = capsys.readouterr().err
    assert "results.json failed: No space left on device" in err and "rerun the same command" in err
    assert "Traceback" not in err
    monkeypatch.setattr(runner, "write_results", write_results)
    assert eval_run.main(eval_args(env, tmp_path / "pope", out)) == 0
    total = sum(map(len, ids.values()))
    samples = list(read_jsonl(out / "samples_pope_vanilla.jsonl"))
    assert len(samples) == len({r["question_id"] for r in samples}) == total  # resumed: nothing asked twice
    assert json.loads((out / "results.json").read_text())["modes"]["vanilla"]["counts"]["answered"] == total
