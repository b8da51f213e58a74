"""Hostile programs against the execution sandbox (issue 20): each one tries an escape or a reward hack, written so
that it runs to its end (and would pass) exactly when the attack works. Every one must fail, and nothing outside may
change: no file written, no connection made to the test's listeners, no secret or environment variable leaked, no
process or cgroup left behind.

All programs run at once in one module fixture (most of them wait on a sleep or a timeout); each test then checks one
outcome. A last test SIGKILLs a whole evaluator in the middle of a run.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmops.evaluation import sandbox
from llmops.evaluation.sandbox import Limits, Outcome, isolation_problem, run_program

from ..conftest import ROOT

pytestmark = pytest.mark.eval

# A checkout under /tmp is hidden in the sandbox (a tmpfs covers /tmp there): its files are then not even visible.
READ_ONLY_OR_HIDDEN = "Read-only file system|No such file or directory"
TAG = secrets.token_hex(3)  # in every name this module creates, so that concurrent runs do not collide
POSTGRES_SOCKET = "/var/run/postgresql/.s.PGSQL.5432"  # a real server with local trust on the test machines
SECRET = f"redteam-secret-{secrets.token_hex(8)}"
ENV_NAME, ENV_VALUE = "LLMOPS_REDTEAM_MARKER", f"evaluator-env-{secrets.token_hex(8)}"
LIMITS = Limits(timeout_s=10.0, memory_mb=256, max_processes=16, max_file_mb=8, workdir_mb=16)
SIGSYS_EXIT = 128 + signal.SIGSYS  # the jail's exit code when seccomp killed the program
WRONG_ADD = "def add(a, b):\n    return a - b\n"
SLOW_WRONG_ADD = "def add(a, b):\n    import time\n    time.sleep(1.5)\n    return a - b\n"
ADD_CHECKS = "assert add(2, 3) == 5, 'wrong sum'\n"


@dataclass(frozen=True)
class Attack:
    source: str  # @NAME@ placeholders are filled in from the Host the fixture sets up
    checks: str = ""
    evidence: str = ""  # in the output: the sandbox stopped it, and for this reason
    status: str = "failed"
    exit_code: int | None = None
    timeout_s: float = 10.0  # generous where the program ends on its own; 2 s where only the timeout ends it


def attack(source: str, **kwargs) -> Attack:
    return Attack(textwrap.dedent(source).lstrip("\n"), **kwargs)


ATTACKS = {
    # --- files outside the working directory
    "write_into_the_repo": attack(
        "open('@REPO@/llmops-redteam-@TAG@.txt', 'w').write('escaped')\n", evidence=READ_ONLY_OR_HIDDEN
    ),
    "write_into_a_world_writable_dir_in_host_tmp": attack(
        "open('@HOST_TMP@/escaped.txt', 'w').write('escaped')\n", evidence="No such file or directory"
    ),
    "write_into_root_home": attack("open('/root/llmops-redteam-@TAG@.txt', 'w').write('escaped')\n", evidence="Read-only file system"),
    "write_into_etc": attack("open('/etc/llmops-redteam-@TAG@.txt', 'w').write('escaped')\n", evidence="Read-only file system"),
    "read_a_root_only_secret": attack("print(open('@SECRET_FILE@').read())\n", evidence="Permission denied|No such file or directory"),
    # --- sockets
    "unix_connect_to_postgresql": attack(
        f"""
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({POSTGRES_SOCKET!r})
        print('connected to PostgreSQL')
        """,
        evidence="Operation not permitted",
    ),
    "unix_connect_to_a_socket_the_test_binds_in_tmp": attack(
        """
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect('@UNIX_SOCKET@')
        """,
        evidence="Operation not permitted",
    ),
    "tcp_connect_to_a_port_the_test_listens_on": attack(
        "import socket\nsocket.create_connection(('127.0.0.1', @TCP_PORT@), timeout=2).close()\n",
        evidence="Operation not permitted",
    ),
    "abstract_unix_socket": attack(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0@ABSTRACT@')\n", evidence="Operation not permitted"
    ),
    "netlink_socket": attack(
        "import socket\ns = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\ns.bind((0, 0))\n",
        evidence="Operation not permitted",
    ),
    "packet_socket": attack(
        "import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n", evidence="Operation not permitted"
    ),
    "io_uring_setup_through_ctypes": attack(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        fd = libc.syscall(425, 8, params)  # io_uring_setup(8 entries)
        assert fd >= 0, f'io_uring_setup: {os.strerror(ctypes.get_errno())}'
        """,
        evidence="io_uring_setup: Operation not permitted",
    ),
    "i386_socket_through_int_0x80": attack(
        """
        import ctypes, mmap
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        page = libc.mmap(None, 4096, 7, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, -1, 0)  # rwx, below 4 GiB
        # push rbx; mov eax, 359 (i386 socket); mov ebx, AF_UNIX; mov ecx, SOCK_STREAM; xor edx, edx; int 0x80; pop rbx; ret
        code = bytes([0x53, 0xB8, 0x67, 0x01, 0, 0, 0xBB, 1, 0, 0, 0, 0xB9, 1, 0, 0, 0, 0x31, 0xD2, 0xCD, 0x80, 0x5B, 0xC3])
        ctypes.memmove(page, code, len(code))
        fd = ctypes.CFUNCTYPE(ctypes.c_int)(page)()
        assert fd >= 0, f'i386 socket() returned {fd}'
        """,
        evidence="killed by the seccomp filter",
        exit_code=SIGSYS_EXIT,
    ),
    "x32_socket_through_syscall": attack(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(0x40000000 | 41, 1, 1, 0)  # socket(AF_UNIX, SOCK_STREAM) with the x32 ABI bit
        assert fd >= 0, f'x32 socket(): {os.strerror(ctypes.get_errno())}'  # (kernels without x32: ENOSYS)
        """,
        evidence="killed by the seccomp filter",
        exit_code=SIGSYS_EXIT,
    ),
    # --- the evaluator's environment and the host's processes
    "evaluator_env_through_proc_environ": attack(
        """
        import ctypes, glob
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: makes /proc/self/environ readable by this user
        found = []
        for path in ['/proc/self/environ', '/proc/1/environ', *glob.glob('/proc/[0-9]*/environ')]:
            try:
                if b'@ENV_NAME@' in open(path, 'rb').read():
                    found.append(path)
            except OSError:
                pass
        assert found, 'the marker is in no environ file'
        """,
        evidence="the marker is in no environ file",
    ),
    "evaluator_env_in_the_stack_memory": attack(
        """
        import ctypes
        stack = next(line for line in open('/proc/self/maps') if line.rstrip().endswith('[stack]'))
        low, high = (int(x, 16) for x in stack.split()[0].split('-'))
        assert b'@ENV_NAME@' in ctypes.string_at(low, high - low), 'the marker is not in the stack'
        """,
        evidence="the marker is not in the stack",
    ),
    "host_processes_in_proc": attack(
        """
        import os
        cmdlines = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                cmdlines.append(open(f'/proc/{pid}/cmdline', 'rb').read())
            except OSError:
                pass
        assert any(b'pytest' in c for c in cmdlines), f'{len(cmdlines)} processes visible, none of them pytest'
        """,
        evidence="none of them pytest",
    ),
    # --- other processes, privileges, namespaces
    "ptrace_attach_to_a_sibling": attack(
        """
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        target = os.fork()
        if target == 0:
            libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, so that only the sandbox can refuse the attach
            time.sleep(30)
            os._exit(0)
        time.sleep(0.2)
        attacker = os.fork()
        if attacker == 0:
            os._exit(0 if libc.ptrace(16, target, None, None) == 0 else 1)  # PTRACE_ATTACH
        assert os.waitpid(attacker, 0)[1] == 0, 'PTRACE_ATTACH refused'
        """,
        evidence="PTRACE_ATTACH refused",
    ),
    "signal_pid_1": attack("import os, signal\nos.kill(1, signal.SIGKILL)\n", evidence="PermissionError"),
    "signal_the_evaluator_by_its_host_pid": attack(
        "import os, signal\nos.kill(@EVALUATOR_PID@, signal.SIGKILL)\n", evidence="ProcessLookupError"
    ),
    "setuid_root": attack("import os\nos.setuid(0)\n", evidence="PermissionError"),
    "mount_a_tmpfs": attack(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0, f'mount: {os.strerror(ctypes.get_errno())}'
        """,
        evidence="mount: Operation not permitted",
    ),
    "unshare_a_user_namespace": attack(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.unshare(0x10000000) == 0, f'unshare: {os.strerror(ctypes.get_errno())}'  # CLONE_NEWUSER
        """,
        evidence="unshare: Operation not permitted",
    ),
    # --- resources
    "fork_bomb": attack(
        """
        import ctypes, os
        ctypes.CDLL(None).prctl(15, b'rtb-@TAG@', 0, 0, 0)  # PR_SET_NAME: the test looks for survivors by this name
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        status="timeout",
        timeout_s=2.0,
    ),
    "memory_spread_over_8_processes": attack(
        """
        import os, time
        children = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                block = b'x' * (@MEMORY_MB@ * 6 // 10 << 20)  # 0.6 x the limit, each page touched
                time.sleep(1)
                os._exit(0)
            children.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
        assert codes == [0] * 8, f'exit codes {codes}'
        """,
        evidence="-9",  # SIGKILL from the cgroup's out-of-memory killer
    ),
    "one_file_beyond_the_size_limit": attack(
        "with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n", evidence="File too large"
    ),
    "many_files_beyond_the_tmpfs": attack(
        "for i in range(64):\n    with open(f'part{i}', 'wb') as f:\n        f.write(b'x' * (4 << 20))\n",
        evidence="No space left on device",
    ),
    "cpu_spin": attack("while True:\n    pass\n", status="timeout", timeout_s=2.0),
    "sleep_past_the_timeout": attack("import time\ntime.sleep(60)\n", status="timeout", timeout_s=2.0),
    "daemon_that_double_forks": attack(
        textwrap.dedent(
            """
            import ctypes, os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    ctypes.CDLL(None).prctl(15, b'rtd-@TAG@', 0, 0, 0)  # PR_SET_NAME: the test looks for it by this name
                    time.sleep(60)
                os._exit(0)
            time.sleep(0.3)
            """
        )
        + WRONG_ADD,
        checks=ADD_CHECKS,
        evidence="wrong sum",
    ),
    # --- exit-code tricks: a wrong solution whose checks fail, plus a way to end with exit code 0 first
    "os_exit_0_before_the_checks": attack("import os\n" + WRONG_ADD + "os._exit(0)\n", checks=ADD_CHECKS, evidence="never reported"),
    "sys_exit_0_before_the_checks": attack(
        "import sys\n" + WRONG_ADD + "sys.exit(0)\n", checks=ADD_CHECKS, evidence="(SystemExit 0) before its checks finished"
    ),
    "raise_systemexit_0": attack(WRONG_ADD + "raise SystemExit(0)\n", checks=ADD_CHECKS, evidence="(SystemExit 0)"),
    "builtin_exit": attack(WRONG_ADD + "exit()\n", checks=ADD_CHECKS, evidence="NameError"),  # no `site`: no exit()
    "systemexit_raised_inside_the_checks": attack(
        "def add(a, b):\n    raise SystemExit(0)\n", checks=ADD_CHECKS, evidence="(SystemExit 0) before its checks finished"
    ),
    "thread_exits_0_while_the_checks_run": attack(
        "import os, threading, time\n" + SLOW_WRONG_ADD + "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n",
        checks=ADD_CHECKS,
        evidence="never reported",
    ),
    "signal_handler_exits_0_while_the_checks_run": attack(
        "import os, signal\n"
        + SLOW_WRONG_ADD
        + "signal.signal(signal.SIGALRM, lambda *_: os._exit(0))\nsignal.setitimer(signal.ITIMER_REAL, 0.5)\n",
        checks=ADD_CHECKS,
        evidence="never reported",
    ),
    "atexit_hook_exits_0": attack(
        "import atexit, os\n" + WRONG_ADD + "atexit.register(os._exit, 0)\n", checks=ADD_CHECKS, evidence="wrong sum"
    ),
    "kill_itself": attack(
        "import os, signal\n" + WRONG_ADD + "os.kill(os.getpid(), signal.SIGKILL)\n", checks=ADD_CHECKS, exit_code=137
    ),
    "forge_a_report_on_every_open_fd": attack(
        """
        import os
        for fd in map(int, os.listdir('/proc/self/fd')):
            if fd > 2:
                try:
                    os.write(fd, b'0' * 32 + b'ready\\n')
                except OSError:
                    pass
        os._exit(0)
        """,
        checks=ADD_CHECKS,
        evidence="never reported",
    ),
    "replace_builtin_exec_to_skip_the_checks": attack(
        "import builtins\n" + WRONG_ADD + "builtins.exec = lambda *args, **kwargs: None\n", checks=ADD_CHECKS, evidence="wrong sum"
    ),
    "fake_an_isolation_failure": attack(
        """
        import os, sys
        print('llmops sandbox: could not isolate the program: fake', file=sys.stderr)
        sys.stderr.flush()
        os._exit(125)
        """,
        exit_code=125,
    ),
}


