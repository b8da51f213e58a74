"""The proxy's Prometheus metrics (prometheus_client, one registry per app) and what each response tells them: status,
latency, time to the first generated text of a stream, and the prompt and generated tokens of the response's usage.

The metrics are served at /metrics on the proxy's own port, behind the API key like every route but /health (one
key check in front of both backends; Prometheus sends it with `authorization.credentials_file`). /metrics/backend
passes the backend's own /metrics through (vLLM has one; transformers serve has none and gets a 404).
Route labels are the routes the proxy serves, every other path is "other", so a client cannot add label values.
"""

from __future__ import annotations

import re

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llmops.serving.capture import OUTCOMES

METRICS_PATH = "/metrics"
BACKEND_METRICS_PATH = "/metrics/backend"
ROUTES = ("/health", METRICS_PATH, BACKEND_METRICS_PATH, "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings")
OTHER_ROUTE = "other"
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Sample names each metric type puts in the exposition, after the metric's own name.
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}
TAIL_BYTES = 4096  # a non-streamed body's usage object is at its end; only this much of it is kept

# A JSON key as a key, never inside a string (where its quotes would be escaped).
PROMPT_TOKENS_RE = re.compile(rb'[{,]\s*"prompt_tokens"\s*:\s*(\d+)')
COMPLETION_TOKENS_RE = re.compile(rb'[{,]\s*"completion_tokens"\s*:\s*(\d+)')
GENERATED_TEXT_RE = re.compile(rb'[{,]\s*"(?:text|content)"\s*:\s*"(?!")')  # a non-empty text or delta content
ERROR_CODE_RE = re.compile(rb'[{,]\s*"code"\s*:\s*"([A-Za-z0-9_]{1,64})"')


def route_label(path: str) -> str:
    return path if path in ROUTES else OTHER_ROUTE


class ProxyMetrics:
    """Every metric the proxy exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmops_requests", "Requests answered, by route and HTTP status", ["route", "status"], registry=r)
        self.refused = Counter("llmops_refused_requests", "Requests the proxy refused itself (4xx, 503), by route and error code", ["route", "code"], registry=r)
        self.latency = Histogram("llmops_request_duration_seconds", "Arrival to the last byte sent", ["route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("llmops_time_to_first_token_seconds", "Streams: arrival to the first generated text", ["route"], buckets=TTFT_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("llmops_prompt_tokens", "Prompt tokens of answered requests (response usage)", ["route"], registry=r)
        self.generated_tokens = Counter("llmops_generated_tokens", "Generated tokens (response usage; streams without usage: events with text)", ["route"], registry=r)
        self.in_flight = Gauge("llmops_requests_in_flight", "Requests being answered", registry=r)
        self.backend_up = Gauge("llmops_backend_up", "1 when the last /health found the backend generating, else 0", registry=r)
        self.capture_records = Counter("llmops_capture_records", "Requests offered to serve.capture, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.capture_records.labels(outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def exported_names() -> set[str]:
    """Every sample name a scrape of the proxy can hold (what a dashboard query may use)."""
    return {metric.name + suffix for metric in ProxyMetrics().registry.collect() for suffix in SAMPLE_SUFFIXES[metric.type]}


class ResponseMeter:
    """Reads a response as it is sent: the time of a stream's first generated text and the usage's token counts.

    A stream is read line by line (SSE `data:` lines); a JSON line is matched, not parsed, so the cost per streamed
    token is a split and a substring test. A non-streamed body keeps only its last TAIL_BYTES."""

    def __init__(self, stream: bool):
        self.stream = stream
        self.first_text_at: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.text_events = 0
        self._pending = b""

    def feed(self, chunk: bytes, now: float) -> None:
        if not chunk:
            return
        if not self.stream:
            self._pending = (self._pending + chunk)[-TAIL_BYTES:]
            return
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n") + 1
        lines, self._pending = data[:end], data[end:]
        if self.first_text_at is None or b'"prompt_tokens"' in lines:
            for line in lines.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line, now)
        else:  # the common case, once per streamed token: count the data lines (a raw newline is never inside JSON)
            self.text_events += lines.startswith(b"data:") + lines.count(b"\ndata:") - lines.count(b"data: [DONE]")

    def _event(self, line: bytes, now: float) -> None:
        if b'"prompt_tokens"' in line:
            self._usage(line)
        if self.first_text_at is None:
            if GENERATED_TEXT_RE.search(line):
                self.first_text_at = now
                self.text_events += 1
        elif not line.startswith(b"data: [DONE]"):
            self.text_events += 1

    def _usage(self, data: bytes) -> None:
        prompt, completion = PROMPT_TOKENS_RE.search(data), COMPLETION_TOKENS_RE.search(data)
        if prompt:
            self.prompt_tokens = int(prompt.group(1))
        if completion:
            self.completion_tokens = int(completion.group(1))

    def finish(self) -> None:
        if not self.stream:
            self._usage(self._pending)

    def tokens(self) -> tuple[int, int]:
        """(prompt tokens, generated tokens): the usage's; a stream without usage counts its events with text."""
        generated = self.completion_tokens if self.completion_tokens is not None else (self.text_events if self.stream else 0)
        return self.prompt_tokens or 0, generated

    def error_code(self) -> str:
        """The OpenAI error object's code in a (non-streamed) error body, or ""."""
        match = ERROR_CODE_RE.search(self._pending)
        return match.group(1).decode() if match else ""


def content_type(headers: list[tuple[bytes, bytes]]) -> str:
    """The content-type of ASGI response headers, lower case ("" when absent)."""
    return next((value.decode("latin-1").lower() for name, value in headers if name.lower() == b"content-type"), "")
