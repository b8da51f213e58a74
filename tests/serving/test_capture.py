"""Request capture (serve.capture): the requests a served model receives become JSONL batches the monitor reads, holding
exactly those prompts, redacted, rotated and published atomically, and never the key or a header."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmops.data.sources import IngestStats, read_jsonl
from llmops.params.ingest import IngestConfig
from llmops.params.load import load_params
from llmops.params.serve import DEFAULT_CAPTURE_REDACT
from llmops.serving.backends import inspect_model
from llmops.serving.capture import REDACTED, CaptureSettings, CaptureWriter, Redactor, prompt_text
from llmops.serving.server import serving

from .conftest import API_KEY, write_project

PROMPTS = [f"def function_{i}(values):\n    return sorted(values)[{i}]" for i in range(6)]
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a string."}]
SECRET_PROMPT = "# contact alice.smith@example.com\nOPENAI_API_KEY = 'sk-proj-A1b2C3d4E5f6G7h8I9j0'\nimport os"
HEADER_VALUE = "trace-5c1d7e9a"  # sent in a header of every request: it must not reach any batch
RECORD_FIELDS = {"text", "id", "time", "model", "model_version", "route", "status", "refused", "tokens_in", "tokens_out", "latency_s", "ttft_s"}


def record(text: str) -> dict:
    return {"text": text, "id": "req-1", "route": "/v1/completions", "status": 200}


def published(directory: Path) -> list[Path]:
    return sorted(directory.glob("capture-*.jsonl"))


@pytest.mark.unit
def test_default_redaction_replaces_emails_and_key_like_strings_and_keeps_code():
    text = (
        "send to bob.jones+ci@mail.example.co.uk\nkey = 'sk-ant-api03-AbCdEfGhIjKlMnOp'\naws = 'AKIAIOSFODNN7EXAMPLE'\n"
        "secret = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'\nsha = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'\n"
        "def a_rather_long_function_name_that_is_plain_python_code(x): return x"
    )
    redacted = Redactor(DEFAULT_CAPTURE_REDACT)(text)
    for secret in ("bob.jones", "example.co.uk", "sk-ant", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "e3b0c44298fc"):
        assert secret not in redacted
    assert redacted.count(REDACTED) == 5
    assert "def a_rather_long_function_name_that_is_plain_python_code(x): return x" in redacted


@pytest.mark.unit
def test_prompt_text_joins_chat_contents_and_several_prompts_with_newlines():
    assert prompt_text("v1/chat/completions", {"messages": [*CHAT, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}) == (
        "You write Python.\nReverse a string.\na b"
    )
    assert prompt_text("v1/completions", {"prompt": ["x = 1", "y = 2"]}) == "x = 1\ny = 2"
    assert prompt_text("v1/completions", {"prompt": [5, 6]}, decode=lambda ids: f"<{len(ids)} ids>") == "<2 ids>"
    assert prompt_text("v1/embeddings", {"input": "text"}) == "text"
    assert prompt_text("v1/completions", {"prompt": {"not": "a prompt"}}) == ""


@pytest.mark.unit
def test_sampling_takes_the_same_requests_under_the_same_seed(tmp_path):
    taken = []
    for run in range(2):
        writer = CaptureWriter(CaptureSettings(tmp_path / str(run), sample_rate=0.5, seed=3))
        writer.start()
        for i in range(200):
            writer.submit(record(f"prompt {i}"))
        writer.close()
        taken.append([json.loads(line)["text"] for path in writer.published for line in path.read_text().splitlines()])
    assert taken[0] == taken[1]
    assert 70 <= len(taken[0]) <= 130


@pytest.mark.unit
def test_the_batch_being_written_is_hidden_from_jsonl_globs_until_close_publishes_it(tmp_path):
    writer = CaptureWriter(CaptureSettings(tmp_path))
    writer.start()
    writer.submit(record("first"))
    deadline = time.monotonic() + 10
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    [part] = list(tmp_path.iterdir())
    assert part.name.startswith(".capture-") and part.name.endswith(".jsonl.part") and list(tmp_path.glob("*.jsonl")) == []
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == [part.name[1:].removesuffix(".part")]


@pytest.mark.unit
def test_a_batch_is_published_when_it_is_max_age_s_old_though_no_request_follows(tmp_path):
    writer = CaptureWriter(CaptureSettings(tmp_path, max_age_s=0.3))
    writer.start()
    try:
        writer.submit(record("only one"))
        deadline = time.monotonic() + 10
        while not published(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [json.loads(line)["text"] for line in published(tmp_path)[0].read_text().splitlines()] == ["only one"]
        assert list(tmp_path.glob(".*.part")) == []
    finally:
        writer.close()


@pytest.mark.unit
def test_rotation_by_size_gives_complete_batches_and_close_publishes_the_last(tmp_path):
    counted: list[str] = []
    writer = CaptureWriter(CaptureSettings(tmp_path, max_bytes=200), count=counted.append)
    writer.start()
    for i in range(10):
        writer.submit(record(f"prompt number {i} " + "x" * 60))
    writer.close()
    batches = published(tmp_path)
    assert len(batches) == 5 and sorted(tmp_path.iterdir()) == batches  # two ~140-byte records each; no .part left
    texts = [json.loads(line)["text"] for path in batches for line in path.read_text().splitlines()]
    assert [t.split()[2] for t in texts] == [str(i) for i in range(10)]
    assert counted == ["written"] * 10


@pytest.fixture(scope="module")
def captured(tmp_path_factory, micro_model) -> Iterator[dict]:
    """A served micro model with capture on (batches of ~2 records) receives the test's requests and is stopped; what
    the client saw and what is on disk afterwards."""
    from openai import OpenAI

    root = write_project(tmp_path_factory.mktemp("capture"), capture=True, capture_dir="incoming", capture_max_bytes=700)
    cfg = load_params(root / "params.yaml").serve
    seen: dict = {"usage": {}}
    with serving(inspect_model(micro_model, "micro"), cfg, "transformers", API_KEY, log_dir=root / "logs", cwd=root, model_version="7") as server:
        client = OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0, default_headers={"X-Trace": HEADER_VALUE})
        for prompt in PROMPTS:
            seen["usage"][prompt] = client.completions.create(model="micro", prompt=prompt, max_tokens=3).usage.completion_tokens
        chat = client.chat.completions.create(model="micro", messages=CHAT, max_tokens=3)
        seen["usage"]["\n".join(m["content"] for m in CHAT)] = chat.usage.completion_tokens
        chunks = list(client.completions.create(model="micro", prompt="import json", max_tokens=4, stream=True, stream_options={"include_usage": True}))
        seen["usage"]["import json"] = next(c.usage.completion_tokens for c in chunks if c.usage is not None)
        client.completions.create(model="micro", prompt=SECRET_PROMPT, max_tokens=2)
        headers = {"X-Trace": HEADER_VALUE}
        wrong_key = httpx.post(f"{server.url}/v1/completions", json={"model": "micro", "prompt": "UNAUTHORIZED PROMPT"}, headers=headers | {"Authorization": "Bearer wrong"})
        refused = httpx.post(
            f"{server.url}/v1/completions", json={"model": "micro", "prompt": "REFUSED PROMPT", "max_tokens": 10**6}, headers=headers | server.auth_headers
        )  # fmt: skip
        seen["statuses"] = (wrong_key.status_code, refused.status_code)
    directory = root / "incoming"
    batches = published(directory)
    seen["directory"], seen["batches"] = directory, batches
    seen["records"] = [json.loads(line) for path in batches for line in path.read_text().splitlines()]
    seen["bytes"] = b"".join(path.read_bytes() for path in batches)
    yield seen


@pytest.mark.integration
def test_the_batches_hold_exactly_the_prompts_the_openai_client_sent(captured):
    assert captured["statuses"] == (401, 400)
    answered = [r for r in captured["records"] if not r["refused"]]
    expected = [*PROMPTS, "\n".join(m["content"] for m in CHAT), "import json", Redactor(DEFAULT_CAPTURE_REDACT)(SECRET_PROMPT)]
    assert sorted(r["text"] for r in answered) == sorted(expected)
    assert all(set(r) == RECORD_FIELDS for r in captured["records"])
    assert len({r["id"] for r in captured["records"]}) == len(captured["records"])
    for r in answered:
        assert (r["status"], r["model"], r["model_version"]) == (200, "micro", "7")
        assert r["tokens_in"] > 0 and 0 < r["latency_s"]
        if r["text"] in captured["usage"]:
            assert r["tokens_out"] == captured["usage"][r["text"]], r["text"]
    routes = {r["text"]: r["route"] for r in answered}
    assert routes["import json"] == "/v1/completions" and routes["\n".join(m["content"] for m in CHAT)] == "/v1/chat/completions"
    stream = next(r for r in answered if r["text"] == "import json")
    assert 0 < stream["ttft_s"] <= stream["latency_s"]
    assert all(r["ttft_s"] is None for r in answered if r is not stream)


@pytest.mark.integration
def test_a_refused_request_is_recorded_as_refused_and_one_without_the_key_not_at_all(captured):
    refused = [r for r in captured["records"] if r["refused"]]
    assert [(r["text"], r["status"], r["tokens_in"], r["tokens_out"]) for r in refused] == [("REFUSED PROMPT", 400, 0, 0)]
    assert b"UNAUTHORIZED PROMPT" not in captured["bytes"]


@pytest.mark.integration
def test_no_key_and_no_header_value_reaches_a_batch(captured):
    data = captured["bytes"]
    for secret in (API_KEY, "wrong", HEADER_VALUE, "Bearer", "OpenAI/Python", "X-Trace", "authorization"):
        assert secret.encode() not in data, secret


@pytest.mark.integration
def test_planted_email_and_sk_key_are_redacted(captured):
    data = captured["bytes"]
    assert b"alice.smith@example.com" not in data and b"sk-proj-A1b2C3d4E5f6G7h8I9j0" not in data
    secret = next(r for r in captured["records"] if r["text"].endswith("import os"))
    assert secret["text"] == f"# contact {REDACTED}\nOPENAI_API_KEY = '{REDACTED}'\nimport os"


@pytest.mark.integration
def test_batches_rotate_by_size_are_complete_and_no_part_file_is_left_after_stop(captured):
    batches = captured["batches"]
    assert len(batches) >= 3, [p.name for p in batches]
    for path in batches:
        content = path.read_text()
        assert content.endswith("\n") and all(json.loads(line) for line in content.splitlines())
    assert sorted(captured["directory"].iterdir()) == batches  # nothing hidden either


@pytest.mark.integration
def test_the_monitor_reads_a_batch_with_the_ingest_reader_it_uses(captured):
    path = captured["batches"][0]
    records = list(read_jsonl("incoming", path.parent, path, IngestConfig(), IngestStats()))
    assert records and all(r.ingest_error is None for r in records)
    assert [r.id for r in records] == [json.loads(line)["id"] for line in path.read_text().splitlines()]
