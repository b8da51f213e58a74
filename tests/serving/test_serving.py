"""Serving on CPU for real: transformers serve behind the key-checking proxy, the openai client, the deploy flow and its alias."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from llmops.params.load import load_params
from llmops.common.errors import ServeError
from llmops.serving.backends import inspect_model
from llmops.serving.probes import load_test, smoke_test
from llmops.serving.server import Server, serving, start

from ..helpers import BIN
from .conftest import API_KEY, write_project

from ..conftest import store_of

pytestmark = pytest.mark.integration


def server_processes_left(model_dir: Path) -> list[str]:
    """Command lines of live processes serving `model_dir`: the backend, and the proxy (its --model names the path)."""
    left = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(model_dir) in cmdline:
            left.append(cmdline)
    return left


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_model) -> Iterator[Path]:
    """A project directory the test runs in (the registry and MLflow paths are relative to it), with this test's API key."""
    root = write_project(tmp_path_factory.mktemp("project"))
    saved = {k: os.environ.get(k) for k in ("LLMOPS_API_KEY", "MLFLOW_TRACKING_URI", "PREFECT_HOME")}
    os.environ["LLMOPS_API_KEY"] = API_KEY
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def server(project, micro_model) -> Iterator[Server]:
    """One transformers-backend server for the module, on a free port."""
    cfg = load_params(project / "params.yaml").serve
    with serving(inspect_model(micro_model, "micro"), cfg, "transformers", API_KEY, log_dir=project / "logs") as running:
        yield running
    assert server_processes_left(micro_model) == [], "the server's processes outlived it"