@dataclass
class Host:
    """What the attacks aim at, set up by the test: listeners that count connections, a secret, writable places."""

    repo_dir: Path  # world-writable, in the repo (visible in the sandbox, read-only there)
    host_tmp_dir: Path  # world-writable, in the host's /tmp (hidden in the sandbox)
    secret_file: Path
    unix_socket: Path
    abstract_name: str
    tcp_port: int
    accepted: list[str]

    def fill(self, source: str) -> str:
        values = {
            "@REPO@": str(self.repo_dir), "@HOST_TMP@": str(self.host_tmp_dir), "@SECRET_FILE@": str(self.secret_file),
            "@UNIX_SOCKET@": str(self.unix_socket), "@ABSTRACT@": self.abstract_name, "@TCP_PORT@": str(self.tcp_port),
            "@ENV_NAME@": ENV_NAME, "@TAG@": TAG, "@EVALUATOR_PID@": str(os.getpid()), "@MEMORY_MB@": str(LIMITS.memory_mb),
        }
        for key, value in values.items():
            source = source.replace(key, value)
        return source


@pytest.fixture(scope="module", autouse=True)
def sandbox_works_here():
    problem = isolation_problem()
    assert problem is None, f"the sandbox must work on this machine (root + unshare): {problem}"
    assert sandbox.cgroup_problem() is None, f"program cgroups must work on this machine: {sandbox.cgroup_problem()}"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    cache = ROOT / ".pytest_cache"
    cache.mkdir(exist_ok=True)
    repo_dir = Path(tempfile.mkdtemp(prefix=f"llmops-redteam-{TAG}-", dir=cache))
    host_tmp_dir = Path(tempfile.mkdtemp(prefix=f"llmops-redteam-{TAG}-", dir="/tmp"))
    for path in (repo_dir, host_tmp_dir):
        path.chmod(0o777)
    secret_dir = Path(tempfile.mkdtemp(prefix=f"llmops-redteam-{TAG}-", dir=cache))
    secret_dir.chmod(0o755)
    secret_file = secret_dir / "secret.txt"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    accepted: list[str] = []
    listeners = []
    unix_socket = host_tmp_dir / "listener.sock"
    for family, address in [
        (socket.AF_UNIX, str(unix_socket)), (socket.AF_UNIX, f"\0llmops-redteam-{TAG}"), (socket.AF_INET, ("127.0.0.1", 0))
    ]:
        server = socket.socket(family)
        server.bind(address)
        server.listen()
        listeners.append(server)
        threading.Thread(target=_count_connections, args=(server, accepted), daemon=True).start()
    unix_socket.chmod(0o777)
    yield Host(
        repo_dir, host_tmp_dir, secret_file, unix_socket, f"llmops-redteam-{TAG}", listeners[2].getsockname()[1], accepted
    )
    for server in listeners:
        server.close()
    for path in (repo_dir, host_tmp_dir, secret_dir):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def outcomes(host):
    """Every attack's outcome (or the exception run_program raised), run 8 at a time with the marker in this process's
    environment; also the module's wall time."""
    os.environ[ENV_NAME] = ENV_VALUE
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = dict(zip(ATTACKS, pool.map(lambda a: _run(host, a), ATTACKS.values())))
    finally:
        del os.environ[ENV_NAME]
    print(f"\n{len(ATTACKS)} hostile programs in {time.perf_counter() - started:.1f} s")
    return results


