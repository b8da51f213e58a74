"""Runs inside `unshare --mount --net --pid --ipc --uts --fork`: locks the namespace down, then runs one program.

Usage: python -I -S jail.py WORKDIR UID LIMITS_JSON < program.py  (LIMITS_JSON: see sandbox.Limits).
With UID -1 (no isolation, `evaluate.allow_unsandboxed`) only the rlimits and the working directory apply.

Only the standard library is imported: this file runs as PID 1 of a fresh PID namespace, so when it
exits the kernel kills whatever the program left behind (a fork bomb's children included).
"""

import ctypes
import json
import os
import resource
import stat
import sys
import traceback

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC = 1, 2, 4, 32, 4096, 8192, 16384
PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


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


def _lock_down(workdir, uid, limits):
    _expose_interpreter(workdir)
    # Every mount read-only: a bind remount changes one mount, so each one in the namespace is done.
    for point in _mount_points():
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        except OSError:
            if not os.statvfs(point).f_flag & os.ST_RDONLY:
                raise
    # The one writable place: a size-capped tmpfs owned by the unprivileged user.
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={limits['workdir_mb']}m,uid={uid},gid={uid}")


def _set_limits(limits):
    mb = 1024 * 1024
    cpu = int(limits["timeout_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_mb"] * mb, limits["max_file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run_program(workdir, uid, limits, source):
    """In the forked child: drop to `uid` (no capabilities, no setuid gains), apply rlimits, run the source."""
    path = os.path.join(workdir, "program.py")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, source)
    os.close(fd)
    if uid >= 0:
        os.chown(path, uid, uid)
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _set_limits(limits)
    os.chdir(workdir)
    os.umask(0o077)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"})
    sys.argv = [path]
    code = 0
    try:
        exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main():
    workdir, uid, limits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    source = sys.stdin.buffer.read()
    if uid >= 0:
        try:
            _lock_down(workdir, uid, limits)
        except OSError as exc:
            print(f"llmops sandbox: could not isolate the program: {exc}", file=sys.stderr)
            os._exit(125)
    child = os.fork()
    if child == 0:
        _run_program(workdir, uid, limits, source)
    # As PID 1 of the namespace, reap every orphan (they count against the process limit) until the program ends.
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
