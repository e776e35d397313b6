"""A run's output directory: writable before the run starts, one run at a time, whole files replaced atomically,
and a disk that fills or turns read-only mid-run said in one sentence.

Training (`--workdir`) and evaluation (`--out`) both resume from what their directory holds, so two runs
writing into one directory would interleave their checkpoints or answers. `hold` takes an exclusive
`fcntl.flock` on a lock file inside the directory for the length of the run. The kernel drops a flock when
its process dies, so a run killed with SIGKILL leaves at most a stale lock file that the next run takes over;
nothing has to be cleaned up by hand.

Multi-process runs: each process locks its own file, `.lock-process-<i>`, so a second run on the same
directory is refused in every one of its processes at once (each run has a process 0, so any two overlap),
while the processes of one run, possibly on other hosts of a shared file system, never wait on each other.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


class DirectoryBusy(RuntimeError):
    """Another live run holds the directory."""


class NotWritable(OSError):
    """An output place that cannot take the run's files: names it, its flag, and the fix."""


MIN_FREE_BYTES = 256 << 20  # what every output place must have free before a run starts (checkpoints need more)


def check_writable(path: str | os.PathLike, *, flag: str, min_free: int = MIN_FREE_BYTES) -> Path:
    """Raise `NotWritable` unless files can be created at directory `path` (or, while it does not exist, in its
    nearest existing parent, where it would be created) with at least `min_free` bytes free. Creates nothing."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritable(f"{flag} {path}: {existing} is a file, not a directory: choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise NotWritable(f"{flag} {path}: files cannot be created in {existing} ({e.strerror}): make it writable "
                          f"or choose another {flag}") from None
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise NotWritable(f"{flag} {path}: only {free / 2**20:.0f} MiB free on its disk (at least "
                          f"{min_free / 2**20:.0f} MiB needed to start): free some space or choose another {flag}")
    return path


# Errors of a disk that cannot take more: full, over quota, read-only, no permission.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def failed_write(e: BaseException, *, resume: str) -> str | None:
    """The one sentence for a write that failed mid-run because of its disk, or None for any other error.
    `resume` says how to go on (e.g. "rerun the same command: it resumes from what is saved")."""
    while e is not None:  # orbax and threads wrap the OSError
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            where = f" {e.filename}" if e.filename else ""
            return (f"writing{where} failed: {e.strerror} (the disk is full, over quota or read-only); free space "
                    f"or make it writable, then {resume}")
        e = e.__cause__ or e.__context__
    return None


def lock_path(directory: str | os.PathLike, process: int = 0) -> Path:
    return Path(directory) / f".lock-process-{process}"


@contextlib.contextmanager
def hold(directory: str | os.PathLike, *, process: int = 0, flag: str = "the output directory") -> Iterator[Path]:
    """Holds `directory` (created if needed) for this run; raises DirectoryBusy at once, naming the directory and the
    other run's pid, if another run holds it. `flag` names the option that chose the directory (e.g. '--out')."""
    directory = Path(directory).absolute()
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = lock_path(directory, process)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            raise DirectoryBusy(f"{directory} is in use by another run ({owner or 'owner unknown'}; lock file "
                                f"{path.name}): wait for it to finish, or give another {flag}") from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder unlinks the file on release; if that happened between our open and our flock we hold
        # a lock on a file no longer in the directory, and must lock the current one instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n"
                  .encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before unlocking: a run that opens the path afterwards gets a fresh file
        os.close(fd)
        if created:  # a run that stopped before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                directory.rmdir()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to a temporary sibling, fsyncs it and renames it over `path`: a reader (or a run killed in the
    middle) sees the old file or the new one, never a truncated one."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`atomic_write_text` for bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
