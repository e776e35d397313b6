"""The console progress bar of one mode: questions with a record (those of an earlier, resumed run included) and
the errors recorded so far in this run."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm


class ModeProgress:
    def __init__(self, *, total: int, done: int, desc: str, enabled: bool):
        self._bar = tqdm(total=total, initial=done, unit="q", disable=not enabled, desc=desc, dynamic_ncols=True)
        self.errors = 0

    def update(self, records: Sequence[dict]) -> None:
        self.errors += sum(r["error"] is not None for r in records)
        self._bar.update(len(records))
        self._bar.set_postfix(errors=self.errors, refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ModeProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
