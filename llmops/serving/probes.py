"""After launch: a smoke test (one completion, one chat turn) and a bounded load test (N clients x M streamed requests) through the openai client."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmops.common.errors import ServeError

SMOKE_PROMPT = 'def add(a, b):\n    """Return the sum of a and b."""\n'
LOAD_PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    'def is_palindrome(text):\n    """Return True if text reads the same backwards."""\n',
    "import os\n\n\ndef list_python_files(root):\n",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
    "def read_json(path):\n    with open(path) as f:\n",
    'def median(values):\n    """Return the median of a list of numbers."""\n',
]


def smoke_test(base_url: str, api_key: str, model: str, max_tokens: int, timeout_s: float) -> dict[str, float]:
    """One completion and one chat completion must come back with generated tokens; returns their latencies."""
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
    try:
        start = time.perf_counter()
        completion = client.completions.create(model=model, prompt=SMOKE_PROMPT, max_tokens=max_tokens, temperature=0.0)
        completion_s = time.perf_counter() - start
        start = time.perf_counter()
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": SMOKE_PROMPT}], max_tokens=max_tokens, temperature=0.0)
        chat_s = time.perf_counter() - start
    except OpenAIError as exc:
        raise ServeError(f"smoke test against {base_url} failed: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()
    for kind, response in (("completion", completion), ("chat completion", chat)):
        if not response.choices:
            raise ServeError(f"smoke test: the {kind} came back with no choices")
        if response.usage is not None and response.usage.completion_tokens < 1:
            raise ServeError(f"smoke test: the {kind} generated no tokens")
    if completion.choices[0].text is None or chat.choices[0].message.content is None:
        raise ServeError("smoke test: a response has no text")
    return {"completion_latency_s": completion_s, "chat_latency_s": chat_s}


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float
    completion_tokens: int
    error: str = ""


async def _one_request(client: Any, model: str, prompt: str, max_tokens: int) -> RequestResult:
    start = time.perf_counter()
    ttft = 0.0
    chunks = 0
    usage_tokens = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                if not ttft:
                    ttft = time.perf_counter() - start
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
    except Exception as exc:  # every failure is counted, none stops the test
        return RequestResult(False, time.perf_counter() - start, ttft, 0, f"{type(exc).__name__}: {exc}"[:300])
    return RequestResult(True, time.perf_counter() - start, ttft, usage_tokens or chunks)


async def _run_load(base_url: str, api_key: str, model: str, clients: int, requests: int, max_tokens: int, timeout_s: float, uds: str | None) -> tuple[list[RequestResult], float]:
    import httpx
    from openai import AsyncOpenAI

    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(LOAD_PROMPTS[i % len(LOAD_PROMPTS)])
    results: list[RequestResult] = []
    http_client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=uds), timeout=timeout_s) if uds else None
    async with AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0, http_client=http_client) as client:

        async def worker() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one_request(client, model, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], wall_s: float, clients: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    latencies = np.array([r.latency_s for r in ok]) if ok else np.array([np.nan])
    ttfts = np.array([r.ttft_s for r in ok if r.ttft_s]) if any(r.ttft_s for r in ok) else np.array([np.nan])
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_rate": (len(results) - len(ok)) / max(len(results), 1),
        "wall_s": wall_s,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "ttft_p50_s": float(np.percentile(ttfts, 50)),
        "ttft_p95_s": float(np.percentile(ttfts, 95)),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "first_errors": sorted({r.error for r in results if not r.ok})[:3],
    }


def load_test(base_url: str, api_key: str, model: str, *, clients: int, requests: int, max_tokens: int, timeout_s: float, uds: str | None = None) -> dict[str, Any]:
    """`requests` streamed completions from `clients` concurrent clients: latency and TTFT percentiles, tokens/s, errors.

    `uds` sends them over that Unix socket instead of TCP (base_url then only supplies the path): the benchmark uses it
    to load the backend directly, without the proxy.
    """
    from concurrent.futures import ThreadPoolExecutor

    # A thread of its own, so this works whether or not the caller (a Prefect task) already runs an event loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        results, wall_s = pool.submit(asyncio.run, _run_load(base_url, api_key, model, clients, requests, max_tokens, timeout_s, uds)).result()
    return summarize(results, wall_s, clients)
