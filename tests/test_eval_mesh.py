"""The eval commands on a device mesh and on several processes, against the same commands on one device.

`python -m eval.run --bench pope` (the bundled demo, 2 questions per split, all three modes, batch 8) with
`--mesh cpu_8` over 8 simulated CPU devices, and as 2 processes x 4 devices (gloo, killed after the first mode
and resumed), gives the one-device run's predictions, traces and metrics; `eval.predict --mesh` its answer and
trace. 8 simulated devices need XLA_FLAGS set before JAX starts: the mesh runs are subprocesses (this file, run
as a script, for the 8-device checks), started first so that they overlap the one-device run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eval.demo import DEMO

pytestmark = pytest.mark.skipif(bool(DEMO.missing()), reason="the demo/ folder is not bundled in this checkout")

REPO = Path(__file__).resolve().parents[1]
MODES = ("vanilla", "interp", "blink")
RUN = ["--bench", "pope", "--limit", "2", "--batch-size", "8", "--no-progress", "--modes", ",".join(MODES)]
QUESTION = "Is there a circle in the image?"


def image() -> Path:
    return sorted((DEMO.data_dir("pope") / "val2014").iterdir())[0]


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def predict_demo(mesh):
    """eval.predict's function on the demo model in mode blink -> (answer, trace arrays)."""
    from blink_jax import load_pretrained
    from blink_jax.processing import Processor
    from eval.predict import blink_settings, predict

    blink, bank = blink_settings("blink", tokensr_dir=str(DEMO.tokensr), tau_exp=DEMO.tau_exp,
                                 tau_drop=DEMO.tau_drop)
    llava = load_pretrained(DEMO.model, mesh=mesh)
    result = predict(llava, Processor.from_pretrained(DEMO.model, config=llava.config), image(), QUESTION, blink,
                     bank)
    t = result.trace
    return result.answer, {"rho": t.rho, "region": t.region, "action": t.action, "expanded": t.expanded_region,
                           "attention": t.attention}


def calibrate_cli(out: Path, extra: list[str]) -> dict:
    """eval.calibrate on the first 8 demo images (one batch of 8), its --out report."""
    from eval.calibrate import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--model", str(DEMO.model), "--data", str(DEMO.data_dir("pope") / "val2014"), "--limit", "8",
                     "--batch-size", "8", "--layers", "1-3", "--region-size", "3", "--out", str(out),
                     "--no-progress", *extra]) == 0
    return json.loads(out.read_text())


def predict_cli(extra: list[str]) -> str:
    from eval.predict import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--model", str(DEMO.model), "--tokensr", str(DEMO.tokensr), "--image", str(image()),
                     "--question", QUESTION, *extra]) == 0
    return out.getvalue()


# ------------------------------------------------------------------------------------ the 8-device worker


def worker(root: Path) -> None:
    """On 8 devices: eval.run --mesh cpu_8, eval.predict --mesh, the output layout, and the errors of meshes that
    do not fit. Writes what the tests compare to `root`."""
    import jax

    from blink_jax import load_pretrained, runtime, sharding
    from blink_jax.loading import inference_mesh
    from eval import run as eval_run

    assert jax.device_count() == 8, jax.devices()
    assert eval_run.main([*RUN, "--out", str(root / "mesh"), "--tfds-dir", str(root / "tfds8"), "--mesh",
                          "cpu_8"]) == 0
    report: dict = {"predict_cli": predict_cli(["--mesh", "cpu_8"]),
                    "calibrate": calibrate_cli(root / "calibrate8.json", ["--mesh", "cpu_8"])["examples"]}
    mesh = sharding.make_mesh("cpu_8")
    answer, trace = predict_demo(mesh)
    report["predict_answer"] = answer
    np.savez(root / "predict8.npz", **trace)

    # Where the outputs live: the batch of tokens, trace and (through them) the cache follows the inputs' split.
    llava = load_pretrained(DEMO.model, mesh=mesh)
    from blink_jax.processing import Processor, build_prompt
    processor = Processor.from_pretrained(DEMO.model, config=llava.config)
    inputs = processor([build_prompt(QUESTION)] * 8, [image()] * 8)
    ids, px, mask = llava.check_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    assert ids.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None), ids.sharding
    from eval.predict import blink_settings
    blink, bank = blink_settings("blink", tokensr_dir=str(DEMO.tokensr))
    b = llava._blink_args(blink, bank, None)
    tokens, t = runtime._generate(llava.graphdef, llava.params, b.bank_def, b.bank_state, ids, px, mask,
                                  b.thresholds, b.key, static=b.static, max_new_tokens=4, eos_token_id=-1,
                                  pad_token_id=0)
    report["layouts"] = {"tokens": tokens.sharding.shard_shape(tokens.shape),
                         "rho": t.rho.sharding.shard_shape(t.rho.shape)}

    # Meshes that do not fit fail before anything is loaded or written.
    errors = {}
    for name, extra in {"devices": ["--mesh", "data:3"], "batch": ["--mesh", "data:8", "--batch-size", "6"]}.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = eval_run.main([*RUN, "--out", str(root / f"bad_{name}"), "--tfds-dir", str(root / "tfds8"), *extra])
        errors[name] = {"rc": rc, "stderr": err.getvalue(), "written": (root / f"bad_{name}").exists()}
    cfg_mesh = lambda spec, memory: inference_mesh(DEMO.model, spec, memory=memory)
    whole = sharding.param_bytes_per_device(_shapes(), sharding.make_mesh("data:8"))
    for name, spec in {"too_big_default": None, "too_big_given": "data:8"}.items():
        try:
            cfg_mesh(spec, int(whole / 2))
            errors[name] = {"stderr": ""}
        except sharding.MeshError as e:
            errors[name] = {"stderr": str(e)}
    report["fits_on_cpu_8"] = dict(cfg_mesh("cpu_8", int(whole / 2)).shape)
    report["errors"] = errors
    (root / "report8.json").write_text(json.dumps(report))


