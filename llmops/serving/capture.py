"""Request capture at the proxy: each sampled request becomes one JSONL record (redacted prompt text, model, time, tokens,
latency, status; never the API key or any header) in rotating batch files that `llmops monitor --batch` reads as they are.

Batch format (serve.capture_dir, default data/incoming). A batch being written is the hidden file
`.capture-<UTC yyyymmddTHHMMSSZ>-<pid>-<seq, 6 digits>.jsonl.part`, so a `*.jsonl` glob never matches it; it is renamed to
`capture-<UTC yyyymmddTHHMMSSZ>-<pid>-<seq>.jsonl` (same stamp, pid and seq; never over an existing file) once it holds
serve.capture_max_bytes, once its first record is serve.capture_max_age_s old, or when the server stops (SIGTERM; a
proxy killed with SIGKILL leaves its .part file, which no reader takes). One JSON object per line:
  text          prompt text after redaction (chat: the messages' contents joined by "\\n"; several prompts: joined by "\\n")
  id            request id (req-<32 hex>), made by the proxy
  time          ISO 8601 UTC time the request arrived
  model         served model name; model_version: its registry version, or "" for a local directory
  route         "/v1/completions", "/v1/chat/completions" or "/v1/embeddings"
  status        HTTP status the client got; refused: true when the proxy itself refused the request (4xx, 503)
  tokens_in     prompt tokens and tokens_out generated tokens, from the response's usage (0 when refused); a stream
  tokens_out    without usage (vLLM without stream_options.include_usage) counts its events that carry text
  latency_s     arrival to the last byte sent; ttft_s: arrival to the first generated text of a stream, else null
Only requests that carried the right key are captured: a client without it cannot write into the monitor's batches.

The event loop only queues a record (`CaptureWriter.submit`); a writer thread redacts, writes and rotates it. Records that
would push the queue past MAX_QUEUED_CHARS of prompt text are dropped and counted, so a stalled disk never grows memory.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REDACTED = "[REDACTED]"
BATCH_PREFIX = "capture-"
BATCH_SUFFIX = ".jsonl"
PART_SUFFIX = ".part"
MAX_QUEUED_CHARS = 64_000_000  # prompt text waiting for the writer thread; beyond it records are dropped (and counted)
CAPTURED_ROUTES = ("v1/completions", "v1/chat/completions", "v1/embeddings")
OUTCOMES = ("written", "sampled_out", "dropped", "failed")  # what became of each request offered to the writer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureSettings:
    """serve.capture_* as the proxy receives them on its command line."""

    directory: Path
    sample_rate: float = 1.0
    seed: int = 0
    max_bytes: int = 16_000_000
    max_age_s: float = 3600.0
    redact: tuple[str, ...] = ()


class Redactor:
    """Replaces every match of each pattern by REDACTED, in order."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = [re.compile(p) for p in patterns]

    def __call__(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub(REDACTED, text)
        return text


def prompt_text(route: str, payload: dict[str, Any], decode: Callable[[list[int]], str] | None = None) -> str:
    """The prompt text of a request body as far as its shape allows (a refused request may be malformed): completions'
    prompt(s), chat messages' contents, embeddings' input(s), joined by newlines; token ids through `decode` when given."""

    def text_of(item: Any) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, list) and item and all(type(t) is int for t in item):
            return decode(item) if decode else ""
        if isinstance(item, list):  # chat content parts
            return " ".join(p["text"] for p in item if isinstance(p, dict) and isinstance(p.get("text"), str))
        return ""

    if route == "v1/chat/completions":
        messages = payload.get("messages")
        parts = [text_of(m.get("content")) for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    else:
        value = payload.get("prompt" if route == "v1/completions" else "input")
        many = isinstance(value, list) and value and not all(type(t) is int for t in value)
        parts = [text_of(item) for item in value] if many else [text_of(value)]
    try:
        return "\n".join(parts)
    except ValueError:  # a decoder refusing ids out of its vocabulary
        return ""


class CaptureWriter:
    """Appends records to the current batch from a thread of its own; `close` publishes the last batch."""

    def __init__(self, settings: CaptureSettings, count: Callable[[str], None] = lambda outcome: None):
        self.settings = settings
        self.count = count  # called with one of OUTCOMES per request offered (from the event loop or the writer thread)
        self.redact = Redactor(settings.redact)
        self._sample = random.Random(settings.seed)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._queued_chars = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._file: Any = None
        self._part: Path | None = None
        self._stamp = ""
        self._bytes = 0
        self._opened_at = 0.0
        self.published: list[Path] = []

    def start(self) -> None:
        self.settings.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="llmops capture", daemon=True)
        self._thread.start()

    def submit(self, record: dict[str, Any]) -> None:
        """Queue `record` (its text not yet redacted) when the sampling draw takes it; never blocks."""
        if self.settings.sample_rate < 1.0 and self._sample.random() >= self.settings.sample_rate:
            self.count("sampled_out")
            return
        size = len(record["text"])
        with self._lock:
            if self._queued_chars + size > MAX_QUEUED_CHARS:
                self.count("dropped")
                return
            self._queued_chars += size
        self._queue.put(record)

    def close(self) -> None:
        """Write what is queued, publish the current batch, stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            timeout = self._opened_at + self.settings.max_age_s - time.monotonic() if self._file else None
            try:
                record = self._queue.get(timeout=max(timeout, 0.0) if timeout is not None else None)
            except queue.Empty:
                self._publish()  # the batch is max_age_s old with no record since
                continue
            if record is None:
                self._publish()
                return
            with self._lock:
                self._queued_chars -= len(record["text"])
            try:
                self._write(record)
            except OSError as exc:  # a full or read-only disk: the batch so far is kept, this record is lost
                logger.error("capture: writing %s failed: %s", self._part, exc)
                self.count("failed")
                self._publish()
                continue
            self.count("written")
            if self._bytes >= self.settings.max_bytes or time.monotonic() - self._opened_at >= self.settings.max_age_s:
                self._publish()

    def _write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record | {"text": self.redact(record["text"])}, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        if self._file is None:
            self._stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            self._part = self.settings.directory / f".{self._batch_name()}{PART_SUFFIX}"
            self._file = open(self._part, "xb")  # noqa: SIM115 - held open across records, closed by _publish
            self._bytes, self._opened_at = 0, time.monotonic()
        self._file.write(line)
        self._bytes += len(line)

    def _batch_name(self) -> str:
        name = f"{BATCH_PREFIX}{self._stamp}-{os.getpid()}-{self._seq:06d}{BATCH_SUFFIX}"  # zero-padded: names sort in write order
        self._seq += 1
        return name

    def _publish(self) -> None:
        """Flush, fsync and rename the current batch to its visible name, never over an existing batch."""
        if self._file is None:
            return
        part, file = self._part, self._file
        self._file = self._part = None
        final = part.with_name(part.name.removeprefix(".").removesuffix(PART_SUFFIX))
        try:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            while True:
                try:
                    os.link(part, final)  # unlike rename, fails where `final` exists: another host's proxy, same pid and second
                    os.unlink(part)
                    break
                except FileExistsError:
                    final = part.with_name(self._batch_name())
                except OSError:  # a file system without hard links
                    os.replace(part, final)
                    break
            directory = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            logger.error("capture: publishing %s as %s failed: %s", part, final, exc)
            return
        self.published.append(final)
