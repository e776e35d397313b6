"""`python -m eval.run` end to end on a tiny random LLaVA: tiny POPE and MME directories, all three modes,
kill-and-resume, a corrupt image, bounded compilations, rescoring, the report."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
from flax import nnx

import tiny_benchmarks as tb
import tiny_llava as tl
from blink_jax import runtime
from blink_jax.blink import BlinkConfig, TokenSRBank
from blink_jax.blink.checkpoint import save_tokensr
from eval import report as eval_report
from eval import run as eval_run
from eval import score as eval_score
from eval.harness import runner as harness_runner
from eval.harness.io import read_jsonl

LAYERS = (1, 2)
# The tiny model's rho sits near 1/R = 0.25 (4 regions): thresholds there make it expand, keep and drop.
TAU_EXP, TAU_DROP = "0.26", "0.255"
MODES = ("vanilla", "interp", "blink")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    # 84px images -> a 6x6 grid; region_size 3 -> 4 regions.
    tl.save_hf_model(root / "model", seed=0, vision_image_size=84, text_num_hidden_layers=3, vision_num_hidden_layers=2)
    cfg = BlinkConfig(layers=LAYERS, region_size=3, tokensr_kind="conv", tokensr_channels=7)
    dim = tl.tiny_hf_config().text_config.hidden_size
    save_tokensr(root / "tokensr", TokenSRBank(cfg, dim, rngs=nnx.Rngs(0)), cfg, dim=dim)
    pope_ids = tb.make_pope(root / "pope")
    mme_ids = tb.make_mme(root / "mme")
    return types.SimpleNamespace(root=root, model=root / "model", tokensr=root / "tokensr", tfds=root / "tfds",
                                 data={"pope": root / "pope", "mme": root / "mme"}, pope_ids=pope_ids, mme_ids=mme_ids)


def cli_args(env, bench: str, out: Path, *extra: str, modes: str = ",".join(MODES)) -> list[str]:
    return ["--bench", bench, "--model", str(env.model), "--data-dir", str(env.data[bench]), "--tokensr",
            str(env.tokensr), "--modes", modes, "--out", str(out), "--tfds-dir", str(env.tfds), "--batch-size", "4",
            "--bucket", "32", "--max-new-tokens", "3", "--dtype", "float32", "--layers", "1,2", "--region-size", "3",
            "--tau-exp", TAU_EXP, "--tau-drop", TAU_DROP, "--no-progress", *extra]


def compiled() -> int:
    return runtime._generate._cache_size()


@pytest.fixture(scope="module")
def pope_run(env):
    out = env.root / "pope_out"
    before = compiled()
    assert eval_run.main(cli_args(env, "pope", out, "--save-traces")) == 0
    after = compiled()
    return types.SimpleNamespace(out=out, results=json.loads((out / "results.json").read_text()),
                                 new_programs=after - before)


def samples(out: Path, bench: str, mode: str) -> list[dict]:
    return list(read_jsonl(out / f"samples_{bench}_{mode}.jsonl"))


def test_pope_all_modes_end_to_end(env, pope_run):
    results = pope_run.results
    assert list(results["modes"]) == list(MODES)
    all_ids = [q for ids in env.pope_ids.values() for q in ids]
    for mode in MODES:
        entry = results["modes"][mode]
        assert entry["counts"] == {"questions": 10, "answered": 9, "errors": 1, "missing": 0, "unknown_ids": 0}
        assert set(entry["metrics"]["splits"]) == {"random", "popular", "adversarial"}
        assert entry["headline"]["POPE"] == pytest.approx(100 * entry["metrics"]["average"]["f1"])
        rows = samples(pope_run.out, "pope", mode)
        assert sorted(r["question_id"] for r in rows) == sorted(all_ids)  # one line per question
        for row in rows:
            assert set(row) >= {"question_id", "prediction", "trace", "error"}
            assert (row["trace"] is None) == (mode == "vanilla" or row["error"] is not None)
    assert results["paper"]["POPE"] == {"vanilla": 85.17, "interp": 85.17, "blink": 85.23}
    assert results["config"]["mode_settings"]["blink"]["blink"]["tokensr_kind"] == "conv"
    assert results["config"]["mode_settings"]["interp"]["blink"]["tau_exp"] == float(TAU_EXP)
    assert results["versions"]["jax"] and "device" in results["versions"]
    table = (pope_run.out / "results.md").read_text()
    assert "| POPE |" in table and "85.17" in table and "85.23" in table and "Blink-interp (paper)" in table
    traced = [r["trace"] for r in samples(pope_run.out, "pope", "blink") if r["trace"]]
    assert any(t["expansions"] for t in traced), "thresholds chosen to make the tiny model expand"


def test_corrupt_image_is_recorded_and_counted_wrong(pope_run):
    for mode in MODES:
        (error,) = pope_run.results["modes"][mode]["errors"]
        assert error["question_id"] == "random/5" and tb.CORRUPT_POPE_IMAGE in error["error"]
        (row,) = [r for r in samples(pope_run.out, "pope", mode) if r["error"]]
        assert row["prediction"] is None and row["question_id"] == "random/5"
    # it counts, as wrong (label "yes": a false negative), as the official scripts count an unusable answer
    random = pope_run.results["modes"]["vanilla"]["metrics"]["splits"]["random"]
    assert random["n"] == 5 and random["FN"] >= 1


def test_buckets_bound_compilations(pope_run):
    # 9 readable questions in batches of 4 = 3 batches per mode, all in the one 96-token bucket: one program
    # per mode (vanilla; interp and blink each their own Blink program), however many batches.
    programs = pope_run.results["config"]["programs"]
    assert programs == {mode: [[4, 96, 3]] for mode in MODES}
    assert pope_run.new_programs <= len(MODES)  # one program per (mode, bucket): vanilla, interp, conv


def test_mme_all_modes_end_to_end(env):
    out = env.root / "mme_out"
    assert eval_run.main(cli_args(env, "mme", out)) == 0
    results = json.loads((out / "results.json").read_text())
    for mode in MODES:
        entry = results["modes"][mode]
        assert entry["counts"]["answered"] == 8 and entry["counts"]["errors"] == 0
        assert set(entry["metrics"]["subtasks"]) == {"existence", "artwork", "code_reasoning"}
        assert set(entry["headline"]) == {"MME Perception", "MME Cognition", "MME total"}
        assert sorted(r["question_id"] for r in samples(out, "mme", mode)) == sorted(env.mme_ids)
    assert results["paper"]["MME Perception"]["blink"] == 1519.74
    assert "| MME Cognition |" in (out / "results.md").read_text()


class Killed(BaseException):
    """A kill of the process, simulated once k questions are written (BaseException: nothing catches it)."""


def kill_after(k: int):
    """An `on_written` hook for `run_eval` that kills the run once k records are written."""
    written = 0

    def on_written(n: int) -> None:
        nonlocal written
        written += n
        if written >= k:
            raise Killed(f"killed after {written} questions")

    return on_written


def test_kill_and_resume_ends_with_the_same_results(env, pope_run, monkeypatch, capsys):
    out = env.root / "pope_resumed"
    real_run_eval = harness_runner.run_eval
    monkeypatch.setattr(harness_runner, "run_eval", lambda cfg: real_run_eval(cfg, on_written=kill_after(5)))
    with pytest.raises(Killed):
        eval_run.main(cli_args(env, "pope", out, "--save-traces"))
    monkeypatch.setattr(harness_runner, "run_eval", real_run_eval)
    written = samples(out, "pope", "vanilla")
    assert 5 <= len(written) < 10 and not (out / "samples_pope_interp.jsonl").exists()
    with open(out / "samples_pope_vanilla.jsonl", "a") as f:
        f.write('{"question_id": "popular/3", "predic')  # killed in the middle of a line

    assert eval_run.main(cli_args(env, "pope", out, "--save-traces")) == 0
    assert f"pope vanilla: {len(written)} of 10 questions already answered" in capsys.readouterr().err
    resumed = json.loads((out / "results.json").read_text())
    for mode in MODES:
        expected, got = pope_run.results["modes"][mode], resumed["modes"][mode]
        assert got["metrics"] == expected["metrics"]
        assert got["counts"] == expected["counts"] and got["headline"] == expected["headline"]
        ids = [r["question_id"] for r in samples(out, "pope", mode)]
        assert len(ids) == len(set(ids)) == 10  # nothing asked twice, nothing lost
        old = {r["question_id"]: r["prediction"] for r in samples(pope_run.out, "pope", mode)}
        assert {r["question_id"]: r["prediction"] for r in samples(out, "pope", mode)} == old
    # a third run finds everything answered and changes nothing
    assert eval_run.main(cli_args(env, "pope", out)) == 0
    assert len(samples(out, "pope", "blink")) == 10


def test_rescoring_saved_samples_gives_the_run_metrics(env, pope_run, capsys):
    for mode in ("vanilla", "blink"):
        capsys.readouterr()
        assert eval_score.main(["--bench", "pope", "--samples", str(pope_run.out / f"samples_pope_{mode}.jsonl"),
                                "--data-dir", str(env.data["pope"]), "--tfds-dir", str(env.tfds)]) == 0
        scores = json.loads(capsys.readouterr().out)
        assert scores["metrics"] == pope_run.results["modes"][mode]["metrics"]
        assert scores["counts"]["errors"] == 1


def test_report_draws_from_traces(pope_run, tmp_path):
    out = eval_report.make_report(pope_run.out, report_dir=tmp_path, examples=4)
    assert set(out) == {"interp", "blink"}
    for mode, entry in out.items():
        assert set(entry["layers"]) == set(LAYERS)
        for stats in entry["layers"].values():
            assert stats["n"] == 9
            assert stats["none_rate"] + stats["expand_rate"] + stats["keep_rate"] + stats["drop_rate"] == pytest.approx(1)
        for name in entry["files"]:
            assert (tmp_path / name).stat().st_size > 0
    assert "| layer | expand |" in (tmp_path / "report.md").read_text()


def test_other_settings_into_the_same_out_are_refused(env, pope_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(pope_run.out, out)
    args = cli_args(env, "pope", out)
    args[args.index("--tau-exp") + 1] = "0.27"
    assert eval_run.main(args) == 2
    assert "other settings" in capsys.readouterr().err


def test_usage_errors_explain_the_fix(env, tmp_path, capsys):
    assert eval_run.main(["--bench", "mme", "--data-dir", str(tmp_path)]) == 2  # the demo model is POPE only
    err = capsys.readouterr().err
    assert "python -m checkpoints_conversion.hf_to_orbax --hf-dir" in err and "--bench pope only" in err
    args = cli_args(env, "pope", tmp_path / "x")
    del args[args.index("--tokensr"):args.index("--tokensr") + 2]
    assert eval_run.main(args) == 2
    assert "--tokensr" in capsys.readouterr().err
    # A model directory without a tokenizer is named before the benchmark is prepared (which can take long).
    (tmp_path / "no_tok").mkdir()
    shutil.copy(env.model / "config.json", tmp_path / "no_tok")
    args = cli_args(env, "pope", tmp_path / "y")
    args[args.index("--model") + 1] = str(tmp_path / "no_tok")
    args[args.index("--tfds-dir") + 1] = str(tmp_path / "fresh_tfds")
    assert eval_run.main(args) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
    assert not (tmp_path / "fresh_tfds").exists()


def test_another_tokensr_into_the_same_out_is_refused(env, pope_run, tmp_path, capsys):
    """Same geometry, other weights: resuming would mix two checkpoints' answers in one mode."""
    out = tmp_path / "copy"
    shutil.copytree(pope_run.out, out)
    cfg = BlinkConfig(layers=LAYERS, region_size=3, tokensr_kind="conv", tokensr_channels=7)
    dim = tl.tiny_hf_config().text_config.hidden_size
    save_tokensr(tmp_path / "other", TokenSRBank(cfg, dim, rngs=nnx.Rngs(1)), cfg, dim=dim)
    args = cli_args(env, "pope", out, modes="blink")
    args[args.index("--tokensr") + 1] = str(tmp_path / "other")
    assert eval_run.main(args) == 2
    assert "tokensr_sha256" in capsys.readouterr().err


