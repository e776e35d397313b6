"""Every `python -m ...` command written in the docs names a module that exists and only flags its --help lists."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy on a package member

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "demo/MODEL_CARD.md", "bench/RESULTS.md", "docs/BLINK.md"]


def commands() -> list[tuple[str, str, list[str]]]:
    """(doc, module, flags) for each `python -m` command in a doc's fenced code blocks."""
    found = []
    for doc in DOCS:
        in_block, lines = False, []
        for line in (ROOT / doc).read_text().replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("```"):
                in_block = not in_block
            elif in_block:
                lines.append(line.split(" #")[0].strip())
        for line in lines:
            if line.startswith("python -m "):
                words = shlex.split(line)
                flags = [w.split("=")[0].strip("[]") for w in words[3:] if w.lstrip("[").startswith("--")]
                found.append((doc, words[2], flags))
    return found


def declared_options(help_text: str) -> str:
    """The parts of a --help that declare options: the usage block and the lines that start an option's entry
    (so a flag only mentioned in another option's description does not count)."""
    usage = help_text.split("\n\n", 1)[0]
    entries = [line for line in help_text.splitlines() if re.match(r"^\s{1,4}-", line)]
    return "\n".join([usage, *entries])


def help_text(module: str) -> str:
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv
    return out.getvalue()


def test_docs_hold_commands():
    assert len(commands()) > 20  # the parser below found the docs' commands


@pytest.mark.parametrize("module", sorted({m for _, m, _ in commands()}))
def test_documented_flags_exist(module):
    text = declared_options(help_text(module))
    for doc, mod, flags in commands():
        if mod != module:
            continue
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}(?![\w-])", text), f"{doc}: `python -m {module}` has no flag {flag}"
