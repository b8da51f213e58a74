"""The proxy's client for its one upstream, the backend: HTTP/1.1 over keep-alive connections to its Unix socket (or host:port), bodies streamed.

Every generated token crosses the proxy as one chunk, so the cost per chunk is the proxy's cost. httpx takes each
chunk through several layers of async generators, h11 and anyio; on the 2-core benchmark machine the proxy then
cost 8-16% of the served tokens/s at 4 and 16 clients, and with this client 2-3% (benchmarks/bench_serve.py, the
proxy's CPU per token down by about 40%). Here a chunk is one line read and one exact read on an asyncio stream.
Only what the backend (uvicorn) sends is handled: a status line, headers, and a body framed by Content-Length or
by chunked transfer coding. Closing a response before its end closes its connection, which is how the backend
learns that the client left and stops generating.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

MAX_HEAD_BYTES = 64 * 1024
IDLE_KEEP_S = 4.0  # uvicorn closes a kept-alive connection after 5 s idle: never reuse one that close to it


class UpstreamError(Exception):
    """The backend could not be reached, or broke the HTTP framing, or did not answer in time."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """Status, headers and a body read once, as chunks or whole; `aclose` returns the connection to the pool only after a complete body."""

    def __init__(self, upstream: "Upstream", conn: _Connection, status: int, headers: list[tuple[str, str]], timeout_s: float):
        self.status_code, self.headers = status, headers
        self._upstream, self._conn, self._timeout_s = upstream, conn, timeout_s
        names = {k.lower(): v for k, v in headers}
        self._chunked = "chunked" in names.get("transfer-encoding", "").lower()
        self._remaining = int(names.get("content-length", "0")) if not self._chunked else 0
        self._reusable = "close" not in names.get("connection", "").lower()
        self._done = not self._chunked and self._remaining == 0

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        try:
            while not self._done:
                async with asyncio.timeout(self._timeout_s):
                    if self._chunked:
                        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                        if size == 0:
                            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
                                pass
                            self._done = True
                            return
                        data = (await reader.readexactly(size + 2))[:-2]
                    else:
                        data = await reader.read(min(self._remaining, 65536))
                        if not data:
                            raise UpstreamError("the backend closed the connection mid-body")
                        self._remaining -= len(data)
                        self._done = self._remaining == 0
                yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError, TimeoutError) as exc:
            self._reusable = False
            raise UpstreamError(f"reading the backend's response: {type(exc).__name__}") from None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._upstream._release(conn, reusable=self._done and self._reusable)


class Upstream:
    """A small keep-alive pool of connections to the backend."""

    def __init__(self, uds: str | None = None, host: str = "", port: int = 0, connect_timeout_s: float = 10.0):
        self.uds, self.host, self.port, self.connect_timeout_s = uds, host, port, connect_timeout_s
        self._idle: list[_Connection] = []
        self._authority = "backend" if uds else f"{host}:{port}"

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.uds:
                    reader, writer = await asyncio.open_unix_connection(self.uds, limit=MAX_HEAD_BYTES)
                else:
                    reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to the backend: {type(exc).__name__}") from None
        return _Connection(reader, writer)

    def _pooled(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() - conn.idle_since < IDLE_KEEP_S and not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not conn.writer.is_closing():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str], timeout_s: float) -> UpstreamResponse:
        """Send the request and read the response head (within `timeout_s`); the body is left to the caller."""
        head = f"{method} {path} HTTP/1.1\r\nhost: {self._authority}\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        conn = self._pooled()
        reused = conn is not None
        while True:
            conn = conn or await self._connect()
            try:
                conn.writer.write(head.encode("latin-1") + body)
                async with asyncio.timeout(timeout_s):
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.close()
                if reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial):
                    conn, reused = None, False  # the backend had closed the idle connection: once more on a new one
                    continue
                raise UpstreamError(f"the backend dropped the connection: {type(exc).__name__}") from None
            except (asyncio.LimitOverrunError, TimeoutError) as exc:
                conn.close()
                raise UpstreamError(f"no response head from the backend: {type(exc).__name__}") from None
        lines = raw.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            conn.close()
            raise UpstreamError(f"the backend sent a malformed status line: {lines[0][:100]!r}") from None
        headers_in = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:] if line)]
        return UpstreamResponse(self, conn, status, headers_in, timeout_s)

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
