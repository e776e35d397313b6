"""Crash-safe files for resumable runs: whole files are replaced atomically, logs are appended line by line.

Nothing here ever truncates a file. A run killed in the middle of an append may leave a final line without
its newline; `open_append_jsonl` closes that line before appending, and `read_jsonl` skips lines that do not
parse, so one torn line costs one sample (asked again on resume), never the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to a temporary sibling, fsyncs it and renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def open_append_jsonl(path: str | os.PathLike) -> IO[str]:
    """Opens `path` for appending; if a killed writer left a last line without newline, ends it first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
        f.flush()
    return f


def append_lines(f: IO[str], records: Iterable[dict]) -> None:
    """Appends records as whole lines with one write, then flushes and fsyncs."""
    text = "".join(dumps_line(r) + "\n" for r in records)
    if text:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, strict: bool = False) -> Iterator[dict]:
    """The records of a JSONL file; blank and unparsable (torn) lines are skipped unless `strict`."""
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
                continue
            if isinstance(record, dict):
                yield record
