"""Launch a backend on a private Unix socket and the key-checking proxy on the public port, wait for /health, supervise both, and always stop both.

The backend listens on a socket in a fresh 0700 directory of the serving user, so the proxy is the only door
to it. Each process starts in a session of its own; stopping one stops its whole process group and every
descendant (vLLM's engine and worker processes, transformers' batching thread host). While the server runs,
a supervisor thread restarts a backend that exited or whose /health failed serve.unhealthy_checks times in a
row (and a proxy that exited), at most serve.max_restarts times in serve.restart_window_s; past that it stops
everything and sets `Server.failure`, so a server is never left answering 503 for good.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from llmops.params.serve import ServeConfig
from llmops.common.errors import ConfigError, ServeError
from llmops.serving.backends import ServedModel, backend_command, backend_model_id, context_tokens, kv_cache_blocks, tokenizer_dir
from llmops.common import env
from llmops.common.env import API_KEY as API_KEY_ENV

STOP_GRACE_S = 15.0
LOG_TAIL_CHARS = 3000
HEALTH_CHECK_TIMEOUT_S = 40.0  # the proxy's /health waits for a one-token completion (up to 30 s)
BACKEND_SOCKET = "backend.sock"
BACKEND_UMASK = 0o077  # what the backend creates, its socket included, is the serving user's alone

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Launch:
    """How to (re)start one of the server's processes."""

    name: str  # backend | proxy
    command: list[str]
    log: Path
    env: dict[str, str] = field(repr=False)
    cwd: Path
    umask: int = -1  # -1 = the parent's


