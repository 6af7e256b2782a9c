"""A counting HTTP proxy for DynamoDB's JSON protocol, for the benchmarks (group "e2e_consume_steady").

    with CountingProxy(moto.endpoint_url) as proxy:
        ConsumerConfig(..., dynamodb_endpoint_url=proxy.endpoint_url)
        ...
        proxy.calls()  # [Call(t, op, shard, kind, status), ...]

It sits on 127.0.0.1 between a client and a DynamoDB endpoint and forwards every request unchanged (method,
path, headers, body; the signature covers the proxy's host, which emulators do not check), so it counts what
was sent independently of the client's own statistics. Each call is recorded with the monotonic time it
arrived (``time.monotonic()``: CLOCK_MONOTONIC, shared by every process of the machine), the operation from
``X-Amz-Target`` (``DynamoDB_20120810.UpdateItem`` -> ``UpdateItem``), the shard the body names (a lease
table keyed by shard id: the first ``shardId-...`` in the body), what an ``UpdateItem`` does to a lease
(``kind``, from its UpdateExpression: ``checkpoint``, ``renew``, ``take``, ``release``, else ``other``) and
the upstream's HTTP status.

Standard library only (http.server, http.client), in a thread of the calling process.
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

WRITES = frozenset({"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"})
READS = frozenset({"GetItem", "Scan", "Query", "BatchGetItem", "TransactGetItems", "DescribeTable"})
_SHARD = re.compile(rb"shardId-[0-9A-Za-z-]+")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)


@dataclass(frozen=True, slots=True)
class Call:
    t: float  # time.monotonic() when the request arrived
    op: str  # from X-Amz-Target, e.g. "UpdateItem"
    shard: str | None  # the shard id the body names, if any
    kind: str | None  # UpdateItem only: checkpoint, renew, take, release or other
    status: int  # the upstream's HTTP status (502: the upstream could not be reached)

    @property
    def write(self) -> bool:
        return self.op in WRITES


def update_kind(body: bytes) -> str:
    """What an UpdateItem on a lease does, from its UpdateExpression (treasure_engine's lease table)."""
    try:
        expr = json.loads(body).get("UpdateExpression", "")
    except ValueError:
        return "other"
    if "REMOVE" in expr:
        return "release"
    if "#cp" in expr or "checkpoint" in expr:
        return "checkpoint"
    if "#o = :me" in expr:
        return "take"
    if "+ :one" in expr:
        return "renew"
    return "other"


class CountingProxy:
    """Forwards HTTP requests to ``upstream_url`` and records each one as a `Call`."""

    def __init__(self, upstream_url: str) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or parsed.hostname is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self._upstream = (parsed.hostname, parsed.port or 80)
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

            def do_POST(self) -> None:
                proxy._forward(self)

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="bench-counting-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(*self._upstream, timeout=30)
        return conn

    def _forward(self, h: http.server.BaseHTTPRequestHandler) -> None:
        t = time.monotonic()
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        target = h.headers.get("X-Amz-Target", "")
        op = target.rsplit(".", 1)[-1] if target else f"{h.command} {h.path}"
        found = _SHARD.search(body)
        shard = found.group().decode() if found else None
        kind = update_kind(body) if op == "UpdateItem" else None
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = f"{self._upstream[0]}:{self._upstream[1]}"
        status, reply, reply_headers = 502, b"", [("Content-Type", "text/plain")]
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile: reconnect once
            conn = self._connection()
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                resp = conn.getresponse()
                status, reply = resp.status, resp.read()
                reply_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._local.conn = None
                reply = f"counting proxy: upstream failed: {e!r}".encode()
                if attempt == 2:
                    status = 502
        with self._lock:
            self._calls.append(Call(t, op, shard, kind, status))
        h.send_response(status)
        for k, v in reply_headers:
            if k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(reply)))
        h.end_headers()
        h.wfile.write(reply)
