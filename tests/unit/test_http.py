"""The lean HTTP/1.1 client of the Kinesis data plane (`treasure_engine._http`), against real servers on
127.0.0.1 that answer as each case needs: framing (Content-Length, chunked, until close), connection reuse and
its limits, a server that closes an idle connection, malformed answers and timeouts."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from treasure_engine._http import HttpClient, HttpError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A TCP server on 127.0.0.1 that hands each connection to `handler`; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request's body (None when the client closed instead)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    s = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = s.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        s.close()


@asynccontextmanager
async def connected(
    handler: Handler, *, max_connections: int = 4, timeout_s: float = 5.0
) -> AsyncIterator[tuple[Server, HttpClient]]:
    """A server running `handler`, and a client of it; the client's connections are closed at the end."""
    async with serving(handler) as server:
        http = HttpClient(
            f"http://127.0.0.1:{server.port}/",
            max_connections=max_connections,
            timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
        )
        try:
            yield server, http
        finally:
            await http.close()


HEADERS = {"Host": "127.0.0.1", "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Kinesis_20131202.X"}


def answer(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def echo_sha(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    """Keep-alive: answers each request with the SHA-256 of its body."""
    while (body := await server.read_request(reader)) is not None:
        writer.write(answer(hashlib.sha256(body).hexdigest().encode()))
        await writer.drain()


async def test_bodies_arrive_whole_and_the_connection_is_reused() -> None:
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB: many partial socket writes
    async with connected(echo_sha) as (server, http):
        for body in (b"", b"{}", memoryview(big)):
            status, payload = await http.post(HEADERS, body)
            assert status == 200
            assert payload == hashlib.sha256(body).hexdigest().encode()
    assert server.connections == 1
    head = server.requests[1].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST / HTTP/1.1\r\n")
    assert "Content-Length: 2" in head
    assert "X-Amz-Target: Kinesis_20131202.X" in head


async def test_concurrent_posts_keep_within_max_connections() -> None:
    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while (body := await server.read_request(reader)) is not None:
            await asyncio.sleep(0.02)
            writer.write(answer(body))
            await writer.drain()

    async with connected(slow_echo, max_connections=2) as (server, http):
        results = await asyncio.gather(*(http.post(HEADERS, str(i).encode()) for i in range(10)))
    assert sorted(p for _, p in results) == sorted(str(i).encode() for i in range(10))
    assert server.most_open <= 2
    assert server.connections == 2


async def test_chunked_answers_are_decoded() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.read_request(reader) is not None:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            # Written in pieces that cut the chunk-size lines and the data.
            for piece in (head + b"5;ext=1\r\nhel", b"lo\r\n", b"6\r", b"\n world\r\n0\r\nX-Trailer: t\r\n", b"\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.005)

    async with connected(chunked) as (server, http):
        assert await http.post(HEADERS, b"a") == (200, b"hello world")
        assert await http.post(HEADERS, b"b") == (200, b"hello world")
    assert server.connections == 1


async def test_an_answer_that_ends_with_the_connection_is_read_and_not_reused() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 500 Internal Server Error\r\n\r\n{"__type":"InternalFailure"}')
        await writer.drain()
        writer.close()

    async with connected(until_close) as (server, http):
        for _ in range(2):
            assert await http.post(HEADERS, b"x") == (500, b'{"__type":"InternalFailure"}')
    assert server.connections == 2


async def test_connection_close_is_honoured_and_an_interim_answer_skipped() -> None:
    async def close_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"ok", extra="Connection: close\r\n"))
            await writer.drain()

    async with connected(close_after) as (server, http):
        for _ in range(3):
            assert await http.post(HEADERS, b"x") == (200, b"ok")
    assert server.connections == 3


async def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        # Keep-alive promised, then the connection closed while idle (a server's idle timeout).
        await server.read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()

    async with connected(one_per_connection) as (server, http):
        assert await http.post(HEADERS, b"1") == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await http.post(HEADERS, b"2") == (200, b"ok")
    assert server.connections == 2


async def test_a_reused_connection_closed_unanswered_is_retried_once_a_fresh_one_is_not() -> None:
    async def drop_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        # Answers the first request of its connection; reads the second and closes without a word (the race of an
        # idle timeout with a request on its way).
        await server.read_request(reader)
        if len(server.requests) > 1 and server.connections == 1:
            return
        writer.write(answer(b"ok"))
        await writer.drain()
        await server.read_request(reader)

    async with connected(drop_second) as (server, http):
        assert await http.post(HEADERS, b"1") == (200, b"ok")
        assert await http.post(HEADERS, b"2") == (200, b"ok")
    assert server.connections == 2
    assert len(server.requests) == 3  # the dropped one went again, on a new connection

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)

    async with connected(never_answer) as (server, http):
        with pytest.raises(HttpError):
            await http.post(HEADERS, b"1")
    assert server.connections == 1  # a fresh connection's failure is the caller's to retry


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2xx OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ],
)
async def test_malformed_or_cut_answers_raise(raw: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(raw)
        await writer.drain()

    async with connected(bad) as (_, http):
        with pytest.raises(HttpError):
            await http.post(HEADERS, b"x")


async def test_a_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    async with connected(silent, timeout_s=0.2) as (_, http):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await http.post(HEADERS, b"x")
        assert loop.time() - started < 2


def test_bad_urls_and_header_values_are_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        HttpClient("ftp://example.com/", max_connections=1, timeout_s=1, connect_timeout_s=1)
    http = HttpClient("https://kinesis.us-east-1.amazonaws.com/", max_connections=1, timeout_s=1, connect_timeout_s=1)
    assert http.port == 443
    with pytest.raises(ValueError, match="line break"):
        http.head({"X-Amz-Security-Token": "abc\r\nInjected: 1"}, 0)


def test_it_runs_on_uvloop() -> None:
    # The producer's loop thread runs uvloop, whose transports are not asyncio.Transport subclasses.
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_bodies_arrive_whole_and_the_connection_is_reused())
        runner.run(test_an_idle_connection_the_server_closed_is_replaced())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (an IP SAN) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_https_verifies_the_server_and_carries_the_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    server = Server(echo_sha)
    s = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_ctx)
    port = s.sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{port}/"
    try:
        # Not trusted: the system's roots do not hold this certificate.
        untrusting = HttpClient(url, max_connections=1, timeout_s=5, connect_timeout_s=5)
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusting.post(HEADERS, b"x")
        await untrusting.close()
        # Trusted through the standard OpenSSL variable, which the default context reads.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        http = HttpClient(url, max_connections=1, timeout_s=5, connect_timeout_s=5)
        try:
            body = memoryview(bytes(range(256)) * 4096)  # 1 MiB through TLS records
            for _ in range(2):
                assert await http.post(HEADERS, body) == (200, hashlib.sha256(body).hexdigest().encode())
        finally:
            await http.close()
    finally:
        s.close()
    assert server.connections == 1  # both posts on one connection (the refused handshake never reached a handler)
