"""Start and stop the real stack (no pytest here, so the orchestration benchmark uses it too).

PostgreSQL-backed `mlflow server` (artifacts served from a directory) and `prefect server`, each on a
database of its own made here and dropped afterwards, on free ports, with their own PREFECT_HOME; a
process work pool and its workers; deployments run and polled through the Prefect REST API. Every
process starts in a session of its own, and `Stack.stop` stops each one with all its descendants.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..helpers import BIN, free_port, sh, stop_process_tree, subprocess_env

POSTGRES_URL_ENV = "LLMOPS_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SERVER_START_TIMEOUT_S = 180
POOL = "llmops-process"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class NotReady(AssertionError):
    """Something polled for did not happen in time (an AssertionError, so a test reports it as a failure)."""


def postgres_url() -> str:
    return os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)


def postgres_unreachable(url: str) -> str | None:
    """Why PostgreSQL at `url` cannot be used, or None when it answers."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as exc:
        return str(exc).strip()
    return None


def with_database(url: str, database: str, driver: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((f"postgresql+{driver}", parts.netloc, f"/{database}", parts.query, ""))


@contextmanager
def databases(url: str, servers: tuple[str, ...] = ("mlflow", "prefect")) -> Iterator[dict[str, str]]:
    """A fresh database per server, dropped on exit even after a failure."""
    import psycopg

    names = {server: f"llmops_it_{uuid.uuid4().hex[:10]}_{server}" for server in servers}
    with psycopg.connect(url, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield names
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tail(log: Path | None, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else ""


def poll(check: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Call `check` until it returns something truthy and return that; raise NotReady after `timeout_s` or when `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise NotReady(f"{what}: the process exited with {proc.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            raise NotReady(f"{what}: not within {timeout_s:.0f} s\n{tail(log)}")
        time.sleep(interval_s)


def http_json(url: str, payload: dict | None = None, timeout_s: float = 10, method: str | None = None):
    """GET (or POST `payload` to, or `method`) a JSON endpoint; None while the server does not answer."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"null")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path


@dataclass
class Stack:
    """The running servers, the environment that points clients at them, and every process started for them."""

    root: Path
    env: dict[str, str]
    mlflow_uri: str
    prefect_api: str
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, cmd: list, cwd: Path, env: dict[str, str] | None = None) -> Process:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(c) for c in cmd], cwd=cwd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(Process(proc, log))
        return self.processes[-1]

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process_tree(process.proc)

    def prefect(self, *args, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return sh(BIN / "prefect", "--no-prompt", *args, cwd=cwd, env=self.env, check=check, timeout=timeout)

    def start_worker(self, repo: Path, pool: str = POOL) -> Process:
        """`prefect worker start` on `pool`, polling for work every second (the default is 10 s)."""
        env = self.env | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
        return self.start("worker", [BIN / "prefect", "worker", "start", "--pool", pool, "--type", "process"], cwd=repo, env=env)

    def run_deployment(self, repo: Path, deployment: str, **parameters) -> str:
        """`prefect deployment run` with parameters (JSON values); returns the flow run id."""
        args = [f"--param={key}={json.dumps(value)}" for key, value in parameters.items()]
        out = self.prefect("deployment", "run", deployment, *args, cwd=repo)
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout)
        if not match:
            raise NotReady(f"no flow run id in `prefect deployment run` output:\n{out.stdout}")
        return match.group(1)

    def flow_run(self, run_id: str) -> dict:
        return http_json(f"{self.prefect_api}/flow_runs/{run_id}") or {}

    def wait_for_end(self, run_id: str, timeout_s: float, worker: Process | None = None) -> dict:
        """Poll the Prefect API until the flow run reaches a terminal state; return the flow run."""

        def ended():
            run = self.flow_run(run_id)
            return run if run.get("state_type") in TERMINAL_STATES else None

        return poll(ended, timeout_s, f"flow run {run_id} did not end", log=worker.log if worker else None)


@contextmanager
def running_stack(root: Path, url: str) -> Iterator[Stack]:
    """`mlflow server` and `prefect server` on PostgreSQL, started side by side; stopped (and their databases dropped) on exit."""
    with databases(url) as names:
        mlflow_port, prefect_port = free_port(), free_port()
        env = subprocess_env(root) | {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        }
        stack = Stack(root=root, env=env, mlflow_uri=env["MLFLOW_TRACKING_URI"], prefect_api=env["PREFECT_API_URL"])
        try:
            mlflow = stack.start(
                "mlflow-server",
                [BIN / "mlflow", "server", "--backend-store-uri", with_database(url, names["mlflow"], "psycopg"),
                 "--artifacts-destination", root / "mlflow-artifacts", "--serve-artifacts",
                 "--host", "127.0.0.1", "--port", mlflow_port, "--workers", "1"],
                cwd=root,
            )
            server_env = env | {"PREFECT_API_DATABASE_CONNECTION_URL": with_database(url, names["prefect"], "asyncpg"), "PREFECT_UI_ENABLED": "false"}
            prefect = stack.start("prefect-server", [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", prefect_port], cwd=root, env=server_env)
            poll(lambda: answers(f"{stack.mlflow_uri}/health"), SERVER_START_TIMEOUT_S, "mlflow server did not answer /health", proc=mlflow.proc, log=mlflow.log)
            poll(lambda: http_json(f"{stack.prefect_api}/health") is True, SERVER_START_TIMEOUT_S, "prefect server did not answer /api/health", proc=prefect.proc, log=prefect.log)
            yield stack
        finally:
            stack.stop()
