"""Real servers for the integration tests: PostgreSQL-backed `mlflow server` and `prefect server`, a process work pool and a worker.

Each server gets a database of its own (created here, dropped afterwards), free ports, and its own
PREFECT_HOME; every process starts in a session of its own so teardown stops it and its children.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from ..helpers import BIN, free_port, stop_process_tree

POSTGRES_URL_ENV = "LLMOPS_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SERVER_START_TIMEOUT_S = 180


def with_database(url: str, database: str, driver: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((f"postgresql+{driver}", parts.netloc, f"/{database}", parts.query, ""))


def poll(check: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Call `check` until it returns something truthy; fail with `what` after `timeout_s` or when `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s\n{tail(log)}")
        time.sleep(interval_s)


def tail(log: Path | None, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else ""


def http_json(url: str, payload: dict | None = None, timeout_s: float = 10) -> dict | None:
    """GET (or POST `payload` to) a JSON endpoint; None while the server is not answering yet."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"null")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@dataclass
class Stack:
    """The running servers and the environment that points a client at them."""

    root: Path
    env: dict[str, str]
    mlflow_uri: str
    prefect_api: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, cmd: list, cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(c) for c in cmd], cwd=cwd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(proc)
        return proc, log

    def prefect(self, *args, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        from ..helpers import sh

        return sh(BIN / "prefect", "--no-prompt", *args, cwd=cwd, env=self.env, check=check, timeout=timeout)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The PostgreSQL server to put the test databases on; skip (loudly) when it cannot be reached."""
    import psycopg

    url = os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as exc:
        pytest.skip(f"integration tests need PostgreSQL at {url} (set {POSTGRES_URL_ENV}); it cannot be reached: {exc}")
    yield url


@pytest.fixture(scope="session")
def databases(postgres_url) -> Iterator[dict[str, str]]:
    """Two fresh databases, one per server, dropped at the end even when a test failed."""
    import psycopg

    names = {server: f"llmops_it_{uuid.uuid4().hex[:10]}_{server}" for server in ("mlflow", "prefect")}
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield names
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def stack(tmp_path_factory, postgres_url, databases) -> Iterator[Stack]:
    """`mlflow server` (artifacts served from a temp dir) and `prefect server`, both on PostgreSQL, started side by side."""
    from ..helpers import subprocess_env

    root = tmp_path_factory.mktemp("servers")
    mlflow_port, prefect_port = free_port(), free_port()
    env = subprocess_env(root) | {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
    }
    stack = Stack(root=root, env=env, mlflow_uri=env["MLFLOW_TRACKING_URI"], prefect_api=env["PREFECT_API_URL"])
    try:
        mlflow_proc, mlflow_log = stack.start(
            "mlflow-server",
            [BIN / "mlflow", "server", "--backend-store-uri", with_database(postgres_url, databases["mlflow"], "psycopg"),
             "--artifacts-destination", root / "mlflow-artifacts", "--serve-artifacts",
             "--host", "127.0.0.1", "--port", mlflow_port, "--workers", "1"],
            cwd=root,
        )
        server_env = env | {
            "PREFECT_API_DATABASE_CONNECTION_URL": with_database(postgres_url, databases["prefect"], "asyncpg"),
            "PREFECT_UI_ENABLED": "false",
        }
        prefect_proc, prefect_log = stack.start(
            "prefect-server", [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", prefect_port], cwd=root, env=server_env
        )
        poll(lambda: _answers(f"{stack.mlflow_uri}/health"),
             SERVER_START_TIMEOUT_S, "mlflow server did not answer /health", proc=mlflow_proc, log=mlflow_log)
        poll(lambda: http_json(f"{stack.prefect_api}/health") is True,
             SERVER_START_TIMEOUT_S, "prefect server did not answer /api/health", proc=prefect_proc, log=prefect_log)
        yield stack
    finally:
        for proc in reversed(stack.processes):
            stop_process_tree(proc)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