def test_random_region_ablation_does_not_depend_on_batching(env, tmp_path):
    """Each question's random region comes from its own id: other batch sizes (as after a resume) give the same
    regions and answers."""
    runs = {}
    for size in ("4", "3"):
        out = tmp_path / f"batch{size}"
        args = cli_args(env, "pope", out, "--ablation", "random", "--save-traces", modes="interp")
        args[args.index("--batch-size") + 1] = size
        assert eval_run.main(args) == 0
        answers = {r["question_id"]: r["prediction"] for r in samples(out, "pope", "interp-random")}
        runs[size] = {r["question_id"]: (answers[r["question_id"]], r["region"])
                      for r in read_jsonl(out / "traces_pope_interp-random.jsonl")}
    assert runs["4"] == runs["3"] and len(runs["4"]) == 9
    assert len({str(region) for _, region in runs["4"].values()}) > 1  # the draws differ between questions


@pytest.mark.parametrize("what", ["width", "layers"])
def test_tokensr_of_another_model_is_refused_before_any_mode_runs(env, tmp_path, capsys, what):
    dim = tl.tiny_hf_config().text_config.hidden_size
    layers, width = ((1, 5), dim) if what == "layers" else (LAYERS, dim + 4)
    cfg = BlinkConfig(layers=layers, region_size=3, tokensr_kind="conv", tokensr_channels=7)
    save_tokensr(tmp_path / "sr", TokenSRBank(cfg, width, rngs=nnx.Rngs(0)), cfg, dim=width)
    args = cli_args(env, "pope", tmp_path / "out", modes="vanilla,blink")
    args[args.index("--tokensr") + 1] = str(tmp_path / "sr")
    del args[args.index("--layers"):args.index("--layers") + 2]
    assert eval_run.main(args) == 2
    err = capsys.readouterr().err
    assert f"--tokensr {tmp_path / 'sr'}" in err
    assert ("trained for hidden size" in err) if what == "width" else ("layer index 5" in err)
    assert not (tmp_path / "out" / "samples_pope_vanilla.jsonl").exists()  # nothing ran


