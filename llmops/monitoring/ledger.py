"""What the monitor has checked: `monitor.workdir/ledger.json` keys each batch file by its path, size and mtime and
lists every tracked check in order, so a scheduled run skips batch files it has seen and the scores have a history.

A file that is rewritten (new size or mtime) is new data and is checked again. The ledger is rewritten atomically
(temp + rename) under an exclusive lock on `ledger.json.lock`, so two monitor processes never lose each other's entries.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError, LlmopsError
from llmops.common.io import atomic_write_json

LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 1


def file_key(path: Path) -> str:
    """`<absolute path>|<size>|<mtime_ns>`: the same file unchanged has the same key; any rewrite gets a new one."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class Ledger:
    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LEDGER_FILE

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": LEDGER_VERSION, "files": {}, "batches": []}
        try:
            state = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.path}: not valid JSON ({exc.msg} at line {exc.lineno}); move it aside to start a new ledger.") from exc
        if state.get("version") != LEDGER_VERSION or not isinstance(state.get("files"), dict) or not isinstance(state.get("batches"), list):
            raise DataError(f"{self.path}: not a monitor ledger of version {LEDGER_VERSION}; move it aside to start a new ledger.")
        return state

    def seen(self, keys: dict[Path, str]) -> tuple[list[Path], list[Path]]:
        """(unseen, seen): the files (with their `file_key`) split by whether a tracked check already read them as they are."""
        known = self.read()["files"]
        return [f for f, k in keys.items() if k not in known], [f for f, k in keys.items() if k in known]

    @contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """The ledger's state, locked for this process; written back atomically when the block ends without error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(LEDGER_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                yield state
                atomic_write_json(self.path, state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class BatchAlreadyChecked(LlmopsError):
    """Every file of the batch is in the ledger as it is now: nothing new to check."""

    def __init__(self, message: str, files: list[Path]) -> None:
        super().__init__(message)
        self.files = files


def record(state: dict[str, Any], keys: list[str], entry: dict[str, Any]) -> None:
    """Add a check (its `entry`: batch id, step, time, scores, ...) and mark its files' keys as seen, in a state from
    `update`. The keys are taken before the check read the files, so a file rewritten meanwhile is checked again."""
    state["batches"].append(entry)
    for key in keys:
        state["files"][key] = {"batch_id": entry["batch_id"], "step": entry["step"], "checked_at": entry["checked_at"]}
