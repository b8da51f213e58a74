"""params.yaml `serve`: the key-checking proxy, the backend, and the deploy flow's smoke and load tests."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from llmops.params.base import Section

# serve.capture_redact's default: what is replaced by "[REDACTED]" in a captured prompt before it is written. Each
# pattern starts matching only where a run of its characters starts (a lookbehind or \b), so a long prompt costs linear time.
DEFAULT_CAPTURE_REDACT = (
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",  # e-mail addresses
    r"\bsk-[A-Za-z0-9_-]{16,}",  # OpenAI/Anthropic-style secret keys (sk-..., sk-proj-..., sk-ant-...)
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",  # AWS access key ids
    r"\b[0-9a-fA-F]{32,}\b",  # long hex tokens (hashes, hex-encoded secrets)
    # long base64 / base64url tokens (AWS secret keys, JWT parts): 40+ characters mixing digits, upper and lower case
    r"(?<![A-Za-z0-9+/_-])(?=[A-Za-z0-9+/_-]*[0-9])(?=[A-Za-z0-9+/_-]*[A-Z])(?=[A-Za-z0-9+/_-]*[a-z])[A-Za-z0-9+/_-]{40,}={0,2}",
)


class ServeConfig(Section):
    """`llmops serve` / the deploy flow: one key-checking proxy in front of vLLM (GPU) or `transformers serve` (CPU)."""

    host: str = "127.0.0.1"  # interface of the public, key-checking port; 0.0.0.0 serves other machines
    port: int = Field(8000, ge=0, le=65535)  # 0 = a free port
    backend: Literal["auto", "vllm", "transformers"] = "auto"  # auto = vllm where it is installed and a GPU is present
    device: str = "cpu"  # transformers backend: cpu | cuda | auto
    cb_num_blocks: int = Field(1024, ge=0)  # transformers backend: KV-cache blocks of cb_block_size tokens; 0 = sized from free memory (slow on CPU)
    cb_block_size: int = Field(32, ge=4)  # transformers backend: tokens per KV-cache block (the proxy admits requests by the block)
    cb_max_batch_tokens: int = Field(1024, ge=0)  # transformers backend: tokens per continuous batch; 0 = library default
    torch_threads: int = Field(1, ge=0)  # transformers backend: torch intra-op threads; 0 = torch's default (one per core)
    api_key_file: str = ".secrets/llmops_api_key"  # read when $LLMOPS_API_KEY is unset; created (mode 0600, random key) if missing
    health_timeout_s: float = Field(300.0, gt=0)  # /health must answer 200 within this after launch
    max_model_len: int = Field(2048, ge=16)  # vllm --max-model-len
    tensor_parallel_size: int = Field(1, ge=1)  # vllm --tensor-parallel-size (GPUs per replica)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vllm: share of GPU memory for weights + KV cache
    max_lora_rank: int = Field(16, ge=1)  # vllm --max-lora-rank when the model is a LoRA adapter
    speculative: str = "off"  # draft model for speculative decoding: off | distill (paths.student_model) | a model directory
    num_speculative_tokens: int = Field(4, ge=1)  # tokens the draft proposes per verification round (vLLM --speculative-config; transformers assisted generation)
    request_timeout_s: float = Field(120.0, gt=0)  # per request: the proxy's upstream limit, the smoke and load tests
    max_body_bytes: int = Field(1_000_000, ge=1024)  # proxy: larger request bodies get 413
    client_timeout_s: float = Field(15.0, gt=0)  # proxy: a client must send a request's head within this, and its body within as long again
    max_tokens: int = Field(0, ge=0)  # proxy: cap on a request's max_tokens; 0 = what the context (and KV cache) leaves after the prompt
    max_n: int = Field(4, ge=1)  # proxy: choices per request (n or best_of, times the prompts)
    max_connections: int = Field(256, ge=1)  # proxy: concurrent connections; more get 503
    supervise_interval_s: float = Field(5.0, gt=0)  # `llmops serve` checks its processes and /health this often
    unhealthy_checks: int = Field(3, ge=1)  # consecutive failed /health checks before the backend is restarted
    max_restarts: int = Field(3, ge=0)  # restarts allowed within restart_window_s; one more and the server stops (exit 1)
    restart_window_s: float = Field(600.0, gt=0)
    smoke_max_tokens: int = Field(16, ge=1)
    load_clients: int = Field(8, ge=1)  # concurrent clients of the load test
    load_requests: int = Field(32, ge=1)  # requests in all, shared by the clients
    load_max_tokens: int = Field(32, ge=1)
    max_error_rate: float = Field(0.0, ge=0, le=1)  # load-test gate: failed requests / requests
    max_p95_latency_s: float = Field(60.0, ge=0)  # load-test gate; 0 = no limit
    after_run: bool = True  # `llmops run` ends with the deploy flow (when the run covers the whole DAG)
    capture: bool = False  # proxy: write each completed request (redacted prompt, tokens, latency, status) to JSONL batches for the monitor
    capture_dir: str = "data/incoming"  # batches, relative to the repository root: capture-*.jsonl (being written: hidden .capture-*.jsonl.part)
    capture_sample_rate: float = Field(1.0, gt=0, le=1)  # share of requests captured
    capture_seed: int = 0  # the sampling draws: the same requests in the same order are sampled the same way
    capture_max_bytes: int = Field(16_000_000, ge=1)  # a batch is closed (renamed to capture-*.jsonl) at this size ...
    capture_max_age_s: float = Field(3600.0, gt=0)  # ... or this long after its first record, or when the server stops
    capture_redact: tuple[str, ...] = DEFAULT_CAPTURE_REDACT  # regexes (Python re) replaced by "[REDACTED]" in the prompt text

    @field_validator("capture_redact")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"capture_redact[{i}] {pattern!r} is not a valid regular expression: {exc}") from None
        return patterns
