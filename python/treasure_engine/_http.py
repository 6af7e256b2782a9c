"""A lean HTTP/1.1 client for the signed POSTs of the Kinesis data plane.

A Kinesis call is one POST of a body whose headers the signer already wrote, and one answer with its status and
body. aiohttp's request machinery (request and response objects, header multidicts, the payload writer, the
stream reader: some 600 Python calls per request) cost the event loop about 0.15 ms per request more than this
client does (docs/internals.md, "Producer CPU per event"). This client does what the call needs on asyncio
protocols:

- persistent connections, at most `max_connections`, reused in turn (HTTPS through `ssl.create_default_context`,
  as aiohttp does);
- the request head written in one piece and the body (a memoryview of the batcher's buffer) as it is;
- the response read into one buffer and parsed once complete: `Content-Length`, chunked transfer coding, or
  until the server closes; a `Connection: close` answer or anything unexpected closes the connection;
- one timeout over the whole exchange; an idle connection the server closed is retried once on a new one (no
  byte of the request can have been processed when none of the answer came back before the close).

Errors are `OSError`s (`HttpError` for protocol violations) and `TimeoutError`, which the caller turns into
transient failures, as it did with aiohttp's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

__all__ = ["HttpClient", "HttpError"]

Body = bytes | bytearray | memoryview

# Largest response head accepted (status line and headers).
MAX_HEAD = 64 * 1024
USER_AGENT = "User-Agent: treasure-engine"


class HttpError(ConnectionError):
    """The server broke HTTP/1.1: a malformed answer, or the connection closed before the answer ended."""


class _Response:
    """An answer being parsed from the bytes received so far."""

    __slots__ = ("body", "chunk_at", "chunks", "head_end", "keep_alive", "length", "status", "until_close")

    def __init__(self) -> None:
        self.status = 0
        self.head_end = -1
        self.length = -1  # Content-Length, -1 when the body is chunked or ends with the connection
        self.until_close = False
        self.keep_alive = True
        self.chunks: list[bytes] | None = None  # chunked transfer coding: the chunks decoded so far
        self.chunk_at = 0  # where the next chunk-size line starts
        self.body = b""

    def feed(self, buf: bytearray) -> bool:
        """Parses what `buf` holds; True once the answer is complete (then `status` and `body` are set)."""
        if self.head_end < 0 and not self._head(buf):
            return False
        if self.chunks is not None:
            return self._chunked(buf)
        if self.length >= 0:
            end = self.head_end + self.length
            if len(buf) < end:
                return False
            self.body = bytes(buf[self.head_end : end])
            if len(buf) > end:
                self.keep_alive = False  # bytes no request asked for: do not read the next answer after them
            return True
        return False  # until the server closes (see `eof`)

    def eof(self, buf: bytearray) -> bool:
        """The server closed: True when that ends the answer."""
        if self.head_end >= 0 and self.until_close:
            self.body = bytes(buf[self.head_end :])
            self.keep_alive = False
            return True
        return False

    def _head(self, buf: bytearray) -> bool:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HttpError(f"response head over {MAX_HEAD} bytes")
                return False
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise HttpError(f"malformed status line {lines[0][:100]!r}")
            status = int(code)
            if 100 <= status < 200:
                del buf[: end + 4]  # an interim answer (100 Continue): the real one follows
                continue
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise HttpError(f"malformed header line {line[:100]!r}")
                headers[name.strip().lower()] = value.strip()
            self.status = status
            self.head_end = end + 4
            connection = headers.get("connection", "").lower()
            self.keep_alive = version == "HTTP/1.1" and "close" not in connection
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.chunks = []
                self.chunk_at = self.head_end
            elif status in (204, 304):
                self.length = 0
            elif "content-length" in headers:
                value = headers["content-length"]
                if not value.isdigit():
                    raise HttpError(f"malformed Content-Length {value[:40]!r}")
                self.length = int(value)
            else:
                self.until_close = True
            return True

    def _chunked(self, buf: bytearray) -> bool:
        chunks = self.chunks
        assert chunks is not None
        while True:
            line_end = buf.find(b"\r\n", self.chunk_at)
            if line_end < 0:
                return False
            size_text = bytes(buf[self.chunk_at : line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(f"malformed chunk size {size_text[:40]!r}") from None
            start = line_end + 2
            if size == 0:
                # The last chunk, then trailer lines up to an empty one.
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    if len(buf) - line_end > MAX_HEAD:
                        raise HttpError(f"chunked trailer over {MAX_HEAD} bytes")
                    return False
                self.body = b"".join(chunks)
                if len(buf) > trailer_end + 4:
                    self.keep_alive = False
                return True
            if len(buf) < start + size + 2:
                return False
            if buf[start + size : start + size + 2] != b"\r\n":
                raise HttpError("chunk not followed by CRLF")
            chunks.append(bytes(buf[start : start + size]))
            self.chunk_at = start + size + 2


class _Connection(asyncio.Protocol):
    """One persistent connection: one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._response: _Response | None = None
        self._waiter: asyncio.Future[_Response] | None = None
        self._received = False

    # --- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, but has its methods).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._response is None:
            # Nothing asked: a server must not send (and the connection can no longer be trusted).
            self.close()
            return
        self._received = True
        self._buf += data
        try:
            done = self._response.feed(self._buf)
        except HttpError as e:
            self._fail(e)
            return
        if done:
            self._finish()

    def eof_received(self) -> bool:
        if self._response is not None and self._response.eof(self._buf):
            self._finish()
        self.closed = True
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or HttpError("the server closed the connection before its answer ended"))

    # --- exchanges --------------------------------------------------------------------------------------

    def _finish(self) -> None:
        response, waiter = self._response, self._waiter
        self._response = self._waiter = None
        self._buf = bytearray()
        if waiter is not None and not waiter.done() and response is not None:
            waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter, self._response = self._waiter, None, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def received_any(self) -> bool:
        return self._received

    async def exchange(self, head: bytes, body: Body) -> _Response:
        """Writes one request and waits for its whole answer."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            raise HttpError("connection closed")
        self._received = False
        self._response = _Response()
        self._waiter = asyncio.get_running_loop().create_future()
        transport.write(head)
        if len(body):
            transport.write(body)
        return await self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpClient:
    """POSTs to one endpoint (`url`: scheme, host, port; its path is the path posted to) over a small pool."""

    def __init__(self, url: str, *, max_connections: int, timeout_s: float, connect_timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint must be an http:// or https:// URL with a host, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path or "/"
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._timeout = timeout_s
        self._connect_timeout = min(connect_timeout_s, timeout_s)
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    def head(self, headers: Mapping[str, str], length: int) -> bytes:
        """The request head: the signer's headers (Host among them) and the body's length."""
        lines = [f"POST {self.path} HTTP/1.1"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {length}")
        lines.append(USER_AGENT)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def post(self, headers: Mapping[str, str], body: Body) -> tuple[int, bytes]:
        """One POST; returns the answer's status and body. Raises `OSError` (`HttpError`) or `TimeoutError`."""
        head = self.head(headers, len(body))
        async with self._slots, asyncio.timeout(self._timeout):
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._exchange(conn, head, body)
                except OSError:
                    if conn.received_any():
                        raise
                    # The server closed an idle connection as the request went out: nothing of it was answered,
                    # so nothing was processed. Once more, on a new connection.
            return await self._exchange(await self._connect(), head, body)

    async def _exchange(self, conn: _Connection, head: bytes, body: Body) -> tuple[int, bytes]:
        try:
            response = await conn.exchange(head, body)
        except BaseException:
            self._drop(conn)
            raise
        if response.keep_alive and not conn.closed:
            self._idle.append(conn)
        else:
            self._drop(conn)
        return response.status, response.body

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._drop(conn)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, conn = await loop.create_connection(
                _Connection, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
            )
        self._open.add(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def close(self) -> None:
        """Closes every connection."""
        for conn in list(self._open):
            self._drop(conn)
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks
