"""Run untrusted generated code: one process tree per program in fresh Linux namespaces, under seccomp, a cgroup,
rlimits and a timeout; a pass needs exit code 0 and a report that the checks ran to their end.

Each program runs under `unshare --mount --net --pid --ipc --uts --fork` and then `jail.py`, which
- remounts every mount read-only; puts empty read-only tmpfs over /run (/var/run), /var/tmp and /dev/shm, which hides
  the host's socket files (PostgreSQL, MariaDB, Redis) and shared memory; and mounts a size-capped tmpfs on /tmp, the
  program's working directory and the only writable place (it lives in the namespace: the host never sees it),
- starts with PATH and LANG as its whole environment (JAIL_ENV): the evaluator's variables are in no process's memory
  or /proc/<pid>/environ there,
- has no network (a new network namespace holds only a loopback that is down),
- drops to an unprivileged user id of its own (no capabilities, `no_new_privs`), so RLIMIT_NPROC bounds a fork bomb,
- loads a seccomp filter built by libseccomp (`seccomp_program`): no socket of any family, no io_uring, ptrace,
  process_vm_*, keyrings, bpf, perf events, userfaultfd, mounts or new namespaces; a system call of another ABI
  (x32, i386 through `int 0x80`) kills the process,
- sets rlimits: address space, CPU seconds, processes, file size, open files, no core files,
- runs as PID 1's child in a new PID namespace: when the program ends or is killed for the wall-clock timeout, the
  kernel kills everything it started.
The whole tree under `unshare` (the jail, the program and its children) sits in a cgroup of its own with a memory
limit (memory + swap) and a process limit, removed after the run. Where no cgroup can be made, each process still
has its rlimits, so a program may hold up to max_processes x memory_mb; a warning says so (this bounds resources,
not access, so the run goes on). If the evaluator dies, even by SIGKILL, `unshare` gets SIGKILL (`setpriv
--pdeathsig`), the jail gets it from `unshare --kill-child`, and the PID namespace takes the program down; nothing
is written to the host's disk (output goes to an unlinked temporary file), and the next evaluator removes the
cgroups left behind.

Pass/fail. The code under test (`source`) and its `checks` are separate: the jail's child executes the source, then
the checks in the same namespace, and only when the checks return normally writes a per-run nonce (sent to the jail
over stdin, never in argv) to a report pipe. A pass is exit code 0 and the nonce in the report, so `os._exit(0)`,
`sys.exit(0)`, a SystemExit from the code under test, a signal, or an exit from a thread while the checks are still
running all fail. Whether the jail could isolate the program travels on a separate status pipe that is closed before
untrusted code runs, so a program cannot fake an isolation failure (or success) with its exit code or output.
What this does not stop: code in the same process as its checks can read the harness's state (frame introspection,
`gc`, ctypes reads of its own memory) and forge the report, or subvert the checks themselves (rebinding a name the
checks call, a trace function skipping an assert, a result whose `__eq__` is always true). The sandbox bounds what
such a program can reach; it does not prove the checks were meaningful.

This needs root (or CAP_SYS_ADMIN), util-linux `unshare` and `setpriv`, and libseccomp. Without them
`SandboxUnavailable` is raised, unless the user opts into running with rlimits only
(`evaluate.allow_unsandboxed: true`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import json
import logging
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

log = logging.getLogger("llmops.sandbox")

JAIL = Path(__file__).with_name("jail.py")
NAMESPACES = ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]
# The jail's whole environment: /proc/<pid>/environ of every process in the sandbox shows this and nothing of the evaluator's.
JAIL_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# Lines on the status pipe (jail.py writes them); anything before READY that is not READY means the jail failed.
STATUS_READY, STATUS_FAILED = "ready", "could not isolate"
OUTPUT_TAIL_CHARS = 2000
REPORT_MAX_BYTES = 1 << 16
# Unprivileged user ids for programs: outside the range of real accounts, one per run so that
# concurrent programs do not share a process limit.
UID_BASE, UID_SPAN = 200_000, 100_000
CGROUP_PREFIX = "llmops-sandbox-"  # + the evaluator's pid + a random suffix

# Refused with EPERM. Sockets of every family: a HumanEval program needs none, and a socket file under a read-only
# mount still connects. io_uring: its requests connect and open on the program's behalf, around this filter.
# The rest is defense in depth: reading or steering other processes, kernel keyrings, BPF, perf events, userfaultfd
# (exploit staples), and mounts or namespaces (a new user namespace holds capabilities of its own).
DENIED_SYSCALLS = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "ptrace", "process_vm_readv", "process_vm_writev",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
)
# clone() flags that make a namespace (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET);
# clone3() passes its flags in memory a filter cannot read, so it answers ENOSYS and the C library falls back to clone().
CLONE_NEW_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


class SandboxUnavailable(StageError):
    """Generated code cannot be isolated here (not root, no `unshare`, namespaces or seccomp refused)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock; CPU seconds are capped at the next whole second above it
    memory_mb: int = 1024  # the whole program's memory (cgroup, swap included) and each process's address space
    max_processes: int = 32  # processes and threads: RLIMIT_NPROC of the program's own user id, and the cgroup's
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
    """Why namespaces cannot be used here, or None when they can (checked by running a probe program that must run
    as an unprivileged user with sockets refused)."""
    if not sys.platform.startswith("linux"):
        return f"namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"mount and network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "util-linux `unshare` and `setpriv` are not on PATH (Debian: apt-get install util-linux)"
    try:
        seccomp_program()
    except (ImportError, RuntimeError, OSError) as exc:
        return f"libseccomp is unusable ({exc}); Debian: apt-get install libseccomp2, and `pip install pyseccomp`"
    cgroup_problem()  # sweeps cgroups a killed evaluator left behind, and warns once when there is no cgroup
    refused = "try:\n    socket.socket()\nexcept PermissionError:\n    pass\nelse:\n    raise AssertionError('socket() allowed')\n"
    probe = run_program("import os, socket\nassert os.getuid() != 0\n", Limits(timeout_s=20), checks=refused)
    if not probe.passed:
        return f"a probe program failed in the sandbox ({probe.status}, exit {probe.exit_code}): {probe.output.strip()[-400:]}"
    return None


