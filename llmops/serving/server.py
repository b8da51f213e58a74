"""Launch a backend on a private port and the key-checking proxy on the public one, wait for /health, and always stop both.

Each process starts in a session of its own; stopping one stops its whole process group and
every descendant (vLLM's engine and worker processes, transformers' batching thread host).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmops.params.serve import ServeConfig
from llmops.common.errors import ConfigError, ServeError
from llmops.serving.backends import ServedModel, backend_command, backend_model_id
from llmops.common import env
from llmops.common.env import API_KEY as API_KEY_ENV

STOP_GRACE_S = 15.0
LOG_TAIL_CHARS = 3000


def api_key(cfg: ServeConfig, root: Path) -> str:
    """$LLMOPS_API_KEY, else the key in serve.api_key_file under the repository `root` (created with a random key, mode 0600, when missing)."""
    if key := env.get(API_KEY_ENV).strip():
        return key
    path = Path(root) / cfg.api_key_file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: read theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: the API key file is readable by other users (mode {path.stat().st_mode & 0o777:o}); run `chmod 600 {path}`.")
    key = path.read_text().strip()
    if not key:
        raise ConfigError(f"{path}: the API key file is empty; delete it to get a new random key, or set ${API_KEY_ENV}.")
    return key


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process's group and every descendant (also those in sessions of their own), SIGKILL what is left after `grace_s`."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for member in family:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        if not alive:
            break
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@dataclass
class Server:
    """A running backend + proxy. `url` is the public base URL; clients send `Authorization: Bearer <api_key>`."""

    url: str
    model: ServedModel
    backend: str
    command: list[str]  # the backend's command line (holds no secret)
    log_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list, repr=False)
    api_key: str = field(default="", repr=False)
    health_wait_s: float = 0.0

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        for proc in reversed(self.processes):  # the proxy first, so no request reaches a dying backend
            stop_process_group(proc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        except FileNotFoundError:
            raise ServeError(f"`{cmd[0]}` is not installed in this environment ({sys.executable}).") from None


def _backend_env(backend: str, key: str, cache_dir: Path) -> dict[str, str]:
    backend_env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    cache_dir.mkdir(parents=True, exist_ok=True)
    backend_env["HF_HUB_CACHE"] = str(cache_dir)  # transformers serve's /v1/models scan fails without an existing cache dir
    backend_env.setdefault("HF_HUB_OFFLINE", "1")
    backend_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if backend == "vllm":
        backend_env["VLLM_API_KEY"] = key  # a second lock on vLLM's /v1 routes; the proxy forwards the client's header
        backend_env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        backend_env["VLLM_NO_USAGE_STATS"] = "1"
    return backend_env


def wait_healthy(server: Server, timeout_s: float, logs: dict[str, Path]) -> float:
    """Poll the public /health until it answers 200; fail fast when a process exits. Returns the seconds waited."""
    import httpx

    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < timeout_s:
        for (name, log), proc in zip(logs.items(), server.processes, strict=True):
            if proc.poll() is not None:
                raise ServeError(f"the {name} process exited with code {proc.returncode} before /health answered. Last output ({log}):\n{log_tail(log)}")
        try:
            response = httpx.get(f"{server.url}/health", timeout=5.0)
            if response.status_code == 200:
                return time.monotonic() - start
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.5)
    backend_log = logs["backend"]
    raise ServeError(f"{server.url}/health did not answer 200 within {timeout_s:.0f} s (serve.health_timeout_s); last: {last}. Backend output ({backend_log}):\n{log_tail(backend_log)}")


def start(model: ServedModel, cfg: ServeConfig, backend: str, key: str, *, port: int, log_dir: Path, cwd: Path = Path(".")) -> Server:
    """Start backend + proxy and wait for /health; on any failure both are stopped before the error propagates."""
    public_port = port or free_port()
    backend_port = free_port()
    command = backend_command(backend, model, cfg, backend_port)
    cwd = Path(cwd).resolve()
    logs = {"backend": log_dir / "backend.log", "proxy": log_dir / "proxy.log"}
    for log in logs.values():
        log.unlink(missing_ok=True)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    server = Server(url=f"http://{host}:{public_port}", model=model, backend=backend, command=command, log_dir=log_dir, api_key=key)
    proxy_cmd = [
        sys.executable, "-m", "llmops.serving.proxy",
        "--backend-url", f"http://127.0.0.1:{backend_port}",
        "--host", cfg.host, "--port", str(public_port),
        "--model", f"{model.name}={backend_model_id(backend, model)}",
        "--timeout-s", str(cfg.request_timeout_s),
    ]  # fmt: skip
    proxy_env = os.environ | {API_KEY_ENV: key}
    try:
        server.processes.append(_spawn(command, logs["backend"], _backend_env(backend, key, log_dir / "hf-cache"), cwd))
        server.processes.append(_spawn(proxy_cmd, logs["proxy"], proxy_env, cwd))
        server.health_wait_s = wait_healthy(server, cfg.health_timeout_s, logs)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def serving(model: ServedModel, cfg: ServeConfig, backend: str, key: str, *, port: int = 0, log_dir: Path, cwd: Path = Path(".")) -> Iterator[Server]:
    """A healthy server for the `with` block, stopped (with all its processes) however the block ends."""
    server = start(model, cfg, backend, key, port=port, log_dir=log_dir, cwd=cwd)
    try:
        yield server
    finally:
        server.stop()
