"""The public face of both backends: an API-key check on every route but /health, each request checked, then streamed to the private backend.

vLLM's own --api-key guards only /v1 and transformers serve has none, so the key is checked here, the same way
for both. Only /health and the OpenAI routes under /v1 are exposed (the backends' admin routes such as /reset or
/load_model are not, however the path is spelled); /v1/models is answered here. Before a request is forwarded,
llmops.serving.guard checks it (size, JSON, model, types, prompt + max_tokens within the context and KV cache) and
the body forwarded is the checked one, with the backend's model id and an explicit max_tokens.

Slow clients are cut off: each request head must arrive within --client-timeout-s of the connection (or of the
previous response) and its body within as long again. A client that leaves mid-stream closes the upstream
response, which cancels its generation in the backend. /health is the backend's /health plus a one-token
completion (cached a few seconds), so a backend whose generation worker died shows unhealthy.

The backend is reached through llmops.serving.upstream (keep-alive HTTP/1.1 over its socket, cheap per streamed chunk).

Every request is observed as it is answered (ObservingMiddleware): llmops.serving.metrics counts it for /metrics
(behind the key; /metrics/backend passes vLLM's own through), and with serve.capture llmops.serving.capture writes it,
redacted, to the monitor's batches.

Run: LLMOPS_API_KEY=... python -m llmops.serving.proxy --backend-uds PATH --port 8000 --model NAME=BACKEND_ID --model-dir DIR --context-tokens N [--capture-dir DIR ...]
"""

import argparse
import asyncio
import hmac
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmops.common import env
from llmops.common.env import API_KEY as API_KEY_ENV
from llmops.serving.capture import CAPTURED_ROUTES, CaptureSettings, CaptureWriter, prompt_text
from llmops.serving.guard import ROUTE_FIELDS, Checked, Limits, PromptTokens, RequestError, check_request, parse_json
from llmops.serving.metrics import BACKEND_METRICS_PATH, CONTENT_TYPE, METRICS_PATH, ProxyMetrics, ResponseMeter, content_type, route_label
from llmops.serving.upstream import Upstream, UpstreamError, UpstreamResponse

# The only backend routes forwarded (/v1/models is answered here); admin routes (/reset, /load_model, /docs) never are.
OPENAI_ROUTES = frozenset(ROUTE_FIELDS)
# Response headers that are per hop; content-length is left to the server that re-frames the body.
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers", "transfer-encoding", "upgrade", "content-length"}
HEALTH_CACHE_S = 3.0  # /health is open to anyone: at most one one-token probe per this
PROBE_TIMEOUT_S = 30.0
PROBE_PROMPT = "\n"
MAX_HEAD_BYTES = 16 * 1024  # request line + headers
CHECK_IN_THREAD_BYTES = 64 * 1024  # bodies above this are tokenized off the event loop


@dataclass(frozen=True)
class ProxySettings:
    """Everything the app enforces, from the proxy's command line (serve params, via llmops.serving.server)."""

    limits: Limits
    max_body_bytes: int = 1_000_000
    client_timeout_s: float = 15.0
    timeout_s: float = 600.0  # one upstream request, generation included
    kv_cache_blocks: int = 0  # transformers backend: KV-cache blocks shared by requests in flight; 0 = not accounted
    kv_block_tokens: int = 256
    capture: CaptureSettings | None = None  # serve.capture: where and how requests are written for the monitor; None = off
    model_version: str = ""  # the served registry version, in captured records


@dataclass
class Observation:
    """One request as metrics and capture see it: the middleware fills in the response, the handlers what only they know."""

    route: str  # the route label (llmops.serving.metrics.route_label)
    started: float  # time.monotonic() at arrival
    arrived: str  # ISO 8601 UTC
    authorized: bool = False  # carried the right key
    relayed: bool = False  # the response is the backend's (else the proxy answered itself)
    text: str = ""
    model: str = ""
    status: int = 0