def run_program(source: str, limits: Limits, *, checks: str = "", isolated: bool = True) -> Outcome:
    """Run `source` and then `checks` (in the same namespace) as one Python program in its own sandbox.

    Passed: exit code 0 within the timeout and the checks reported that they returned normally. A plain program
    (no `checks`) passes when it runs to its end. Raises SandboxUnavailable when the jail reports it could not
    isolate the program (never because of what the program prints or its exit code).
    """
    nonce = secrets.token_hex(16)
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if isolated else -1
    argv = [sys.executable, "-I", "-S", str(JAIL)]
    if isolated:  # setpriv: `unshare` gets SIGKILL when the thread that started it dies (with this process)
        setpriv, unshare = shutil.which("setpriv") or "setpriv", shutil.which("unshare") or "unshare"
        argv = [setpriv, "--pdeathsig", "KILL", "--", unshare, *NAMESPACES, "--", *argv]
    job = {
        "uid": uid, "limits": asdict(limits), "nonce": nonce, "source": source, "checks": checks,
        "seccomp": base64.b64encode(seccomp_program()).decode() if isolated else None,
    }
    with contextlib.ExitStack() as cleanup:
        if isolated:
            job["workdir"] = "/tmp"  # a tmpfs the jail mounts inside the namespace
        else:
            job["workdir"] = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="llmops-sandbox-"))
        cgroup = ProgramCgroup.create(limits)
        if cgroup:
            cleanup.callback(cgroup.remove)
        report_r, report_w = _pipe(cleanup)
        status_r, status_w = _pipe(cleanup)
        job.update(report_fd=report_w, status_fd=status_w, cgroup_fds=cgroup.procs_fds if cgroup else [])
        # Output goes to an unlinked file, not a pipe: a program printing without end is stopped by RLIMIT_FSIZE, not
        # by this process's memory, and nothing is left on disk if this process dies.
        output = cleanup.enter_context(tempfile.TemporaryFile())
        started = time.perf_counter()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, env=JAIL_ENV, cwd="/",
                pass_fds=(report_w, status_w, *job["cgroup_fds"]), start_new_session=True,
            )
        finally:
            os.close(report_w)  # only the sandbox holds the write ends from here on
            os.close(status_w)
        timed_out = False
        try:
            proc.communicate(json.dumps(job).encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
        seconds = time.perf_counter() - started
        text = _tail(output)
        report, status = _drain(report_r), _drain(status_r).decode("utf-8", "replace")
    if STATUS_FAILED in status:
        raise SandboxUnavailable(f"the execution sandbox could not be set up: {status.strip()[-400:]}")
    if timed_out:
        return Outcome("timeout", None, seconds, text)
    if STATUS_READY not in status:
        raise SandboxUnavailable(f"the sandbox ended before the program started (exit {proc.returncode}): {text.strip()[-400:]}")
    passed = proc.returncode == 0 and nonce.encode() in report
    if proc.returncode == 0 and not passed:
        text += "\nllmops sandbox: exit code 0, but the checks never reported that they finished (the program ended early)\n"
    elif isolated and proc.returncode == 128 + signal.SIGSYS:
        text += "\nllmops sandbox: killed by the seccomp filter (a system call of another ABI: x32, or i386 `int 0x80`)\n"
    return Outcome("passed" if passed else "failed", proc.returncode, seconds, text)


def _pipe(cleanup: contextlib.ExitStack) -> tuple[int, int]:
    """A pipe whose read end `cleanup` closes (the caller closes the write end once the sandbox holds it)."""
    read_end, write_end = os.pipe()
    cleanup.callback(os.close, read_end)
    return read_end, write_end


@functools.cache
def seccomp_program() -> bytes:
    """The seccomp filter of a sandboxed program as the BPF program libseccomp compiles (built once per evaluator;
    the jail hands it to the kernel). Everything not in DENIED_SYSCALLS is allowed; a system call of any ABI other
    than the native one (x32, or i386 through `int 0x80`) kills the process, which libseccomp's arch check does."""
    import pyseccomp as seccomp

    syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
    syscall_filter.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in DENIED_SYSCALLS:
        syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), name)
    for flag in CLONE_NEW_NAMESPACE_FLAGS:
        syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    syscall_filter.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as compiled:
        syscall_filter.export_bpf(compiled)
        compiled.seek(0)
        return compiled.read()