def test_health_is_open_and_every_other_route_needs_the_key(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/reset")):
        body = {"model": "micro", "prompt": "x", "max_tokens": 1} if method == "POST" else None
        assert httpx.request(method, server.url + path, json=body).status_code == 401, f"{path} without a key"
        wrong = httpx.request(method, server.url + path, json=body, headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401, f"{path} with a wrong key"
        assert wrong.headers["www-authenticate"] == "Bearer"


def test_openai_client_lists_completes_and_chats(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["micro"]
    latencies = smoke_test(server.openai_base_url, API_KEY, "micro", max_tokens=4, timeout_s=120)
    assert latencies["completion_latency_s"] > 0 and latencies["chat_latency_s"] > 0
    completion = client.completions.create(model="micro", prompt="def f(x):", max_tokens=5, temperature=0.0)
    assert completion.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices), "no streamed text"


def test_load_test_with_8_concurrent_clients_has_no_errors(server):
    result = load_test(server.openai_base_url, API_KEY, "micro", clients=8, requests=16, max_tokens=8, timeout_s=120)
    assert result["errors"] == 0, result["first_errors"]
    assert result["requests"] == 16
    assert result["completion_tokens"] == 16 * 8
    assert 0 < result["ttft_p50_s"] <= result["latency_p50_s"] <= result["latency_p95_s"]
    assert result["tokens_per_s"] > 0


def test_a_wrong_key_fails_the_smoke_test_with_the_reason(server):
    with pytest.raises(ServeError, match="AuthenticationError"):
        smoke_test(server.openai_base_url, "not-the-key", "micro", max_tokens=2, timeout_s=30)


def healthy(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def completes(server: Server) -> bool:
    answer = httpx.post(f"{server.url}/v1/completions", json={"model": "micro", "prompt": "def f(x):", "max_tokens": 3}, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    return answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_a_killed_backend_is_restarted_and_serves_again(server):
    before, killed = len(server.restarts), server.processes[0].pid
    os.killpg(killed, signal.SIGKILL)

    assert wait_for(lambda: server.processes[0].pid != killed and healthy(server), 120), server.restarts
    assert server.restarts[before:] == ["backend: the backend process exited with code -9"]
    assert server.running() and completes(server)


def test_a_backend_whose_generation_worker_died_shows_unhealthy_and_is_restarted(server):
    """The serving user can open the backend's socket: the over-long prompt the proxy refuses, sent there, kills the batching worker."""
    before, stricken = len(server.restarts), server.processes[0].pid
    def on_backend(method: str, path: str, **kwargs) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(server.backend_socket)), base_url="http://backend", timeout=60) as backend:
            return backend.request(method, path, **kwargs)

    assert on_backend("POST", "/v1/completions", json={"model": str(server.model.path), "prompt": "x = 1\n" * 15_000, "max_tokens": 5}).status_code >= 500
    assert on_backend("GET", "/health").status_code == 503  # the process lives on, its worker does not

    assert wait_for(lambda: not healthy(server), 30), "/health kept saying ok"
    anonymous = httpx.get(f"{server.url}/health", timeout=60).json()
    assert anonymous.get("status") in ("unhealthy", "unavailable") and "detail" not in anonymous  # what the backend said is for the key holder
    assert wait_for(lambda: server.processes[0].pid != stricken and healthy(server), 120), server.restarts
    assert len(server.restarts) == before + 1 and "/health answered 503" in server.restarts[-1]
    assert completes(server)


def test_restarts_are_bounded_then_the_server_stops(project, micro_model):
    model_dir = shutil.copytree(micro_model, project / "bounded-model")
    cfg = load_params(project / "params.yaml").serve.model_copy(update={"max_restarts": 1})
    server = start(inspect_model(model_dir, "micro"), cfg, "transformers", API_KEY, port=0, log_dir=project / "logs-bounded")
    try:
        first = server.processes[0].pid
        os.killpg(first, signal.SIGKILL)
        assert wait_for(lambda: server.processes[0].pid != first and healthy(server), 120), server.restarts
        os.killpg(server.processes[0].pid, signal.SIGKILL)

        assert wait_for(lambda: not server.running(), 60), "the server kept running past serve.max_restarts"
        assert "serve.max_restarts" in server.failure and len(server.restarts) == 1
        assert server_processes_left(model_dir) == [] and not server.socket_dir.exists()
    finally:
        server.stop()


def test_health_timeout_stops_the_server_and_says_why(project, micro_model):
    model_dir = shutil.copytree(micro_model, project / "timeout-model")  # its own path, to find its processes by
    cfg = load_params(project / "params.yaml").serve.model_copy(update={"health_timeout_s": 1.0})
    with pytest.raises(ServeError, match=r"did not answer 200 within 1 s"):
        start(inspect_model(model_dir, "micro-timeout"), cfg, "transformers", API_KEY, port=0, log_dir=project / "logs-timeout")
    assert server_processes_left(model_dir) == []


def _register(project: Path, model_dir: Path) -> str:
    import mlflow

    from llmops.common.tracking import setup
    from llmops.registry.store import log_version

    params = load_params(project / "params.yaml")
    with mlflow.start_run(experiment_id=setup(params.tracking, project), run_name="register-test"):
        return str(log_version(params.register.model_name, model_dir, store_of(params), tags={"llmops.test": "1"}, flavor=False).version)


def lineage(project: Path, spec: str) -> dict:
    import json

    out = subprocess.run([str(BIN / "llmops"), "lineage", spec, "--json"], cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def llmops_deploy(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`llmops deploy` as a user runs it, in the project directory (the key comes from $LLMOPS_API_KEY)."""
    return subprocess.run([str(BIN / "llmops"), "deploy", *args], cwd=project, capture_output=True, text=True, timeout=600)


def test_deploy_flow_serves_tests_and_promotes_the_champion(project, micro_model):
    import mlflow

    from llmops.registry.store import alias_version, set_alias

    params = load_params(project / "params.yaml")
    name = params.register.model_name
    version = _register(project, micro_model)
    set_alias(name, "champion", version, store_of(params))

    out = llmops_deploy(project)

    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"production -> {name} v{version}" in out.stderr
    assert alias_version(name, "production", store_of(params)) == version
    (run,) = mlflow.search_runs(experiment_names=[params.tracking.experiment], filter_string=f"tags.`llmops.model_version` = '{version}'", output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.tags["llmops.model_name"] == name and run.data.tags["llmops.model_version"] == version
    assert run.data.tags["llmops.deploy.status"] == "promoted"
    for metric in ("load.latency_p50_s", "load.latency_p95_s", "load.ttft_p50_s", "load.tokens_per_s", "load.errors", "smoke.chat_latency_s", "health_wait_s"):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["load.errors"] == 0 and run.data.metrics["load.requests"] == 16
    recorded = " ".join([*run.data.params.values(), *run.data.tags.values()])
    assert API_KEY not in recorded, "the API key reached MLflow"
    assert "load test" in out.stderr and API_KEY not in out.stdout + out.stderr, "the API key was printed"
    assert server_processes_left(project / params.paths.registry) == []
    chain = lineage(project, f"{name}@{version}")
    assert chain["deploy_run"]["run_id"] == run.info.run_id and chain["deploy_run"]["status"] == "FINISHED"
    assert chain["endpoint"] is None, "the deploy stopped its server: nothing serves the version now"


def test_failed_health_check_leaves_production_untouched(project, micro_model):
    import mlflow

    from llmops.registry.store import alias_version, set_alias

    params = load_params(project / "params.yaml")
    name = params.register.model_name
    good = _register(project, micro_model)
    set_alias(name, "production", good, store_of(params))
    broken = project / "broken-model"
    shutil.copytree(micro_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # the backend process dies loading it
    bad = _register(project, broken)

    out = llmops_deploy(project, "--model", f"{name}@{bad}")

    assert out.returncode == 1 and "backend process exited" in out.stderr, out.stderr[-5000:]

    assert alias_version(name, "production", store_of(params)) == good
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], filter_string=f"tags.`llmops.model_version` = '{bad}'", output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "backend process exited" in runs[0].data.tags["llmops.deploy.failure"]
    assert server_processes_left(project / params.paths.registry) == []


def test_llmops_serve_of_a_registered_version_shows_in_its_lineage_while_it_serves(project, micro_model):
    import signal

    from llmops.serving.server import free_port

    name = load_params(project / "params.yaml").register.model_name
    version = _register(project, shutil.copytree(micro_model, project / "lineage-model"))
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "llmops"), "serve", "--model", f"{name}@{version}", "--backend", "transformers", "--port", str(port)],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if "serving " in line:
                break
        serving = lineage(project, f"{name}@{version}")["endpoint"]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert serving == {"url": f"http://127.0.0.1:{port}", "status": "answering /health"}
    assert lineage(project, f"{name}@{version}")["endpoint"] is None, "a stopped server takes its endpoint out of the lineage"


def test_llmops_serve_runs_until_sigterm_and_leaves_no_process(project, micro_model):
    import signal

    from llmops.serving.server import free_port

    model_dir = shutil.copytree(micro_model, project / "cli-model")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "llmops"), "serve", "--model", str(model_dir), "--backend", "transformers", "--port", str(port)],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        printed = []
        for line in proc.stdout:  # the CLI prints "serving ... at" once its servers answer; it exits (ending this) on failure
            printed.append(line)
            if "serving cli-model at" in line:
                break
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert [m["id"] for m in models["data"]] == ["cli-model"]
        proc.send_signal(signal.SIGTERM)  # to the CLI only: it must stop the backend and proxy it started
        rest, _ = proc.communicate(timeout=60)
        output = "".join(printed) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "serving cli-model at" in output and API_KEY not in output
    assert server_processes_left(model_dir) == []
