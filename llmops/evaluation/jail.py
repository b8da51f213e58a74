"""Runs inside `unshare --mount --net --pid --ipc --uts --fork`: locks the namespace down, then runs one program.

Usage: python -I -S jail.py < JOB_JSON, as sandbox.run_program writes it: uid, limits (see sandbox.Limits), workdir,
source, checks, nonce, seccomp (the compiled filter, base64), report_fd / status_fd (pipes inherited from it) and
cgroup_fds (the program cgroup's cgroup.procs files, opened by it: the jail moves itself there first).
With uid -1 (no isolation, `evaluate.allow_unsandboxed`) only the rlimits and the working directory apply.

The status pipe gets "could not isolate: <why>" when a lock-down step fails, or "ready" once the child is locked down;
the child closes it before any untrusted code runs. The report pipe gets the nonce, written only after the source and
then the checks returned normally.

Only the standard library is imported (the seccomp filter arrives compiled, so the libseccomp binding is not needed
here): this file runs as PID 1 of a fresh PID namespace, so when it exits the kernel kills whatever the program left
behind (a fork bomb's children included).
"""

import base64
import ctypes
import json
import linecache
import os
import resource
import stat
import sys
import traceback

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC = 1, 2, 4, 8, 32, 4096, 8192, 16384
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
STATUS_READY, STATUS_FAILED = "ready", "could not isolate"  # as sandbox.py reads them
ISOLATION_FAILED = 125  # exit code after a failed lock-down; the evaluator goes by the status pipe, not by this
WORKDIR = "/tmp"  # in the namespace: a fresh tmpfs, the program's only writable place
# Covered with an empty read-only tmpfs: the host's socket files (/run/postgresql, /run/mysqld, ...), shared memory
# and temporary files stay out of sight.
HIDDEN_DIRS = ("/run", "/var/run", "/var/tmp", "/dev/shm")
CHECKS_FILE = "<checks>"
_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _prctl(option, arg2, arg3=0):
    if _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}): {os.strerror(err)}")


def _mount_points():
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            points.append(point.encode().decode("unicode_escape"))  # \040 for a space, as the kernel writes it
    return points


def _expose_interpreter(staging):
    """Make the interpreter's prefix readable for an unprivileged user when an ancestor is not (pyenv in /root).

    The blocking directory is covered with an empty tmpfs and only the needed subtree is put back: the program
    sees the Python it needs and nothing else of that directory (a home's secrets stay hidden).
    """
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if os.stat(ancestor).st_mode & stat.S_IXOTH:
            continue
        child = ancestor + "/" + parts[i]
        _mount(child, staging, None, MS_BIND | MS_REC)
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        os.mkdir(child, 0o755)
        _mount(staging, child, None, MS_MOVE)


def _hidden_dirs():
    """HIDDEN_DIRS that exist here, each once (/var/run is mostly a link to /run)."""
    dirs = []
    for path in HIDDEN_DIRS:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in dirs and real != WORKDIR:
            dirs.append(real)
    return dirs


def _lock_down(uid, limits):
    prefix = os.path.realpath(sys.base_prefix)
    for covered in [WORKDIR, *_hidden_dirs()]:
        if prefix == covered or prefix.startswith(covered + "/"):
            raise OSError(f"the interpreter ({prefix}) lives under {covered}, which the sandbox covers")
    # A scratch tmpfs on /tmp holds the staging point for the interpreter's directory; the work tmpfs covers it later.
    _mount("tmpfs", WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=64k")
    staging = os.path.join(WORKDIR, "staging")
    os.mkdir(staging, 0o700)
    _expose_interpreter(staging)
    # Every mount read-only: a bind remount changes one mount, so each one in the namespace is done.
    for point in _mount_points():
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError:
            if not os.statvfs(point).f_flag & os.ST_RDONLY:
                raise
    for path in _hidden_dirs():
        _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=4k")
    # The one writable place: a size-capped tmpfs owned by the unprivileged user.
    _mount("tmpfs", WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={limits['workdir_mb']}m,uid={uid},gid={uid}")


def _set_limits(limits):
    mb = 1024 * 1024
    cpu = int(limits["timeout_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_mb"] * mb, limits["max_file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _load_seccomp(program):
    """Hand libseccomp's compiled filter to the kernel (no_new_privs is already set, so no capability is needed)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))  # 8 bytes per struct sock_filter
    zero = ctypes.c_ulong(0)
    if _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter refused: {os.strerror(err)}")


def _confine(job):
    """In the forked child: drop to the job's uid (no capabilities, no setuid gains), apply rlimits and seccomp."""
    uid = job["uid"]
    if uid >= 0:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _set_limits(job["limits"])
    os.chdir(job["workdir"])
    os.umask(0o077)
    if job["seccomp"]:
        _load_seccomp(base64.b64decode(job["seccomp"]))


def _run_program(job):
    """In the forked child, once confined: run the source, then the checks, in one namespace; report only when
    the checks returned. Never returns."""
    status, report, nonce = job["status_fd"], job["report_fd"], job["nonce"].encode()
    try:
        _confine(job)
    except OSError as exc:
        os.write(status, f"{STATUS_FAILED}: {exc}\n".encode())
        os._exit(ISOLATION_FAILED)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": job["workdir"], "TMPDIR": job["workdir"], "LANG": "C.UTF-8"})
    os.write(status, f"{STATUS_READY}\n".encode())
    os.close(status)

    # Bound here, before the program can rebind builtins or module attributes (`builtins.exec = ...`).
    run, write, exit_now, flush = exec, os.write, os._exit, _flush
    path = os.path.join(job["workdir"], "program.py")
    sys.argv = [path]
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    code = 1
    try:
        with open(path, "x") as f:  # for tracebacks and programs that read their own file
            f.write(job["source"])
        checks = job["checks"]
        linecache.cache[CHECKS_FILE] = (len(checks), None, checks.splitlines(True), CHECKS_FILE)
        program, tests = compile(job["source"], path, "exec"), compile(checks, CHECKS_FILE, "exec")
        run(program, namespace)
        run(tests, namespace)
    except SystemExit as exc:
        print(f"llmops sandbox: the program exited (SystemExit {exc.code}) before its checks finished", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    else:
        try:
            write(report, nonce)
            code = 0
        except OSError as exc:
            print(f"llmops sandbox: the checks finished but their report could not be written ({exc})", file=sys.stderr)
    flush()
    exit_now(code)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def main():
    job = json.loads(sys.stdin.buffer.read())
    try:
        for fd in job["cgroup_fds"]:  # before any child exists: the whole program tree is in the cgroup
            os.write(fd, b"0")
            os.close(fd)
        if job["uid"] >= 0:
            _lock_down(job["uid"], job["limits"])
    except OSError as exc:
        os.write(job["status_fd"], f"{STATUS_FAILED}: {exc}\n".encode())
        os._exit(ISOLATION_FAILED)
    child = os.fork()
    if child == 0:
        try:
            _run_program(job)
        finally:
            os._exit(1)  # an exception that escaped the harness must not run this parent's code in the child
    os.close(job["status_fd"])
    os.close(job["report_fd"])
    # As PID 1 of the namespace, reap every orphan (they count against the process limit) until the program ends.
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
