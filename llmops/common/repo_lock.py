"""One pipeline run per checkout at a time: an exclusive lock on the repository that the kernel frees when its holder dies.

A Prefect concurrency limit would guard only the runs of one deployment and would hold its slot
after a crash until a lease expired; `llmops run` by hand and a scheduled run must queue behind
each other too, and a SIGKILLed run must not keep the checkout locked. An flock on a file under
`.dvc/tmp/` (ignored by git) does both. The lock file records who holds it, so a waiting run
can say whom it waits for, and a run that finds a record left behind knows its holder crashed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmops.common.errors import StageError

LOCK_FILE = Path(".dvc") / "tmp" / "llmops-pipeline.lock"
POLL_INTERVAL_S = 1.0


class RepoBusyError(StageError):
    """Another pipeline run holds the checkout's lock and did not finish within the wait limit."""


@dataclass
class RepoLock:
    """A held lock: its file descriptor (children that must hold the lock too inherit it) and the record it keeps."""

    path: Path
    fd: int
    previous_holder: dict[str, Any]  # what a holder that died without releasing the lock had recorded; {} otherwise
    record: dict[str, Any] = field(default_factory=dict)

    def update(self, **entries: Any) -> None:
        """Add entries to the holder record (e.g. the MLflow run id once it exists)."""
        self.record.update(entries)
        _write_record(self.fd, self.record)


def _read_record(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {"unreadable_record": raw.decode(errors="replace")}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())


def describe(record: dict[str, Any]) -> str:
    if not record:
        return "a run that has not written its record yet"
    keys = ("prefect_flow_run_id", "pid", "host", "started_at")
    return ", ".join(f"{k}={record[k]}" for k in keys if record.get(k)) or str(record)


@contextmanager
def repo_lock(repo: Path, timeout_s: float, record: dict[str, Any], on_wait: Callable[[str], None] = print) -> Iterator[RepoLock]:
    """Hold the checkout's pipeline lock for the duration of the block; wait at most `timeout_s` for it.

    Raises RepoBusyError naming the holder when the wait runs out (timeout_s=0: fail at once).
    """
    path = repo / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = describe(_read_record(fd))
                if time.monotonic() >= deadline:
                    raise RepoBusyError(
                        f"another pipeline run is using {repo} ({holder}) and still held {path} after {timeout_s:.0f} s. "
                        "Two runs in one checkout would overwrite each other's outputs and params.yaml: wait for it to "
                        "finish (or cancel it), run in another clone, or raise lock_timeout_s."
                    ) from None
                if not waited:
                    on_wait(f"waiting up to {timeout_s:.0f} s for the pipeline run that holds {path} ({holder})")
                    waited = True
                time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        previous = _read_record(fd)
        lock = RepoLock(path=path, fd=fd, previous_holder=previous)
        lock.update(pid=os.getpid(), host=socket.gethostname(), started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record)
        try:
            yield lock
        finally:
            _write_record(fd, {})  # an empty record: this holder finished and cleaned up
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
