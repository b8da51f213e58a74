"""Hostile clients against one real server (transformers backend behind the proxy): every attack fails, and the server ends healthy.

The served micro model has a 4,096-token context and a KV cache of 8 blocks x 256 = 2,048 tokens, so a prompt can
be too long for the cache and not for the context; clients get 2 s to send a request head, and 2 s for a body.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from llmops.params.load import load_params
from llmops.serving.backends import inspect_model
from llmops.serving.server import Server, serving

from ..helpers import ROOT
from .conftest import API_KEY

pytestmark = pytest.mark.integration

CONTEXT_TOKENS = 4096
KV_BLOCKS, BLOCK_TOKENS = 8, 256
CLIENT_TIMEOUT_S = 2.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NORMAL = {"model": "micro", "prompt": 'def add(a, b):\n    """Return the sum."""\n', "max_tokens": 8}
LINE = "x = 1\n"  # 5 tokens of the micro BPE


class Hostile(NamedTuple):
    server: Server
    baseline: dict[str, Any]  # the normal completion, answered before any attack


@pytest.fixture(scope="module")
def hostile(micro_model, tmp_path_factory) -> Iterator[Hostile]:
    model = Path(shutil.copytree(micro_model, tmp_path_factory.mktemp("hostile") / "micro-4k"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT_TOKENS}))
    cfg = load_params(ROOT / "params.yaml").serve.model_copy(
        update={"port": 0, "cb_num_blocks": KV_BLOCKS, "cb_block_size": BLOCK_TOKENS, "client_timeout_s": CLIENT_TIMEOUT_S, "supervise_interval_s": 1.0, "health_timeout_s": 180}
    )
    with serving(inspect_model(model, "micro"), cfg, "transformers", API_KEY, log_dir=model.parent / "logs") as server:
        baseline = httpx.post(f"{server.url}/v1/completions", json=NORMAL, headers=AUTH, timeout=60)
        assert baseline.status_code == 200, baseline.text
        yield Hostile(server, baseline.json())


def post(server: Server, path: str, payload: Any, timeout_s: float = 60) -> httpx.Response:
    return httpx.post(server.url + path, json=payload, headers=AUTH, timeout=timeout_s)


def raw_status(server: Server, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> int:
    """The status line's code for a request sent exactly as written (httpx would normalise the path before sending)."""
    import http.client

    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def connect(server: Server) -> socket.socket:
    url = urlsplit(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def seconds_until_closed(sock: socket.socket, limit_s: float, trickle: Callable[[], bytes] | None = None) -> tuple[float, bytes]:
    """Send `trickle()` every 0.5 s (if given) until the server closes the connection; (seconds it took, what it answered)."""
    start, answer = time.monotonic(), b""
    while time.monotonic() - start < limit_s:
        readable, _, _ = select.select([sock], [], [], 0.5)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionError:
                return time.monotonic() - start, answer
            if not chunk:
                return time.monotonic() - start, answer
            answer += chunk
        elif trickle is not None:
            try:
                sock.sendall(trickle())
            except ConnectionError:
                return time.monotonic() - start, answer
    return float("inf"), answer


def in_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_only_the_public_port_listens_and_the_backend_socket_is_the_serving_users_alone(hostile):
    server = hostile.server
    tree = [psutil.Process(p.pid) for p in server.processes]
    tree += [child for proc in list(tree) for child in proc.children(recursive=True)]
    listening = {c.laddr.port for proc in tree for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {urlsplit(server.url).port}, "a TCP port besides the public one is open"

    sock, directory = server.backend_socket.stat(), server.socket_dir.stat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(directory.st_mode) == 0o700 and sock.st_uid == directory.st_uid == os.geteuid()
    if os.geteuid() == 0:  # root can become another user: one who finds the socket cannot open it
        assert connect_as_other_user(server.backend_socket) == "denied"


def connect_as_other_user(path: Path, uid: int = 65534) -> str:
    """Connect to the Unix socket `path` from a child process running as `uid` (nobody): connected | denied."""
    pid = os.fork()
    if pid == 0:  # the child: drop to `uid`, try, report through the exit code, never return into pytest
        code = 3
        try:
            os.setgid(uid)
            os.setuid(uid)
            socket.socket(socket.AF_UNIX).connect(str(path))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 1: "denied"}.get(os.waitstatus_to_exitcode(status), "failed")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-the-key"}, {"Authorization": f"Bearer {API_KEY[:-1]}"}, {"Authorization": API_KEY}, {"X-Api-Key": API_KEY}],
    ids=["none", "wrong", "prefix", "no-scheme", "other-header"],
)
def test_without_the_key_no_route_answers(hostile, headers):
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/responses", "/reset", "/load_model", "/docs", "/openapi.json", "/v1/../reset", f"/v1/completions?api_key={API_KEY}"]
    body = json.dumps(NORMAL).encode()
    statuses = {path: raw_status(hostile.server, "POST", path, headers | {"Content-Type": "application/json"}, body) for path in paths}
    assert set(statuses.values()) == {401}, statuses