def cgroup_problem() -> str | None:
    """Why programs cannot get a cgroup of their own here (then only per-process rlimits bound memory), or None."""
    layout = _cgroup_layout()
    return layout if isinstance(layout, str) else None


@dataclass
class ProgramCgroup:
    """One program's cgroup (a directory in each hierarchy used): memory (+ swap) and process limits for the tree."""

    dirs: list[Path]
    procs_fds: list[int]  # cgroup.procs of each, opened here; the jail writes "0" (itself) to them before anything else

    @classmethod
    def create(cls, limits: Limits) -> ProgramCgroup | None:
        layout = _cgroup_layout()
        if isinstance(layout, str):
            return None
        version, parents = layout
        name = f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        memory, pids = str(limits.memory_mb * 1024 * 1024), str(limits.max_processes + 1)  # + the jail
        cgroup = cls([], [])
        try:
            for parent in parents:
                path = parent / name
                path.mkdir()
                cgroup.dirs.append(path)
                if version == "v2":
                    limit_files = {"memory.max": memory, "memory.swap.max": "0", "pids.max": pids}
                else:  # memsw (memory + swap) must not go below memory: memory's limit is written first
                    limit_files = {"memory.limit_in_bytes": memory, "memory.memsw.limit_in_bytes": memory, "pids.max": pids}
                for file, value in limit_files.items():
                    if (path / file).exists():
                        (path / file).write_text(value)
                cgroup.procs_fds.append(os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except OSError as exc:
            log.warning("sandbox: could not create cgroup %s (%s); this program is bounded by its rlimits only", name, exc)
            cgroup.remove()
            return None
        return cgroup

    def remove(self) -> None:
        """Kill whatever is left in the cgroup (a daemon of an unsandboxed run), then remove it."""
        for fd in self.procs_fds:
            os.close(fd)
        self.procs_fds = []
        for path in reversed(self.dirs):
            _remove_cgroup(path)
        self.dirs = []


def _remove_cgroup(path: Path, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:  # EBUSY: killed tasks are still exiting
                log.warning("sandbox: could not remove cgroup %s (%s); the next evaluator removes it", path, exc)
                return False
            time.sleep(0.01)


@functools.cache
def _cgroup_layout() -> tuple[str, tuple[Path, ...]] | str:
    """("v2", (dir,)) or ("v1", (memory dir[, pids dir])): this process's own cgroups, under which each program gets
    one; or why there are none. Cgroups of dead evaluators found there are removed (once per process)."""
    found = _own_cgroup_dirs()
    if isinstance(found, str):
        log.warning("sandbox: %s; each program's memory is bounded per process only (max_processes x memory_mb)", found)
        return found
    for parent in found[1]:
        sweep_stale_cgroups(parent)
    return found


def _own_cgroup_dirs() -> tuple[str, tuple[Path, ...]] | str:
    try:
        memberships = {}  # controller ("" for the unified hierarchy) -> this process's cgroup path
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                memberships[controller] = path
        mounts = {}  # controller -> (mount point, root of the mount in the hierarchy)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3]
            if fstype == "cgroup2":
                mounts.setdefault("", (fields[4], fields[3]))
            elif fstype == "cgroup":
                for option in options.split(","):
                    mounts.setdefault(option, (fields[4], fields[3]))
    except (OSError, ValueError, IndexError) as exc:
        return f"cannot read this process's cgroups ({exc})"

    def own_dir(controller: str) -> Path | None:
        if controller not in memberships or controller not in mounts:
            return None
        mount_point, root = mounts[controller]
        relative = os.path.relpath(memberships[controller], root)
        return None if relative.startswith("..") else Path(mount_point, relative).resolve()

    unified = own_dir("")
    if unified and {"memory", "pids"} <= set(_read(unified / "cgroup.subtree_control").split()):
        layout = ("v2", (unified,))
    elif own_dir("memory"):
        layout = ("v1", tuple(d for d in (own_dir("memory"), own_dir("pids")) if d))
    else:
        return (
            "no cgroup hierarchy with the memory controller is delegated to this process "
            "(cgroup v2 needs memory and pids in its cgroup.subtree_control)"
        )
    probe = f"{CGROUP_PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}"
    for parent in layout[1]:
        try:
            (parent / probe).mkdir()
            (parent / probe).rmdir()
        except OSError as exc:
            return f"cannot create a cgroup under {parent} ({exc})"
    return layout


def sweep_stale_cgroups(parent: Path) -> list[Path]:
    """Remove the program cgroups under `parent` whose evaluator process is gone (it was killed mid-run); returns them."""
    removed = []
    for path in parent.glob(f"{CGROUP_PREFIX}*"):
        owner = path.name[len(CGROUP_PREFIX) :].split("-")[0]
        if owner.isdigit() and int(owner) != os.getpid() and not _alive(int(owner)) and _remove_cgroup(path):
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        pass
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _drain(fd: int) -> bytes:
    """What is in the pipe now, without waiting for writers that may still be dying."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < REPORT_MAX_BYTES:
        try:
            chunk = os.read(fd, REPORT_MAX_BYTES - size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _tail(output) -> str:
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - OUTPUT_TAIL_CHARS * 4))
    return output.read().decode("utf-8", "replace")[-OUTPUT_TAIL_CHARS:]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole session: `unshare` dies, its child (PID 1 of the namespace) gets its death signal, and
    the kernel kills every process left in that PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