class ObservingMiddleware:
    """ASGI middleware: times each HTTP request, reads its response as it is sent (ResponseMeter), then calls
    `on_done(observation, meter, latency_s)` once the last byte is sent or the app failed (status 500)."""

    def __init__(self, app: Any, on_done: Callable[[Observation, ResponseMeter | None, float], None], in_flight: Any):
        self.app, self.on_done, self.in_flight = app, on_done, in_flight

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        observation = Observation(route_label(scope["path"]), time.monotonic(), datetime.now(UTC).isoformat(timespec="milliseconds"))
        scope.setdefault("state", {})["observation"] = observation
        meter: ResponseMeter | None = None

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal meter
            if message["type"] == "http.response.start":
                observation.status = message["status"]
                meter = ResponseMeter(stream=content_type(message.get("headers", [])).startswith("text/event-stream"))
            elif message["type"] == "http.response.body" and meter is not None:
                meter.feed(message.get("body", b""), time.monotonic())
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            observation.status = observation.status or 500
            raise
        finally:
            self.in_flight.dec()
            self.on_done(observation, meter, time.monotonic() - observation.started)


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status, headers=headers)


def _unauthorized() -> Any:
    return _error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class KvBudget:
    """Blocks of the transformers backend's KV cache held by requests in flight; a request waits, first come first
    served, until its blocks are free. Requests that each fit but together overflow the cache otherwise make the
    batching scheduler evict and recompute them (usually only slower; in one run here 6 of 8 such requests on a
    4-block cache made no progress in 60 s while /health said ok). A request holds ceil((prompt + max_tokens) /
    block size) blocks per sequence."""

    def __init__(self, blocks: int):
        self.capacity = self.free = blocks
        self.waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, blocks: int) -> None:
        if not self.waiting and blocks <= self.free:
            self.free -= blocks
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (blocks, granted)
        self.waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(blocks)  # granted just as it was cancelled
            else:
                with suppress(ValueError):
                    self.waiting.remove(entry)
                self._wake()
            raise

    def release(self, blocks: int) -> None:
        self.free += blocks
        self._wake()

    def _wake(self) -> None:
        while self.waiting and self.waiting[0][0] <= self.free:
            blocks, granted = self.waiting.popleft()
            if not granted.done():
                self.free -= blocks
                granted.set_result(None)