@dataclass
class Server:
    """A running backend + proxy. `url` is the public base URL; clients send `Authorization: Bearer <api_key>`."""

    url: str
    model: ServedModel
    backend: str
    command: list[str]  # the backend's command line (holds no secret)
    log_dir: Path
    socket_dir: Path  # 0700, holds the backend's socket; removed on stop
    processes: list[subprocess.Popen] = field(default_factory=list, repr=False)  # [backend, proxy]
    api_key: str = field(default="", repr=False)
    health_wait_s: float = 0.0
    restarts: list[str] = field(default_factory=list)  # "backend: why", one per restart
    failure: str = ""  # why the supervisor gave up (the server is stopped then)
    launches: list[Launch] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _supervisor: threading.Thread | None = field(default=None, repr=False)

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def backend_socket(self) -> Path:
        return self.socket_dir / BACKEND_SOCKET

    def running(self) -> bool:
        """True until the server is stopped or its supervisor gives up (a restart in progress counts as running)."""
        if self._supervisor is not None:
            return self._supervisor.is_alive()
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        self._stop_processes()

    def _stop_processes(self) -> None:
        with self._lock:
            for proc in reversed(self.processes):  # the proxy first, so no request reaches a dying backend
                stop_process_group(proc)
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def supervise(self, cfg: ServeConfig) -> None:
        """Start the supervisor thread (`start` does): restarts within serve.max_restarts, else `failure` and a stopped server."""
        self._supervisor = threading.Thread(target=self._supervise, args=(cfg,), name=f"supervise {self.url}", daemon=True)
        self._supervisor.start()

    def _problem(self) -> tuple[str, str, bool]:
        """(process to restart or "", why, at once): an exited process at once, a failing /health after repeated checks."""
        import httpx

        for launch, proc in zip(self.launches, self.processes, strict=True):
            if proc.poll() is not None:
                return launch.name, f"the {launch.name} process exited with code {proc.returncode}", True
        try:
            response = httpx.get(f"{self.url}/health", headers=self.auth_headers, timeout=HEALTH_CHECK_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return "proxy", f"the proxy did not answer /health: {type(exc).__name__}", False
        if response.status_code != 200:
            return "backend", f"/health answered {response.status_code}: {response.text[:300]}", False
        return "", "", False

    def _supervise(self, cfg: ServeConfig) -> None:
        failed_checks = 0
        recent: deque[float] = deque()
        while not self._stopping.wait(cfg.supervise_interval_s):
            name, reason, at_once = self._problem()
            if not name or self._stopping.is_set():
                failed_checks = 0
                continue
            failed_checks += 1
            if not at_once and failed_checks < cfg.unhealthy_checks:
                continue
            failed_checks = 0
            now = time.monotonic()
            while recent and now - recent[0] > cfg.restart_window_s:
                recent.popleft()
            if len(recent) >= cfg.max_restarts:
                self.failure = f"{reason}; {len(recent)} restarts within {cfg.restart_window_s:g} s already (serve.max_restarts): stopping the server"
                logger.error("%s: %s", self.url, self.failure)
                self._stop_processes()
                return
            recent.append(now)
            self.restarts.append(f"{name}: {reason}")
            logger.warning("%s: restarting the %s (%s)", self.url, name, reason)
            self._restart(name, cfg.health_timeout_s)

    def _restart(self, name: str, health_timeout_s: float) -> None:
        """Replace one process, then wait (at most `health_timeout_s`) for /health; a failure shows in the next check."""
        import httpx

        index = next(i for i, launch in enumerate(self.launches) if launch.name == name)
        with self._lock:
            if self._stopping.is_set():
                return
            stop_process_group(self.processes[index])
            if name == "backend":
                self.backend_socket.unlink(missing_ok=True)  # vLLM will not bind over a stale socket file
            self.processes[index] = _spawn(self.launches[index])
        deadline = time.monotonic() + health_timeout_s
        while time.monotonic() < deadline and self.processes[index].poll() is None and not self._stopping.wait(0.5):
            with suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", headers=self.auth_headers, timeout=HEALTH_CHECK_TIMEOUT_S).status_code == 200:
                    return


def _spawn(launch: Launch) -> subprocess.Popen:
    launch.log.parent.mkdir(parents=True, exist_ok=True)
    with open(launch.log, "ab") as out:
        try:
            return subprocess.Popen(
                launch.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=launch.env, cwd=launch.cwd, start_new_session=True, umask=launch.umask
            )  # fmt: skip
        except FileNotFoundError:
            raise ServeError(f"`{launch.command[0]}` is not installed in this environment ({sys.executable}).") from None


def _backend_env(backend: str, key: str, cache_dir: Path) -> dict[str, str]:
    backend_env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    cache_dir.mkdir(parents=True, exist_ok=True)
    backend_env["HF_HUB_CACHE"] = str(cache_dir)  # transformers serve's /v1/models scan fails without an existing cache dir
    backend_env.setdefault("HF_HUB_OFFLINE", "1")
    backend_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if backend == "vllm":
        backend_env["VLLM_API_KEY"] = key  # a second lock on vLLM's /v1 routes; the proxy sends the key
        backend_env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        backend_env["VLLM_NO_USAGE_STATS"] = "1"
    return backend_env


def wait_healthy(server: Server, timeout_s: float) -> float:
    """Poll the public /health until it answers 200; fail fast when a process exits. Returns the seconds waited."""
    import httpx

    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - start < timeout_s:
        for launch, proc in zip(server.launches, server.processes, strict=True):
            if proc.poll() is not None:
                raise ServeError(f"the {launch.name} process exited with code {proc.returncode} before /health answered. Last output ({launch.log}):\n{log_tail(launch.log)}")
        try:
            response = httpx.get(f"{server.url}/health", headers=server.auth_headers, timeout=HEALTH_CHECK_TIMEOUT_S)
            if response.status_code == 200:
                return time.monotonic() - start
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.5)
    backend_log = server.launches[0].log
    raise ServeError(f"{server.url}/health did not answer 200 within {timeout_s:.0f} s (serve.health_timeout_s); last: {last}. Backend output ({backend_log}):\n{log_tail(backend_log)}")