def test_path_tricks_reach_no_route_but_the_openai_ones(hostile):
    variants = [
        "/reset", "/load_model", "/docs", "/v1/responses", "/v1/../reset", "/v1/%2e%2e/reset", "/v1/%2E%2E/load_model", "/v1/..%2freset", "/v1/..%2Freset", "/v1/%252e%252e/reset",
        "/v1/..%252freset", "/v1\\..\\reset", "/v1/%5c..%5creset", "/v1/completions/../../reset", "/v1/./../reset",
        "/v1/completions%2f..%2f..%2freset", "//reset", "/v1/completions/", "/V1/completions", "/v1/completions;/../../reset",
    ]  # fmt: skip
    body = json.dumps(NORMAL).encode()
    statuses = {path: raw_status(hostile.server, "POST", path, AUTH | {"Content-Type": "application/json"}, body) for path in variants}
    assert all(status in (400, 404) for status in statuses.values()), statuses


def test_a_50_mb_body_is_refused_before_it_is_read(hostile):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
    declared = connect(hostile.server)
    declared.sendall((head + f"Content-Length: {50 * 2**20}\r\n\r\n").encode() + b'{"prompt": "' + b"x" * 65536)
    _, answer = seconds_until_closed(declared, 10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    chunked = connect(hostile.server)
    chunked.settimeout(5)
    chunked.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
    chunk, sent = b"%x\r\n" % 2**20 + b"x" * 2**20 + b"\r\n", 0
    try:
        for _ in range(50):
            chunked.sendall(chunk)
            sent += 2**20
    except (ConnectionError, TimeoutError):
        pass
    assert sent < 50 * 2**20, "the proxy took in the whole 50 MB body"


def test_prompts_longer_than_the_context_or_the_kv_cache_are_refused_naming_the_limit(hostile):
    server = hostile.server
    cases = {
        "87 KB": ({"model": "micro", "prompt": LINE * 14_500, "max_tokens": 5}, "/v1/completions", "context 4096"),
        "over the KV cache": ({"model": "micro", "prompt": LINE * 600, "max_tokens": 5}, "/v1/completions", "KV cache 2048"),
        "chat": ({"model": "micro", "messages": [{"role": "user", "content": LINE * 1000}], "max_tokens": 5}, "/v1/chat/completions", "KV cache 2048"),
    }
    answers = dict(zip(cases, in_parallel([lambda c=case: post(server, c[1], c[0]) for case in cases.values()]), strict=True))
    for name, (_, _, limit) in cases.items():
        assert answers[name].status_code == 400, f"{name}: {answers[name].status_code} {answers[name].text[:300]}"
        error = answers[name].json()["error"]
        assert error["code"] == "context_length_exceeded" and limit in error["message"], name


def test_absurd_max_tokens_n_and_best_of_are_refused(hostile):
    payloads = {"max_tokens": NORMAL | {"max_tokens": 10**9}, "n": NORMAL | {"n": 10**6}, "best_of": NORMAL | {"best_of": 10**6}}
    answers = in_parallel([lambda p=p: post(hostile.server, "/v1/completions", p, timeout_s=30) for p in payloads.values()])
    for field_name, answer in zip(payloads, answers, strict=True):
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field_name, f"{field_name}: {answer.status_code} {answer.text[:300]}"


def test_wrong_types_get_a_400_naming_the_field(hostile):
    chat = {"model": "micro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("/v1/completions", NORMAL | {"prompt": 123}, "prompt"), ("/v1/completions", NORMAL | {"prompt": {"a": 1}}, "prompt"),
        ("/v1/completions", NORMAL | {"max_tokens": "5"}, "max_tokens"), ("/v1/completions", NORMAL | {"max_tokens": True}, "max_tokens"),
        ("/v1/completions", NORMAL | {"stream": "yes"}, "stream"), ("/v1/completions", NORMAL | {"temperature": "hot"}, "temperature"),
        ("/v1/completions", NORMAL | {"model": ["micro"]}, "model"), ("/v1/completions", NORMAL | {"stop": {"a": 1}}, "stop"),
        ("/v1/chat/completions", chat | {"messages": "hi"}, "messages"), ("/v1/chat/completions", chat | {"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ("/v1/chat/completions", chat | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, "messages[0].content"),
        ("/v1/completions", NORMAL | {"generation_config": json.dumps({"max_new_tokens": 10**6})}, "generation_config"),
    ]  # fmt: skip
    answers = in_parallel([lambda c=case: post(hostile.server, c[0], c[1], timeout_s=30) for case in cases])
    for (path, _, field_name), answer in zip(cases, answers, strict=True):
        assert answer.status_code == 400, f"{path} {field_name}: {answer.status_code} {answer.text[:300]}"
        assert answer.json()["error"]["param"] == field_name, answer.text[:300]


def test_an_unknown_model_is_a_404(hostile):
    answer = post(hostile.server, "/v1/completions", NORMAL | {"model": "../../etc/passwd"}, timeout_s=30)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", answer.text[:300]


def test_malformed_and_deeply_nested_json_gets_a_400(hostile):
    bodies = {
        "malformed": (b'{"model": "micro", "prompt": ', "invalid_json"),
        "not an object": (b'["micro"]', "invalid_json"),
        "10**5 nested arrays": (b'{"model": "micro", "prompt": ' + b"[" * 10**5 + b"]" * 10**5 + b"}", "json_too_deep"),
        "10**5 nested objects": (b'{"a":' * 10**5 + b"1" + b"}" * 10**5, "json_too_deep"),
    }
    for name, (body, code) in bodies.items():
        answer = httpx.post(f"{hostile.server.url}/v1/completions", content=body, headers=AUTH | {"Content-Type": "application/json"}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == code, f"{name}: {answer.status_code} {answer.text[:200]}"


def test_slow_and_idle_clients_are_cut_off(hostile):
    server, limit_s = hostile.server, CLIENT_TIMEOUT_S + 2.5

    def idle() -> float:
        return seconds_until_closed(connect(server), 12)[0]

    def slow_head() -> float:
        sock = connect(server)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        return seconds_until_closed(sock, 12, trickle=lambda: b"a")[0]

    def slow_body() -> float:
        sock = connect(server)
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 200\r\n\r\n{{".encode())
        took, answer = seconds_until_closed(sock, 12, trickle=lambda: b" ")
        assert answer.startswith(b"HTTP/1.1 408") or not answer, answer[:200]
        return took

    took = dict(zip(("idle", "slow head", "slow body"), in_parallel([idle, slow_head, slow_body]), strict=True))
    assert all(seconds <= limit_s for seconds in took.values()), took


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def test_a_client_leaving_mid_stream_stops_its_generation(hostile):
    server = hostile.server
    backend = psutil.Process(server.processes[0].pid)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"model": "micro", "prompt": "def f(x):", "max_tokens": 2000, "stream": True}, headers=AUTH, timeout=30) as streamed:
        assert streamed.status_code == 200
        assert next(streamed.iter_raw())  # generation has started; leaving the block drops the connection
    time.sleep(0.5)
    before = cpu_seconds(backend)
    time.sleep(1.5)
    assert cpu_seconds(backend) - before < 0.4, "the backend kept generating for a client that left"

    # The departed request's KV blocks were given back: a request needing all 8 blocks (1,900 + 8 tokens) is served.
    answer = post(server, "/v1/completions", {"model": "micro", "prompt": LINE * 380, "max_tokens": 8})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8, answer.text[:300]


def test_requests_that_together_overflow_the_kv_cache_all_complete(hostile):
    """Each needs 4 of the 8 blocks (800 + 100 tokens): the proxy admits two at a time, so the backend never evicts one to make room."""
    answers = in_parallel([lambda i=i: post(hostile.server, "/v1/completions", {"model": "micro", "prompt": f"{i}{LINE * 160}", "max_tokens": 100}, timeout_s=90) for i in range(8)])
    assert [a.status_code for a in answers] == [200] * 8, [a.text[:200] for a in answers if a.status_code != 200]
    assert [a.json()["usage"]["completion_tokens"] for a in answers] == [100] * 8


def test_after_every_attack_the_server_is_healthy_and_answers_as_before(hostile):
    server = hostile.server
    health = httpx.get(f"{server.url}/health", timeout=60)
    assert health.status_code == 200, health.text
    assert server.restarts == [] and server.running(), server.restarts
    again = post(server, "/v1/completions", NORMAL).json()
    assert again["choices"][0]["text"] == hostile.baseline["choices"][0]["text"]
    assert again["usage"]["completion_tokens"] == NORMAL["max_tokens"]