def _shapes():
    import jax
    from flax import nnx

    from blink_jax.config import LlavaConfig
    from blink_jax.weights.params import abstract_model

    _, abstract = nnx.split(abstract_model(LlavaConfig.from_json(DEMO.model)))
    return {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in nnx.to_flat_state(abstract)}


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_mesh")


@pytest.fixture(scope="module")
def eight(root):
    proc = subprocess.Popen([sys.executable, __file__, str(root)], cwd=REPO, env=env(8), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def one(root, eight):
    """The one-device run (in this process, while the 8-device worker runs)."""
    from eval import run as eval_run

    assert eval_run.main([*RUN, "--out", str(root / "one"), "--tfds-dir", str(root / "tfds1")]) == 0
    return root / "one"


@pytest.fixture(scope="module")
def report(root, eight, one):
    out, _ = eight.communicate(timeout=900)
    assert eight.returncode == 0, out[-6000:]
    return json.loads((root / "report8.json").read_text())


def samples(out: Path, mode: str) -> dict[str, tuple]:
    rows = [json.loads(line) for line in (out / f"samples_pope_{mode}.jsonl").read_text().splitlines()]
    return {r["question_id"]: (r["prediction"], r["error"], r["trace"]) for r in rows}


def metrics(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {name: (entry["metrics"], entry["counts"]) for name, entry in results["modes"].items()}


# ------------------------------------------------------------------------------------------------ tests


def test_mesh_run_answers_like_one_device(root, one, report):
    for mode in MODES:
        got, want = samples(root / "mesh", mode), samples(one, mode)
        assert len(want) == 6 and got == want, mode  # predictions and Blink's trace summaries
    assert metrics(root / "mesh") == metrics(one)
    programs = json.loads((root / "mesh" / "results.json").read_text())["config"]["programs"]
    assert all(len(shapes) == 1 for shapes in programs.values()), programs  # one program per (mode, bucket)


def test_outputs_follow_the_batch_split(report):
    # 8 rows on data:2 x fsdp:4: each device holds one row of the tokens and of every trace field.
    assert report["layouts"] == {"tokens": [1, 4], "rho": [3, 1]}


def test_predict_on_a_mesh_gives_the_same_answer_and_trace(root, report):
    answer, trace = predict_demo(None)
    assert report["predict_answer"] == answer
    got = dict(np.load(root / "predict8.npz", allow_pickle=True))
    for name in ("region", "action", "expanded"):
        np.testing.assert_array_equal(got[name], trace[name], err_msg=name)
    np.testing.assert_allclose(got["rho"], trace["rho"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["attention"], trace["attention"], rtol=1e-4, atol=1e-6)
    assert report["predict_cli"] == predict_cli([])  # the command: answer and trace table


def test_calibrate_on_a_mesh_measures_the_same_rho(tmp_path, report):
    want = calibrate_cli(tmp_path / "one.json", [])["examples"]
    got = report["calibrate"]
    assert [(e["image"], e["region"]) for e in got] == [(e["image"], e["region"]) for e in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose([g["rho"][k] for k in sorted(g["rho"])], [w["rho"][k] for k in sorted(w["rho"])],
                                   rtol=1e-5)


def test_meshes_that_do_not_fit_fail_before_loading(report):
    errors = report["errors"]
    assert errors["devices"]["rc"] == 2 and not errors["devices"]["written"]
    assert "--mesh=data:3 needs 3 devices" in errors["devices"]["stderr"] and "8 cpu device" in errors["devices"]["stderr"]
    assert errors["batch"]["rc"] == 2 and not errors["batch"]["written"]
    assert "--batch-size 6 does not split" in errors["batch"]["stderr"] and "--batch-size 8" in errors["batch"]["stderr"]
    for name in ("too_big_default", "too_big_given"):
        assert "use --mesh=cpu_8" in errors[name]["stderr"], errors[name]
    assert report["fits_on_cpu_8"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_param_bytes_per_device_from_the_rules():
    import jax

    from blink_jax import sharding

    mesh = jax.sharding.AbstractMesh((2, 4, 1), sharding.MESH_AXES)
    shapes = {("language_model", "lm_head", "kernel"): jax.ShapeDtypeStruct((48, 96), np.float32),  # fsdp: 12 x 96
              ("language_model", "norm", "scale"): jax.ShapeDtypeStruct((48,), np.float32),  # whole
              ("multi_modal_projector", "linear_1", "kernel"): jax.ShapeDtypeStruct((42, 48), np.float16)}  # 42 % 4
    assert sharding.param_bytes_per_device(shapes, mesh) == 12 * 96 * 4 + 48 * 4 + 42 * 48 * 2


def test_parts_of_a_killed_multi_process_run_count_as_answered_and_merge(tmp_path):
    from eval.harness.resume import answered, merge_parts, part_path, read_records

    main = tmp_path / "samples_pope_blink.jsonl"
    lines = lambda *rows: "".join(json.dumps(r) + "\n" for r in rows)
    main.write_text(lines({"question_id": "a", "error": None}, {"question_id": "b", "error": "bad image"}))
    part_path(main, 0).write_text(lines({"question_id": "b", "error": None}))  # b asked again and answered
    part_path(main, 1).write_text(lines({"question_id": "c", "error": None}) + '{"question_id": "d", "err')  # torn
    assert part_path(main, 1).name == "samples_pope_blink.part1.jsonl"
    assert answered(main, retry_errors=True) == {"a", "b", "c"}
    merge_parts(main)
    assert sorted(p.name for p in tmp_path.iterdir()) == [main.name]
    assert [r["question_id"] for r in read_records(main)] == ["a", "b", "b", "c"]
    assert answered(main, retry_errors=True) == {"a", "b", "c"}


def test_one_device_mesh_errors_name_the_fix(tmp_path, capsys):
    from eval import run as eval_run

    assert eval_run.main([*RUN, "--out", str(tmp_path / "out"), "--mesh", "cpu_8"]) == 2
    assert "xla_force_host_platform_device_count=8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_processes_write_one_result_and_resume_after_a_kill(root, one, report):
    """2 processes x 4 devices: killed (SIGKILL, both) once the first mode is written, then rerun to the end."""
    out = root / "two"
    args = [*RUN, "--out", str(out), "--tfds-dir", str(root / "tfds2"), "--mesh", "cpu_8"]

    def start():
        port = free_port()
        return [subprocess.Popen([sys.executable, "-m", "eval.run", *args, "--coordinator", f"localhost:{port}",
                                  "--num-processes", "2", "--process-id", str(i)], cwd=REPO, env=env(4),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]

    procs = start()
    deadline = time.time() + 600
    while not (out / "samples_pope_vanilla.jsonl").exists() and time.time() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (out / "results.json").exists() or metrics(out).keys() == {"vanilla"}  # stopped after mode 1
    procs = start()
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "already answered" in logs[0]  # the rerun resumed
    assert sorted(p.name for p in out.iterdir() if ".part" in p.name) == []  # parts merged, one file per mode
    assert metrics(out) == metrics(one)
    for mode in MODES:
        assert samples(out, mode) == samples(one, mode), mode


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
