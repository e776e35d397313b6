"""Crash-safe files for resumable runs: whole files are replaced atomically, logs are appended line by line.

A run killed in the middle of an append may leave a last line without its newline. `open_append_jsonl`
(the resuming run) repairs it: a complete record gets its newline, a torn one is cut off with a warning naming
the file, so its question counts as unanswered and is asked again. A reader (`read_jsonl`: eval.score,
eval.report, ...) skips a line that does not parse and names it in a warning, so a torn line costs one sample,
said aloud, never the file; the scores then count that question as missing (a partial run).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from blink_jax.rundir import atomic_write_text  # the one atomic write, shared with train/


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x):
    """numpy scalars and arrays, paths and sets -> plain JSON values."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"cannot write a {type(x).__name__} to JSON: {x!r}")


def dumps_line(record: dict) -> str:
    """One JSONL line (no newline inside: JSON escapes them)."""
    return json.dumps(record, ensure_ascii=False, default=_jsonable)


class TornLineWarning(UserWarning):
    """A JSONL line that does not parse (a writer killed in the middle of it) was dropped."""


def open_append_jsonl(path: str | os.PathLike) -> IO[str]:
    """Opens `path` for appending; a last line that a killed writer left without its newline is ended if it is a
    whole record, and cut off (with a TornLineWarning) if it is torn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "r+b") as f:
            start, last = _last_line(f)
            if last and not last.endswith(b"\n"):
                if _parses(last):
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    warnings.warn(f"{path}: dropped the torn last line {_excerpt(last)} (a run killed while "
                                  f"writing it); its question is asked again", TornLineWarning, stacklevel=2)
                    f.truncate(start)
                f.flush()
                os.fsync(f.fileno())
    return open(path, "a", encoding="utf-8")


def _last_line(f: IO[bytes], chunk: int = 1 << 16) -> tuple[int, bytes]:
    """(offset, bytes) of the file's last line (with its newline, if it has one), read from the end."""
    end = f.seek(0, os.SEEK_END)
    tail, pos = b"", end
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut >= 0:
            return pos + cut + 1, tail[cut + 1:]
    return 0, tail


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _excerpt(line: bytes | str) -> str:
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


def append_lines(f: IO[str], records: Iterable[dict]) -> None:
    """Appends records as whole lines with one write, then flushes and fsyncs."""
    text = "".join(dumps_line(r) + "\n" for r in records)
    if text:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, strict: bool = False) -> Iterator[dict]:
    """The records of a JSONL file; blank lines are skipped, and so are unparsable (torn) ones, each named in a
    TornLineWarning, unless `strict`."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if strict:
                    raise ValueError(f"{path}:{number} is not a JSON line ({e}): fix or delete that line") from None
                warnings.warn(f"{path}:{number}: skipped a line that is not JSON, {_excerpt(line)} (a run killed while "
                              f"writing it?): unless a later line answers its question, that question counts as "
                              f"unanswered; rerun eval.run with the same --out to ask it", TornLineWarning, stacklevel=2)
                continue
            if isinstance(record, dict):
                yield record
