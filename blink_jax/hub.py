"""A model name -> the local directory that holds it: a directory as given, or a Hugging Face Hub id
(`llava-hf/llava-1.5-7b-hf`) through `huggingface_hub`, which brings its cache, `HF_HUB_OFFLINE`, `HF_TOKEN`
and revisions (branch, tag or commit).

Every entry that takes a model (`load_pretrained`, `Processor.from_pretrained`, the `--model` / `--hf-dir`
flags) resolves it here, so a Hub id works wherever a directory does.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a LLaVA or Qwen2.5-VL checkpoint needs from a Hub repository: config, tokenizer (tokenizer.model,
# merges.txt, chat templates) and safetensors weights with their index. Torch pickles are fetched only for a repository
# without safetensors: many repositories hold both, and the pickles would double a multi-GB download.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
TORCH_FILES = ("pytorch_model*.bin",)
EXAMPLE_ID = "llava-hf/llava-1.5-7b-hf"


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a directory nor a Hub model that can be had: names it and the fix."""


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a Hub repository id ("org/name" or "name"), not whether it exists."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The directory of a model: `name_or_path` itself when it is a directory, else the snapshot of the Hub
    repository of that id (downloaded into the Hub cache, or read from it when offline). `revision`: a branch,
    tag or commit of the Hub repository (default: its main branch)."""
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision {revision!r} was given for {str(path)!r}, a local directory: revisions "
                             f"select a Hub repository's version; leave the revision out")
        return path
    name = os.fspath(name_or_path)
    if path.exists():
        raise ModelNotFoundError(f"model {name!r} is a file, not a model directory: give the directory that holds "
                                 f"config.json, or a Hugging Face Hub id such as {EXAMPLE_ID}")
    if not is_hub_id(name):
        raise ModelNotFoundError(f"model directory {name!r} does not exist: give a Hugging Face LLaVA or "
                                 f"Qwen2.5-VL directory, one written by `python -m "
                                 f"checkpoints_conversion.hf_to_orbax`, or a Hub id such as {EXAMPLE_ID}")
    return _snapshot(name, revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision!r}" if revision is not None else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES)))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(TORCH_FILES)))
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r}: the Hugging Face Hub repository has no revision {revision!r}: "
                                 f"give a branch, tag or commit it has") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        offline = constants.HF_HUB_OFFLINE
        where = f"the Hub cache {constants.HF_HUB_CACHE}" + (" (HF_HUB_OFFLINE is set)" if offline else "")
        fix = (f"download it while online (`hf download {repo_id}`) or point HF_HUB_CACHE to a cache that holds it"
               if offline else "check the id and the network, and for a gated or private repository log in "
               "(`hf auth login`) or set HF_TOKEN")
        raise ModelNotFoundError(f"model {repo_id!r}{at} is neither a local directory nor a Hugging Face Hub model "
                                 f"found in {where} ({type(e).__name__}): give a model directory, or {fix}") from None
    return folder