async def read_body(request: Any, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, refused (413) past `max_bytes` (declared or streamed) or (408) when it takes longer than `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise RequestError(413, f"the body is larger than this server's limit of {max_bytes} bytes", code="body_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise RequestError(413, f"the body is larger than this server's limit of {max_bytes} bytes", code="body_too_large")
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    return bytes(body)


def relay(upstream: UpstreamResponse, on_close: Callable[[], None]) -> Any:
    """A streamed copy of the backend's response. However it ends (done, client gone, error) the upstream response is
    closed, which ends the backend's generation if it was not done, and `on_close` runs."""
    import anyio
    from starlette.responses import StreamingResponse

    class RelayedResponse(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()
                on_close()

    headers = {k: v for k, v in upstream.headers if k.lower() not in HOP_HEADERS}
    return RelayedResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers)


def build_app(backend_url: str, api_key: str, models: dict[str, str], tokens: PromptTokens, settings: ProxySettings, backend_uds: str | None = None) -> Any:
    """A FastAPI app forwarding checked /v1 requests to the backend (`backend_uds`, else `backend_url`); `models` maps served names to backend ids."""
    from urllib.parse import urlsplit

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    if not api_key:
        raise ValueError("the proxy needs a non-empty API key")
    expected = f"Bearer {api_key}".encode()
    created = int(time.time())
    backend = urlsplit(backend_url)
    client = Upstream(uds=backend_uds) if backend_uds else Upstream(host=backend.hostname or "", port=backend.port or 80)
    # The backend sees only what the proxy chose: no client header (X-Request-Id would let one client collide with another's id).
    upstream_headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}
    budget = KvBudget(settings.kv_cache_blocks) if settings.kv_cache_blocks else None
    probe_state: dict[str, Any] = {"checked_at": -HEALTH_CACHE_S, "status": 503, "detail": ""}
    probe_lock = asyncio.Lock()
    probe_model = next(iter(models.values()))
    default_model = next(iter(models))
    metrics = ProxyMetrics()
    writer = CaptureWriter(settings.capture, count=lambda outcome: metrics.capture_records.labels(outcome).inc()) if settings.capture else None
    decode = tokens.tokenizer.decode if tokens.tokenizer is not None else None

    def done(observation: Observation, meter: ResponseMeter | None, latency_s: float) -> None:
        """Count the request; with capture on, queue its record (the key holder's requests to the OpenAI routes only)."""
        route, status = observation.route, observation.status
        if meter is not None:
            meter.finish()
        refused = not observation.relayed and route != "/health" and (400 <= status < 500 or status == 503)
        tokens_in, tokens_out = meter.tokens() if meter is not None and observation.relayed else (0, 0)
        ttft_s = meter.first_text_at - observation.started if meter is not None and meter.first_text_at is not None else None
        metrics.requests.labels(route, str(status)).inc()
        metrics.latency.labels(route).observe(latency_s)
        if refused:
            metrics.refused.labels(route, (meter.error_code() if meter is not None else "") or "unknown").inc()
        if ttft_s is not None:
            metrics.ttft.labels(route).observe(ttft_s)
        if observation.relayed:
            metrics.prompt_tokens.labels(route).inc(tokens_in)
            metrics.generated_tokens.labels(route).inc(tokens_out)
        if writer is None or not observation.authorized or route.lstrip("/") not in CAPTURED_ROUTES:
            return
        writer.submit({
            "text": observation.text, "id": f"req-{uuid.uuid4().hex}", "time": observation.arrived,
            "model": observation.model or default_model, "model_version": settings.model_version, "route": route,
            "status": status, "refused": refused, "tokens_in": tokens_in, "tokens_out": tokens_out,
            "latency_s": round(latency_s, 6), "ttft_s": round(ttft_s, 6) if ttft_s is not None else None,
        })  # fmt: skip

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if writer is not None:
            writer.start()
        try:
            yield
        finally:
            await client.aclose()
            if writer is not None:
                import anyio

                await anyio.to_thread.run_sync(writer.close)  # the last batch is published before the process exits

    app = FastAPI(title="llmops model server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(ObservingMiddleware, on_done=done, in_flight=metrics.in_flight)

    @app.exception_handler(RequestError)
    async def refused(_request: Request, exc: RequestError) -> Response:
        headers = {"Connection": "close"} if exc.status in (408, 413) else None  # the rest of the body is never read
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error in the proxy: {type(exc).__name__}", "internal_error", kind="server_error")

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    async def call(method: str, path: str, payload: dict[str, Any] | None, timeout_s: float) -> tuple[int, bytes]:
        answer = await client.request(method, path, json.dumps(payload).encode() if payload is not None else b"", upstream_headers, timeout_s)
        try:
            return answer.status_code, await answer.read()
        finally:
            await answer.aclose()

    async def generation_probe() -> tuple[int, str]:
        try:
            status, body = await call("POST", "/v1/completions", {"model": probe_model, "prompt": PROBE_PROMPT, "max_tokens": 1}, PROBE_TIMEOUT_S)
            if status == 200 and json.loads(body).get("choices"):
                return 200, ""
        except (UpstreamError, ValueError, AttributeError) as exc:
            return 503, type(exc).__name__
        return 503, f"HTTP {status}: {body[:200].decode(errors='replace')}"

    def health_answer(status: int, state: str, reason: str, detail: str, request: Request) -> Response:
        metrics.backend_up.set(1 if status == 200 else 0)
        body = {"status": state} | ({"reason": reason} if reason else {})
        if detail and authorized(request):  # what the backend said is for the key holder (llmops serve's supervisor) only
            body["detail"] = detail
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health(request: Request) -> Response:
        """The backend's own /health on every call; then a one-token completion, at most one per HEALTH_CACHE_S."""
        try:
            status, body = await call("GET", "/health", None, 5.0)
        except UpstreamError as exc:
            probe_state["checked_at"] = -HEALTH_CACHE_S  # a backend that comes back is probed afresh
            return health_answer(503, "unavailable", "backend unreachable", str(exc), request)
        if status != 200:
            probe_state["checked_at"] = -HEALTH_CACHE_S
            return health_answer(503, "unhealthy", f"backend /health answered {status}", body[:200].decode(errors="replace"), request)
        async with probe_lock:
            if time.monotonic() - probe_state["checked_at"] >= HEALTH_CACHE_S:
                probe_state["status"], probe_state["detail"] = await generation_probe()
                probe_state["checked_at"] = time.monotonic()
        if probe_state["status"] != 200:
            return health_answer(503, "unhealthy", "a one-token completion failed", probe_state["detail"], request)
        return health_answer(200, "ok", "", "", request)

    @app.get(METRICS_PATH)
    async def proxy_metrics(request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get(BACKEND_METRICS_PATH)
    async def backend_metrics(request: Request) -> Response:
        """The backend's own /metrics, as it answers it (vLLM's Prometheus metrics; transformers serve has none)."""
        if not authorized(request):
            return _unauthorized()
        try:
            answer = await client.request("GET", "/metrics", b"", upstream_headers, PROBE_TIMEOUT_S)
        except UpstreamError as exc:
            return _error(502, str(exc), "backend_unreachable", kind="server_error")
        try:
            body = await answer.read()
        finally:
            await answer.aclose()
        if answer.status_code == 404:
            return _error(404, f"the backend has no /metrics (transformers serve exports none); the proxy's own are at {METRICS_PATH}", "not_found", kind="not_found")
        request.state.observation.relayed = True
        headers = {k: v for k, v in answer.headers if k.lower() == "content-type"}
        return Response(body, status_code=answer.status_code, headers=headers)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        data = [{"id": name, "object": "model", "created": created, "owned_by": "llmops"} for name in models]
        return JSONResponse({"object": "list", "data": data})

    async def checked(path: str, request: Request) -> Checked:
        body = await read_body(request, settings.max_body_bytes, settings.client_timeout_s)
        observation: Observation = request.state.observation

        def check(body: bytes) -> Checked:
            payload = parse_json(body, settings.limits.max_json_depth)
            observation.text = prompt_text(path, payload, decode)  # before the check: capture records refused requests too
            observation.model = payload["model"] if isinstance(payload.get("model"), str) and payload["model"] in models else ""
            return check_request(path, payload, models, tokens, settings.limits)

        if len(body) <= CHECK_IN_THREAD_BYTES:
            return check(body)
        import anyio

        return await anyio.to_thread.run_sync(check, body)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def forward(path: str, request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        request.state.observation.authorized = True
        if path not in OPENAI_ROUTES:  # exact match on the decoded path: no dot segment or encoding reaches another route
            return _error(404, f"/{path[:200]} is not served", "not_found", kind="not_found")
        if request.method != "POST":
            return _error(405, f"/{path} takes POST", "method_not_allowed", headers={"Allow": "POST"})
        request_checked = await checked(path, request)
        blocks = request_checked.sequences * -(-request_checked.tokens_per_sequence // settings.kv_block_tokens) if budget else 0
        if budget and blocks > budget.capacity:
            raise RequestError(
                400, f"{request_checked.sequences} sequences of up to {request_checked.tokens_per_sequence} tokens need {blocks} KV-cache blocks; this server has {budget.capacity}. Lower n or max_tokens.",
                param="n", code="context_length_exceeded",
            )  # fmt: skip
        if budget:
            try:
                async with asyncio.timeout(settings.timeout_s):
                    await budget.acquire(blocks)
            except TimeoutError:
                return _error(503, f"the server is busy: no room in the KV cache for {settings.timeout_s:g} s", "server_busy", kind="server_error")
        released = False

        def release() -> None:
            nonlocal released
            if budget and not released:
                released = True
                budget.release(blocks)

        try:
            upstream = await client.request("POST", "/" + path, json.dumps(request_checked.payload).encode(), upstream_headers, settings.timeout_s)
        except UpstreamError as exc:
            release()
            return _error(502, str(exc), "backend_unreachable", kind="server_error")
        except BaseException:
            release()
            raise
        request.state.observation.relayed = True
        return relay(upstream, release)

    return app


def deadline_protocol(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request head: a client has `head_timeout_s` from connecting, or
    from the end of the previous response, to send its request line and headers, however slowly they trickle in
    (uvicorn's own keep-alive timer stops at the first byte, and a new connection has none)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        head_round = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            self.head_round += 1
            self.loop.call_later(head_timeout_s, self._head_deadline_passed, self.head_round)

        def _head_deadline_passed(self, head_round: int) -> None:
            if head_round == self.head_round and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="API-key proxy in front of an OpenAI-compatible backend (key from $LLMOPS_API_KEY).")
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--backend-uds", help="the backend's Unix socket (llmops serve)")
    backend.add_argument("--backend-url", help="the backend's base URL (a backend in another container)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[], required=True, help="SERVED_NAME=BACKEND_MODEL_ID (repeatable)")
    parser.add_argument("--model-dir", type=Path, required=True, help="the served model's directory: tokenizer.json, chat template, config.json")
    parser.add_argument("--context-tokens", type=int, required=True, help="prompt + max_tokens per request at most")
    parser.add_argument("--kv-cache-blocks", type=int, default=0, help="transformers backend: KV-cache blocks (0 = the backend manages its cache)")
    parser.add_argument("--kv-block-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=0, help="cap on max_tokens (0 = what the context leaves)")
    parser.add_argument("--max-n", type=int, default=4, help="choices per request (n x prompts)")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000)
    parser.add_argument("--client-timeout-s", type=float, default=15.0, help="for a request head, and again for its body")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="one upstream request, generation included")
    parser.add_argument("--model-version", default="", help="the served registry version, written into captured records")
    parser.add_argument("--capture-dir", type=Path, help="capture requests as JSONL batches here (serve.capture); absent = no capture")
    parser.add_argument("--capture-sample-rate", type=float, default=1.0)
    parser.add_argument("--capture-seed", type=int, default=0)
    parser.add_argument("--capture-max-bytes", type=int, default=16_000_000)
    parser.add_argument("--capture-max-age-s", type=float, default=3600.0)
    parser.add_argument("--capture-redact", action="append", default=[], help="regex replaced by [REDACTED] in captured prompts (repeatable)")
    args = parser.parse_args(argv)
    api_key = env.take(API_KEY_ENV)
    if not api_key:
        parser.error(f"${API_KEY_ENV} is empty: the proxy refuses to start without a key")
    models = dict(item.split("=", 1) for item in args.model)
    kv_tokens = args.kv_cache_blocks * args.kv_block_tokens
    settings = ProxySettings(
        limits=Limits(context_tokens=args.context_tokens, kv_cache_tokens=kv_tokens, max_tokens=args.max_tokens, max_n=args.max_n),
        max_body_bytes=args.max_body_bytes, client_timeout_s=args.client_timeout_s, timeout_s=args.timeout_s,
        kv_cache_blocks=args.kv_cache_blocks, kv_block_tokens=args.kv_block_tokens, model_version=args.model_version,
        capture=CaptureSettings(
            directory=args.capture_dir, sample_rate=args.capture_sample_rate, seed=args.capture_seed, max_bytes=args.capture_max_bytes,
            max_age_s=args.capture_max_age_s, redact=tuple(args.capture_redact),
        ) if args.capture_dir else None,
    )  # fmt: skip
    app = build_app(args.backend_url or "", api_key, models, PromptTokens.from_model_dir(args.model_dir), settings, backend_uds=args.backend_uds)
    uvicorn.run(
        app, host=args.host, port=args.port, http=deadline_protocol(args.client_timeout_s), limit_concurrency=args.max_connections,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES, log_level="warning", access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
