"""Run untrusted generated code: one process per program in fresh Linux namespaces, with rlimits and a timeout.

Each program runs under `unshare --mount --net --pid --ipc --uts --fork` and then `jail.py`, which
- remounts every mount read-only and puts a size-capped tmpfs on a fresh working directory (the only
  writable place; the host never sees what is written there),
- has no network (a new network namespace holds only a loopback that is down),
- drops to an unprivileged user id of its own (no capabilities, `no_new_privs`), so RLIMIT_NPROC
  bounds a fork bomb (root ignores that limit),
- sets rlimits: address space, CPU seconds, processes, file size, open files, no core files,
- runs as PID 1's child in a new PID namespace: when the program ends or is killed for the wall-clock
  timeout, the kernel kills everything it started.
This needs root (or CAP_SYS_ADMIN) and util-linux `unshare`. Without them `SandboxUnavailable` is raised,
unless the user opts into running with rlimits only (`evaluate.allow_unsandboxed: true`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmops.common.errors import StageError

JAIL = Path(__file__).with_name("jail.py")
NAMESPACES = ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]
ISOLATION_FAILED = 125  # jail.py's exit code when it could not lock the namespace down
OUTPUT_TAIL_CHARS = 2000
# Unprivileged user ids for programs: outside the range of real accounts, one per run so that
# concurrent programs do not share a process limit.
UID_BASE, UID_SPAN = 200_000, 100_000


class SandboxUnavailable(StageError):
    """Generated code cannot be isolated here (not root, no `unshare`, namespaces refused)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock; CPU seconds are capped at the next whole second above it
    memory_mb: int = 1024  # address space
    max_processes: int = 32  # RLIMIT_NPROC of the program's own user id
    max_file_mb: int = 16  # largest file it may write (its output included)
    workdir_mb: int = 64  # size of its tmpfs working directory


@dataclass
class Outcome:
    status: str  # passed | failed | timeout
    exit_code: int | None
    seconds: float
    output: str  # the tail of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def isolation_problem() -> str | None:
    """Why namespaces cannot be used here, or None when they can (checked by running a probe program)."""
    if not sys.platform.startswith("linux"):
        return f"namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"mount and network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not on PATH (Debian: apt-get install util-linux)"
    probe = run_program("import os\nassert os.getuid() != 0\n", Limits(timeout_s=20))
    if not probe.passed:
        return f"a probe program failed in the sandbox ({probe.status}, exit {probe.exit_code}): {probe.output.strip()[-400:]}"
    return None


def run_program(source: str, limits: Limits, *, isolated: bool = True) -> Outcome:
    """Run `source` as a Python program in its own sandbox; exit code 0 within the timeout is a pass."""
    host_dir = Path(tempfile.mkdtemp(prefix="llmops-sandbox-"))
    host_dir.chmod(0o711)  # the program's user may pass through to its working directory, not list or read here
    workdir = host_dir / "work"
    workdir.mkdir()
    output_path = host_dir / "output.txt"
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if isolated else -1
    argv = [sys.executable, "-I", "-S", str(JAIL), str(workdir), str(uid), json.dumps(asdict(limits))]
    if isolated:
        argv = ["unshare", *NAMESPACES, "--", *argv]
    started = time.perf_counter()
    try:
        with open(output_path, "wb") as output:
            # Output goes to a file, not a pipe: a program printing without end is stopped by RLIMIT_FSIZE,
            # not by this process's memory.
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, cwd=host_dir, start_new_session=True
            )
            timed_out = False
            try:
                proc.communicate(source.encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        seconds = time.perf_counter() - started
        text = output_path.read_bytes()[-OUTPUT_TAIL_CHARS * 4 :].decode("utf-8", "replace")[-OUTPUT_TAIL_CHARS:]
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
    if timed_out:
        return Outcome("timeout", None, seconds, text)
    if isolated and proc.returncode == ISOLATION_FAILED and "could not isolate" in text:
        raise SandboxUnavailable(f"the execution sandbox could not be set up: {text.strip()[-400:]}")
    return Outcome("passed" if proc.returncode == 0 else "failed", proc.returncode, seconds, text)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole session: `unshare` dies, its child (PID 1 of the namespace) gets its death signal, and
    the kernel kills every process left in that PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
