"""The execution sandbox for generated code: a program that deletes or writes files outside its working directory,
opens a socket, fork-bombs, loops or eats memory is stopped and harms nothing; a correct program passes, and only
when its checks run to their end. Each program gets a cgroup of its own, removed afterwards; a real isolation failure
stops the batch.

Each attack is also run without isolation where that is safe to do (socket, write to a file the test owns), to show
the attack itself works and that the sandbox is what stops it. tests/evaluation/test_sandbox_redteam.py holds the
hostile programs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from llmops.params.evaluate import EvaluateConfig
from llmops.evaluation.suite import sandbox_mode
from llmops.evaluation import sandbox
from llmops.evaluation.sandbox import UID_BASE, UID_SPAN, Limits, SandboxUnavailable, isolation_problem, run_program

from ..conftest import ROOT

pytestmark = pytest.mark.eval

LIMITS = Limits(timeout_s=3.0, memory_mb=512, max_processes=16)


@pytest.fixture(scope="module", autouse=True)
def sandbox_works_here():
    problem = isolation_problem()
    assert problem is None, f"the sandbox must work on this machine (root + unshare): {problem}"


@pytest.fixture
def open_dir():
    """A world-writable directory with a world-writable canary, in a place the sandbox shows (the repo's gitignored
    .pytest_cache; /tmp is the program's own tmpfs): file permissions would let the program's user delete or write
    here, so only the read-only mounts can stop it."""
    import shutil
    import tempfile

    cache = ROOT / ".pytest_cache"
    cache.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="llmops-open-", dir=cache))
    path.chmod(0o777)
    canary = path / "canary.txt"
    canary.write_text("alive")
    canary.chmod(0o666)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sandbox_processes() -> list[int]:
    """Processes on the machine that run under one of the sandbox's user ids."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uid_line = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if UID_BASE <= int(uid_line.split()[1]) < UID_BASE + UID_SPAN:
            pids.append(int(entry.name))
    return pids


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    tests = "def check(f):\n    assert f(2, 3) == 5\ncheck(add)\n"
    assert run_program("def add(a, b):\n    return a + b\n", LIMITS, checks=tests).status == "passed"
    wrong = run_program("def add(a, b):\n    return a - b\n", LIMITS, checks=tests)
    assert wrong.status == "failed" and "AssertionError" in wrong.output
    assert 'File "<checks>", line 2' in wrong.output, "the traceback shows the failing check's line"


def test_a_plain_program_without_checks_passes_when_it_runs_to_its_end():
    tests = "def check(f):\n    assert f(2, 3) == 5\ncheck(add)\n"
    assert run_program("def add(a, b):\n    return a + b\n" + tests, LIMITS).passed
    assert run_program("def add(a, b):\n    return a - b\n" + tests, LIMITS).status == "failed"


# A checkout under /tmp is hidden in the sandbox (a tmpfs covers /tmp there): its files are not even visible then.
READ_ONLY_OR_HIDDEN = ("Read-only file system", "No such file or directory")


def test_the_program_runs_as_an_unprivileged_user_in_a_fresh_working_directory():
    marker = f"made-in-the-sandbox-{os.getpid()}"
    out = run_program(f"import os\nopen({marker!r}, 'w').close()\nprint(os.getuid(), os.getcwd(), sorted(os.listdir('.')))\n", LIMITS)
    uid, cwd, listing = out.output.split(" ", 2)
    assert out.passed and UID_BASE <= int(uid) < UID_BASE + UID_SPAN
    assert cwd == "/tmp" and listing.strip() == str(sorted([marker, "program.py"]))
    assert not (Path("/tmp") / marker).exists(), "the working directory is a tmpfs in the namespace; the host never sees it"


def test_deleting_a_file_outside_the_workdir_fails_and_the_canary_survives(open_dir, tmp_path):
    canary = open_dir / "canary.txt"
    out = run_program(f"import os\nos.remove({str(canary)!r})\n", LIMITS)
    assert out.status == "failed" and any(r in out.output for r in READ_ONLY_OR_HIDDEN), out.output
    out = run_program(f"import shutil\nshutil.rmtree({str(open_dir)!r})\n", LIMITS)
    assert out.status == "failed"
    private = tmp_path / "canary.txt"  # root's own files: also out of the unprivileged user's reach
    private.write_text("alive")
    assert run_program(f"import os\nos.remove({str(private)!r})\n", LIMITS).status == "failed"
    assert canary.read_text() == "alive" and private.read_text() == "alive"


@pytest.mark.parametrize("where", ["test_dir", "/dev/shm", "repo", "/etc"])
def test_writing_outside_the_workdir_fails(open_dir, where):
    target_dir = {"test_dir": open_dir, "/dev/shm": Path("/dev/shm"), "repo": ROOT, "/etc": Path("/etc")}[where]
    target = target_dir / f"llmops-sandbox-escape-{os.getpid()}.txt"
    attack = f"open({str(target)!r}, 'w').write('escaped')\n"
    try:
        out = run_program(attack, LIMITS)
        assert out.status == "failed" and any(r in out.output for r in READ_ONLY_OR_HIDDEN), out.output
        assert not target.exists()
        if where == "test_dir":  # the same program outside the sandbox does write: the sandbox is what stops it
            assert run_program(attack, LIMITS, isolated=False).passed and target.read_text() == "escaped"
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("port", ["listener", 5432])
def test_a_socket_to_localhost_cannot_connect(port):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        target = server.getsockname()[1] if port == "listener" else port
        attack = f"import socket\nsocket.create_connection(('127.0.0.1', {target}), timeout=2).close()\nprint('connected')\n"
        out = run_program(attack, LIMITS)
        assert out.status == "failed" and "connected" not in out.output
        assert "PermissionError: [Errno 1] Operation not permitted" in out.output, "seccomp refuses socket()"
        if port == "listener":  # the host's listener is reachable without the sandbox
            assert run_program(attack, LIMITS, isolated=False).passed


def test_the_process_limit_refuses_forks_beyond_it():
    attack = (
        "import os, time\nchildren = 0\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "    except OSError as exc:\n"
        "        print('refused after', children, exc.errno)\n"
        "        raise SystemExit(1)\n"
    )
    out = run_program(attack, LIMITS)
    assert out.status == "failed" and "refused after" in out.output, out.output
    children = int(out.output.split("refused after")[1].split()[0])
    assert 0 < children < LIMITS.max_processes
    assert out.seconds < LIMITS.timeout_s, "a refused fork ends the program, not the timeout"
    assert _eventually_empty(sandbox_processes)


def test_a_fork_bomb_is_stopped_and_leaves_no_process_behind():
    before = len([p for p in Path("/proc").iterdir() if p.name.isdigit()])
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    out = run_program(bomb, LIMITS)
    assert out.status == "timeout"
    assert time.monotonic() - started < LIMITS.timeout_s + 3
    assert _eventually_empty(sandbox_processes), "every process of the bomb is gone"
    after = len([p for p in Path("/proc").iterdir() if p.name.isdigit()])
    assert after <= before + 5, (before, after)


def test_an_infinite_loop_times_out():
    out = run_program("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert out.status == "timeout" and out.exit_code is None
    assert out.seconds < 3


def test_memory_beyond_the_address_space_limit_fails():
    out = run_program("block = bytearray(2 << 30)\n", LIMITS)
    assert out.status == "failed" and "MemoryError" in out.output


def test_each_program_has_a_cgroup_with_its_memory_and_process_limits_which_is_removed_afterwards():
    assert sandbox.cgroup_problem() is None, f"cgroups must work on this machine: {sandbox.cgroup_problem()}"
    version, parents = sandbox._cgroup_layout()
    limits = Limits(timeout_s=3.0, memory_mb=300, max_processes=12)
    read_limits = (  # the program finds its cgroup (the one this test process made) and prints its limit files
        "import os\n"
        f"for parent in {[str(p) for p in parents]!r}:\n"
        f"    [name] = [n for n in os.listdir(parent) if n.startswith('llmops-sandbox-{os.getpid()}-')]\n"
        "    for file in sorted(os.listdir(f'{parent}/{name}')):\n"
        "        if file in ('memory.limit_in_bytes', 'memory.memsw.limit_in_bytes', 'memory.max', 'memory.swap.max', 'pids.max'):\n"
        "            print(f'{parent}/{name}', file, open(f'{parent}/{name}/{file}').read().strip())\n"
    )
    out = run_program(read_limits, limits)
    assert out.passed, out.output
    found = {file: int(value) for _, file, value in (line.split() for line in out.output.splitlines())}
    processes = 12 + 1  # the program's, and the jail (PID 1 of the namespace)
    if version == "v1":
        assert found == {"memory.limit_in_bytes": 300 << 20, "memory.memsw.limit_in_bytes": 300 << 20, "pids.max": processes}
    else:
        assert found == {"memory.max": 300 << 20, "memory.swap.max": 0, "pids.max": processes}
    assert not any(Path(line.split()[0]).exists() for line in out.output.splitlines()), "removed after the run"


def test_cgroups_of_an_evaluator_that_died_are_swept_and_live_ones_kept():
    parent = sandbox._cgroup_layout()[1][0]
    dead = _a_dead_pid()
    stale, live = parent / f"llmops-sandbox-{dead}-test", parent / f"llmops-sandbox-{os.getppid()}-test"
    stale.mkdir()
    live.mkdir()
    try:
        assert sandbox.sweep_stale_cgroups(parent) == [stale]
        assert not stale.exists() and live.exists()
    finally:
        for path in (stale, live):
            if path.exists():
                path.rmdir()


def test_a_failure_to_isolate_stops_the_batch_with_sandbox_unavailable(monkeypatch):
    monkeypatch.setattr(sandbox, "seccomp_program", lambda: b"\0" * 8)  # a filter the kernel refuses to load
    with pytest.raises(SandboxUnavailable, match="could not isolate.*seccomp filter refused"):
        run_program("print('never runs')\n", LIMITS)


def test_without_unshare_the_stage_refuses_unless_unsandboxed_runs_are_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no `unshare`
    with pytest.raises(SandboxUnavailable, match="unshare.*allow_unsandboxed"):
        sandbox_mode(EvaluateConfig())
    assert sandbox_mode(EvaluateConfig(allow_unsandboxed=True)) is False


def _a_dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _eventually_empty(probe, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