def test_traces_asked_for_in_the_middle_of_a_run_are_refused(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert eval_run.main(cli_args(env, "pope", out, "--limit", "1", modes="vanilla,interp")) == 0
    assert eval_run.main(cli_args(env, "pope", out, "--limit", "1", "--save-traces", modes="vanilla")) == 0  # no Blink
    assert eval_run.main(cli_args(env, "pope", out, "--limit", "1", "--save-traces", modes="interp")) == 2
    assert "answers of mode 'interp' without traces" in capsys.readouterr().err
    assert eval_run.main(cli_args(env, "pope", out, "--limit", "1", modes="interp")) == 0  # without traces it resumes
    results = json.loads((out / "results.json").read_text())
    assert "traces" not in results["modes"]["interp"]["files"]


def test_a_mode_whose_samples_were_deleted_is_answered_afresh_with_new_settings(env, tmp_path):
    out = tmp_path / "out"
    assert eval_run.main(cli_args(env, "pope", out, "--limit", "1", modes="interp")) == 0
    args = cli_args(env, "pope", out, "--limit", "1", modes="interp")
    args[args.index("--tau-exp") + 1] = "0.27"
    assert eval_run.main(args) == 2
    (out / "samples_pope_interp.jsonl").unlink()  # what the refusal advises
    assert eval_run.main(args) == 0
    assert json.loads((out / "results.json").read_text())["modes"]["interp"]["settings"]["blink"]["tau_exp"] == 0.27


def test_run_summary_names_errored_questions_and_the_retry_flag(pope_run, env, capsys):
    assert eval_run.main(cli_args(env, "pope", pope_run.out, "--save-traces")) == 0  # all answered: rescored
    err = capsys.readouterr().err
    assert "could not be answered" in err and "--retry-errors" in err


def test_conflicts_name_only_what_differs(env, pope_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(pope_run.out, out)
    args = cli_args(env, "pope", out, "--save-traces")
    args[args.index("--tau-exp") + 1] = "0.27"
    assert eval_run.main(args) == 2
    err = capsys.readouterr().err
    assert f"blink.tau_exp was {float(TAU_EXP)}, now 0.27" in err and "tau_drop" not in err


def test_score_refuses_samples_of_another_data_set(env, pope_run, tmp_path, capsys):
    from eval.harness.io import atomic_write_text

    other = tmp_path / "samples.jsonl"
    atomic_write_text(other, json.dumps({"question_id": "random/999", "prediction": "yes", "error": None}) + "\n")
    assert eval_score.main(["--bench", "pope", "--samples", str(other), "--data-dir", str(env.data["pope"]),
                            "--tfds-dir", str(env.tfds)]) == 2
    assert "1 question ids" in capsys.readouterr().err




def test_a_rerun_with_fewer_modes_keeps_the_others_results(env, pope_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(pope_run.out, out)
    assert eval_run.main(cli_args(env, "pope", out, "--save-traces", modes="vanilla")) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["modes"]) == list(MODES)
    for mode in MODES:
        assert results["modes"][mode]["metrics"] == pope_run.results["modes"][mode]["metrics"]
    assert list(results["paired"]["modes"]) == ["interp", "blink"]