def proxy_command(backend: str, model: ServedModel, cfg: ServeConfig, uds: Path, public_port: int, *, root: Path = Path("."), model_version: str = "") -> list[str]:
    """The proxy on the public port, in front of the backend's socket, with the serve limits; with serve.capture, also
    where (serve.capture_dir under `root`) and how it writes requests for the monitor."""
    capture = [
        "--capture-dir", str((Path(root) / cfg.capture_dir).resolve()), "--capture-sample-rate", str(cfg.capture_sample_rate),
        "--capture-seed", str(cfg.capture_seed), "--capture-max-bytes", str(cfg.capture_max_bytes), "--capture-max-age-s", str(cfg.capture_max_age_s),
        *(f"--capture-redact={pattern}" for pattern in cfg.capture_redact),  # one argument each: a pattern may start with "-"
    ] if cfg.capture else []  # fmt: skip
    return [
        sys.executable, "-m", "llmops.serving.proxy",
        "--backend-uds", str(uds),
        "--host", cfg.host, "--port", str(public_port),
        "--model", f"{model.name}={backend_model_id(backend, model)}",
        "--model-dir", str(tokenizer_dir(model)),
        "--context-tokens", str(context_tokens(backend, model, cfg)),
        "--kv-cache-blocks", str(kv_cache_blocks(backend, cfg)), "--kv-block-tokens", str(cfg.cb_block_size),
        "--max-tokens", str(cfg.max_tokens), "--max-n", str(cfg.max_n),
        "--max-body-bytes", str(cfg.max_body_bytes), "--client-timeout-s", str(cfg.client_timeout_s),
        "--max-connections", str(cfg.max_connections), "--timeout-s", str(cfg.request_timeout_s),
        "--model-version", model_version, *capture,
    ]  # fmt: skip


def start(model: ServedModel, cfg: ServeConfig, backend: str, key: str, *, port: int, log_dir: Path, cwd: Path = Path("."), model_version: str = "") -> Server:
    """Start backend + proxy, wait for /health and start supervising; on any failure both are stopped before the error propagates.
    `model_version` (the registry version served, "" for a local directory) goes into captured requests (serve.capture)."""
    public_port = port or free_port()
    socket_dir = Path(tempfile.mkdtemp(prefix="llmops-serve-"))  # mode 0700, this user's
    uds = socket_dir / BACKEND_SOCKET
    cwd = Path(cwd).resolve()
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    try:
        command = backend_command(backend, model, cfg, uds)
        launches = [
            Launch("backend", command, log_dir / "backend.log", _backend_env(backend, key, log_dir / "hf-cache"), cwd, umask=BACKEND_UMASK),
            Launch("proxy", proxy_command(backend, model, cfg, uds, public_port, root=cwd, model_version=model_version), log_dir / "proxy.log", os.environ | {API_KEY_ENV: key}, cwd),
        ]
    except BaseException:
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    for launch in launches:
        launch.log.unlink(missing_ok=True)
    server = Server(url=f"http://{host}:{public_port}", model=model, backend=backend, command=command, log_dir=log_dir, socket_dir=socket_dir, api_key=key, launches=launches)
    try:
        for launch in launches:
            server.processes.append(_spawn(launch))
        server.health_wait_s = wait_healthy(server, cfg.health_timeout_s)
    except BaseException:
        server.stop()
        raise
    server.supervise(cfg)
    return server


@contextmanager
def serving(model: ServedModel, cfg: ServeConfig, backend: str, key: str, *, port: int = 0, log_dir: Path, cwd: Path = Path("."), model_version: str = "") -> Iterator[Server]:
    """A healthy server for the `with` block, stopped (with all its processes) however the block ends."""
    server = start(model, cfg, backend, key, port=port, log_dir=log_dir, cwd=cwd, model_version=model_version)
    try:
        yield server
    finally:
        server.stop()
