"""The public face of both backends: an API-key check on every route but /health, requests streamed through to the private backend.

vLLM's own --api-key guards only /v1 and transformers serve has none, so the key is checked
here, the same way for both. Only /health and the OpenAI routes under /v1 are exposed (the
backends' admin routes such as /reset or /load_model are not, however the path is spelled). The proxy also answers
/v1/models itself and maps the served model name to the id the backend expects.

Run: LLMOPS_API_KEY=... python -m llmops.serving.proxy --backend-url http://127.0.0.1:PORT --port 8000 --model NAME=BACKEND_ID
"""

import argparse
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from llmops.common import env
from llmops.common.env import API_KEY as API_KEY_ENV

# The only backend routes forwarded (/v1/models is answered here); admin routes (/reset, /load_model, /docs) never are.
OPENAI_ROUTES = frozenset({"v1/completions", "v1/chat/completions", "v1/embeddings"})
# Connection-level headers are per hop; content-length changes when the body is rewritten.
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers", "transfer-encoding", "upgrade", "content-length", "host"}


def _unauthorized() -> Any:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": "missing or invalid API key: send 'Authorization: Bearer <key>'", "type": "invalid_request_error", "code": "invalid_api_key"}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def build_app(backend_url: str, api_key: str, models: dict[str, str], timeout_s: float = 600.0) -> Any:
    """A FastAPI app forwarding /v1/* to `backend_url`; `models` maps served names to the backend's model ids."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask

    if not api_key:
        raise ValueError("the proxy needs a non-empty API key")
    expected = f"Bearer {api_key}".encode()
    created = int(time.time())
    client = httpx.AsyncClient(base_url=backend_url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="llmops model server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    @app.get("/health")
    async def health() -> Response:
        try:
            upstream = await client.get("/health", timeout=5.0)
        except httpx.HTTPError as exc:
            return JSONResponse({"status": "unavailable", "reason": f"backend unreachable: {type(exc).__name__}"}, status_code=503)
        return Response(upstream.content, status_code=upstream.status_code, media_type=upstream.headers.get("content-type"))

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        data = [{"id": name, "object": "model", "created": created, "owned_by": "llmops"} for name in models]
        return JSONResponse({"object": "list", "data": data})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def forward(path: str, request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        if path not in OPENAI_ROUTES:  # exact match on the decoded path: no dot segment or encoding reaches another route
            return JSONResponse({"error": {"message": f"/{path} is not served", "type": "not_found"}}, status_code=404)
        body = await request.body()
        if body and request.headers.get("content-type", "").startswith("application/json"):
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and payload.get("model") in models:
                payload["model"] = models[payload["model"]]
                body = json.dumps(payload).encode()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream_request = client.build_request(request.method, "/" + path, params=request.query_params, headers=headers, content=body)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": {"message": f"backend unreachable: {type(exc).__name__}", "type": "server_error"}}, status_code=502)
        # The body goes through as raw bytes, so content-encoding (if the backend compressed it) stays true.
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=out_headers, background=BackgroundTask(upstream.aclose))

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="API-key proxy in front of an OpenAI-compatible backend (key from $LLMOPS_API_KEY).")
    parser.add_argument("--backend-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[], help="SERVED_NAME=BACKEND_MODEL_ID (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    api_key = env.take(API_KEY_ENV)
    if not api_key:
        parser.error(f"${API_KEY_ENV} is empty: the proxy refuses to start without a key")
    models = dict(item.split("=", 1) for item in args.model)
    app = build_app(args.backend_url, api_key, models, args.timeout_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
