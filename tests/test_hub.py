"""Hugging Face Hub ids wherever a model directory is taken, resolved offline from a Hub cache laid out here as
`huggingface_hub` writes one (blobs, snapshots of symlinks, refs), holding two revisions of a tiny model saved by
transformers."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_llava as tl
from blink_jax import load_pretrained
from blink_jax.hub import ModelNotFoundError, resolve_model_dir
from blink_jax.processing import Processor, build_prompt

REPO = "tiny-org/tiny-llava"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}  # revision -> commit; v2 holds another seed's weights
ROOT = Path(__file__).resolve().parents[1]


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...]) -> Path:
    """Copies `source`'s files into the cache as the Hub does: content-addressed blobs, a snapshot folder of
    relative symlinks to them, and refs naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache, {revision: model directory saved by transformers})."""
    root = tmp_path_factory.mktemp("hub")
    dirs = {}
    for seed, revision in enumerate(COMMITS):
        dirs[revision] = root / revision
        tl.save_hf_model(dirs[revision], seed=seed)
    cache = root / "cache"
    for revision, commit in COMMITS.items():
        add_snapshot(cache, REPO, commit, dirs[revision], refs=(revision,))
    return cache, dirs


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as the environment sets them (huggingface_hub reads both at import)."""
    from huggingface_hub import constants

    cache, _ = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def inputs(model_dir) -> dict:
    return Processor.from_pretrained(model_dir)([build_prompt("is there a red circle ?")], [tl.photo(40, 30)])


def logits(model_dir) -> np.ndarray:
    """Prefill logits [1, T, V] of one prompt + image, from `load_pretrained` and `Processor` of `model_dir`."""
    return np.asarray(load_pretrained(model_dir)(**inputs(model_dir)).logits)


def test_hub_id_gives_the_directory_model(offline):
    cache, dirs = offline
    resolved = resolve_model_dir(REPO)
    assert resolved == cache / "models--tiny-org--tiny-llava" / "snapshots" / COMMITS["main"]
    np.testing.assert_array_equal(logits(REPO), logits(dirs["main"]))
    assert Processor.from_pretrained(REPO).tokenize(build_prompt("what colour ?")) == \
        Processor.from_pretrained(dirs["main"]).tokenize(build_prompt("what colour ?"))


@pytest.mark.parametrize("revision", ["v2", COMMITS["v2"]], ids=["tag", "commit"])
def test_revision_selects_that_snapshot(offline, revision):
    cache, dirs = offline
    resolved = resolve_model_dir(REPO, revision=revision)
    assert resolved.name == COMMITS["v2"]
    other = logits(resolved)
    np.testing.assert_array_equal(other, logits(dirs["v2"]))
    assert not np.allclose(other, logits(dirs["main"]))  # the revisions really hold different weights


def test_missing_id_or_revision_names_it_and_the_fix(offline):
    with pytest.raises(ModelNotFoundError, match=r"'tiny-org/absent' is neither a local directory nor a Hugging "
                                                 r"Face Hub model found in the Hub cache .*HF_HUB_OFFLINE is set.*hf "
                                                 r"download tiny-org/absent"):
        load_pretrained("tiny-org/absent")
    with pytest.raises(ModelNotFoundError, match="'tiny-org/absent'"):
        Processor.from_pretrained("tiny-org/absent")
    with pytest.raises(ModelNotFoundError, match=f"'{REPO}' at revision 'v9'"):
        resolve_model_dir(REPO, revision="v9")


def test_paths_that_are_not_ids(offline, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model directory '\./no/such/dir' does not exist"):
        resolve_model_dir("./no/such/dir")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory"):
        resolve_model_dir(tmp_path / "config.json")
    assert resolve_model_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="revision 'v2' was given for .* a local directory"):
        resolve_model_dir(tmp_path, revision="v2")


def test_clis_take_hub_ids(offline, tmp_path, capsys):
    from eval import predict, run
    from train import tokensr

    data = ROOT / "demo" / "data" / "pope"
    assert run.main(["--bench", "pope", "--model", "tiny-org/absent", "--data-dir", str(data), "--out",
                     str(tmp_path / "out"), "--no-progress"]) == 2
    assert "'tiny-org/absent' is neither a local directory" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="'tiny-org/absent' is neither a local directory"):
        predict.main(["--model", "tiny-org/absent", "--image", str(data / "val2014" / "COCO_val2014_000000000001.png"),
                      "--question", "is there a circle?"])
    assert tokensr.main(["--model", "tiny-org/absent", "--data-dir", str(tmp_path), "--workdir",
                         str(tmp_path / "work")]) == 2
    assert "'tiny-org/absent' is neither a local directory" in capsys.readouterr().err


def test_converter_reads_a_hub_id_with_the_environment_offline(hub, tmp_path):
    """The real environment variables, read by huggingface_hub at import in a fresh process."""
    cache, dirs = hub
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    convert = lambda model, out: subprocess.run(
        [sys.executable, "-m", "checkpoints_conversion.hf_to_orbax", "--hf-dir", model, "--out", str(out),
         "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
    done = convert(REPO, tmp_path / "converted")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path / "converted")(**inputs(dirs["main"])).logits),
                                  logits(dirs["main"]))
    missing = convert("tiny-org/absent", tmp_path / "absent")
    assert missing.returncode == 2 and "'tiny-org/absent' is neither a local directory" in missing.stderr
    assert not (tmp_path / "absent").exists()