def _run(host: Host, attack: Attack) -> Outcome | Exception:
    try:
        return run_program(host.fill(attack.source), dataclasses.replace(LIMITS, timeout_s=attack.timeout_s), checks=attack.checks)
    except Exception as exc:  # noqa: BLE001 - the test reports it
        return exc


def _count_connections(server: socket.socket, accepted: list[str]) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        accepted.append(repr(server.getsockname()))
        conn.close()


def _processes_named(name: str) -> list[int]:
    found = []
    for comm in glob.glob("/proc/[0-9]*/comm"):
        try:
            if Path(comm).read_text().strip() == name:
                found.append(int(comm.split("/")[2]))
        except OSError:
            pass
    return found


def _eventually(probe, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_hostile_program_fails(name, outcomes):
    out, attack = outcomes[name], ATTACKS[name]
    assert isinstance(out, Outcome), f"run_program raised instead of reporting a failed program: {out!r}"
    assert not out.passed, f"ATTACK SUCCEEDED ({name}): {out.output[-800:]}"
    assert out.status == attack.status, out.output[-800:]
    assert any(reason in out.output for reason in attack.evidence.split("|")), out.output[-800:]
    if attack.exit_code is not None:
        assert out.exit_code == attack.exit_code, out.output[-800:]


def test_no_file_appeared_outside_the_sandbox(outcomes, host):
    assert list(host.repo_dir.iterdir()) == [] and list(host.host_tmp_dir.iterdir()) == [host.unix_socket]
    for path in (ROOT / f"llmops-redteam-{TAG}.txt", Path(f"/root/llmops-redteam-{TAG}.txt"), Path(f"/etc/llmops-redteam-{TAG}.txt")):
        assert not path.exists(), path
    assert host.secret_file.read_text() == SECRET


def test_no_connection_reached_the_test_listeners(outcomes, host):
    assert host.accepted == []


def test_neither_the_secret_nor_the_evaluator_env_appears_in_any_output(outcomes):
    for name, out in outcomes.items():
        text = out.output if isinstance(out, Outcome) else str(out)
        assert SECRET not in text and ENV_VALUE not in text, name


def test_no_process_of_the_daemon_or_the_fork_bomb_outlives_its_run(outcomes):
    assert _eventually(lambda: not _processes_named(f"rtd-{TAG}") and not _processes_named(f"rtb-{TAG}"), within_s=5)


def test_every_program_cgroup_is_removed(outcomes):
    _, parents = sandbox._cgroup_layout()
    assert [p for parent in parents for p in parent.glob(f"llmops-sandbox-{os.getpid()}-*")] == []


def test_an_evaluator_killed_with_sigkill_leaves_no_process_temp_dir_or_cgroup():
    name = f"rto-{TAG}"
    program = f"import ctypes, time\nctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)\nwhile True:\n    time.sleep(1)\n"
    evaluator_code = f"from llmops.evaluation.sandbox import Limits, run_program\nrun_program({program!r}, Limits(timeout_s=120))\n"
    temp_dirs_before = set(glob.glob("/tmp/llmops-sandbox-*"))
    evaluator = subprocess.Popen([sys.executable, "-c", evaluator_code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert _eventually(lambda: _processes_named(name), within_s=20), "the program never started"
        _, parents = sandbox._cgroup_layout()
        cgroups = [p for parent in parents for p in parent.glob(f"llmops-sandbox-{evaluator.pid}-*")]
        assert len(cgroups) == len(parents), cgroups
    finally:
        evaluator.send_signal(signal.SIGKILL)
        evaluator.wait()
    assert _eventually(lambda: not _processes_named(name), within_s=5), "the program outlived its evaluator"
    assert set(glob.glob("/tmp/llmops-sandbox-*")) <= temp_dirs_before, "a temp dir was left behind"
    assert _eventually(lambda: all(not (c / "cgroup.procs").read_text().strip() for c in cgroups), within_s=5)
    # The next evaluator sweeps the cgroups of the dead one.
    swept = [p for parent in parents for p in sandbox.sweep_stale_cgroups(parent)]
    assert set(cgroups) <= set(swept) and not any(c.exists() for c in cgroups)
