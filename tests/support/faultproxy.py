"""A fault-injecting HTTP reverse proxy between a Kinesis client and a real Kinesis endpoint
(kinesalite in the tests). Neither emulator throttles or fails records; this proxy does, and the
records it reports as failed are really withheld: they never reach the upstream.

Requests are forwarded unchanged: method, path, query, every header (SigV4 ones and the original
``Host`` too: rewriting Host would break signature verification upstream) and the body bytes, except
hop-by-hop headers. Responses come back unchanged (no decompression). The one exception is a
``Kinesis_20131202.PutRecords`` request while ``fail_fraction > 0``: the proxy parses the JSON body,
picks a random subset of the records (seedable RNG), forwards only the others in a rebuilt JSON body
(whose signature no longer matches; kinesalite and moto never check signatures), and splices the
upstream's per-record results back into a full-length response in the original order, with
``{"ErrorCode": fail_error_code, "ErrorMessage": "Rate exceeded for shard ..."}`` entries for the
withheld records and the right ``FailedRecordCount``.

Fault settings, switchable at runtime from any thread (plain attribute writes, or ``set(**kw)``):

- ``fail_fraction``: 0..1, per-record failures of PutRecords (and whole-request throttling of
  PutRecord with that probability).
- ``fail_error_code``: ErrorCode of withheld records (ProvisionedThroughputExceededException).
- ``stall``: False; True or "before" holds matching requests before forwarding them until unstalled
  (then they are forwarded if the client is still connected, else dropped unforwarded);
  "after" forwards them (records are written) and withholds the response until unstalled (the
  ambiguous timeout case: a retry writes duplicates).
- ``down``: False; True or "503" answers 503 ServiceUnavailable; "reset" closes the connection
  without an answer. (For connection refused: ``stop()`` then ``start()`` again; the port is kept.)
- ``throttle_all``: whole requests get HTTP 400 ProvisionedThroughputExceededException.
- ``throttle_fraction``: the same for a random fraction of requests.
- ``error_status``: None or an HTTP status (500 -> InternalFailure, 503 -> ServiceUnavailable, others
  InternalFailure) for whole requests.
- ``latency``: seconds added before forwarding.
- ``body_fault``: None, or how the answer's body is damaged: "garbage" (200 with random bytes),
  "truncated" (200 with the first half of the upstream's body, a complete HTTP message), "midbody_reset"
  (the upstream's status and full Content-Length, half the body, then the connection reset) or
  "oversized" (200 with ``oversized_bytes`` of a JSON document that never ends); "mixed": those four in turn,
  one per damaged answer.
- ``body_fault_fraction``: 1.0; the share of matching requests whose answer is damaged.
- ``body_fault_forward``: True: the request reaches the upstream first (records are written, so a retry
  writes duplicates: the ambiguous case); False: it never does.
- ``oversized_bytes``: 16 MiB.
- ``fault_targets``: None (all) or a set of X-Amz-Target operation names, e.g. {"PutRecords"} or
  {"Kinesis_20131202.PutRecords"}, that stall/down/throttle/error/body_fault apply to (fail_fraction
  always applies to PutRecords/PutRecord only).

Counters (read them under ``snapshot()`` for a consistent view): ``requests`` (Counter by X-Amz-Target
operation, every request seen), ``faults`` (Counter by fault kind), ``records_forwarded`` (PutRecords/
PutRecord records sent upstream), ``records_withheld`` and ``withheld`` (the withheld entries as JSON
dicts: PartitionKey, Data base64, ...), ``passthrough_unparsed`` (PutRecords that could not be
parsed, e.g. CBOR, and went through untouched).

``FaultProxy`` is asyncio (``await start()`` / ``await stop()``, in the caller's loop);
``ThreadedFaultProxy`` runs one in a background thread with its own loop (sync ``start()``/``stop()``,
context manager) for threads and sync tests, and delegates the settings and counters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import random
import threading
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

TARGET_PREFIX = "Kinesis_20131202."
JSON_TYPES = ("application/x-amz-json-1.1", "application/x-amz-json-1.0", "application/json")
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Trailers",
        "Transfer-Encoding", "Upgrade", "Content-Length", "Expect",
    )
)  # fmt: skip
SETTINGS = (
    "fail_fraction",
    "fail_error_code",
    "stall",
    "down",
    "throttle_all",
    "throttle_fraction",
    "error_status",
    "latency",
    "fault_targets",
    "body_fault",
    "body_fault_fraction",
    "body_fault_forward",
    "oversized_bytes",
)
BODY_FAULTS = ("garbage", "truncated", "midbody_reset", "oversized")
"""The ways `body_fault` damages an answer (besides "mixed": any of them)."""
AMZ_JSON = "application/x-amz-json-1.1"


def _op(target: str) -> str:
    return target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else target


class FaultProxy:
    """See the module doc. ``FaultProxy(upstream_url, *, port=0, seed=None)``."""

    def __init__(self, upstream_url: str, *, host: str = "127.0.0.1", port: int = 0, seed: int | None = None):
        self.upstream_url = upstream_url.rstrip("/")
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._inflight: set[asyncio.Task[Any]] = set()
        self._mixed = 0
        self.reset_faults()
        self.reset_counters()

    # ---- settings / counters ------------------------------------------------------------

    def reset_faults(self) -> None:
        with self._lock:
            self.fail_fraction: float = 0.0
            self.fail_error_code: str = "ProvisionedThroughputExceededException"
            self.stall: bool | str = False
            self.down: bool | str = False
            self.throttle_all: bool = False
            self.throttle_fraction: float = 0.0
            self.error_status: int | None = None
            self.latency: float = 0.0
            self.fault_targets: set[str] | None = None
            self.body_fault: str | None = None
            self.body_fault_fraction: float = 1.0
            self.body_fault_forward: bool = True
            self.oversized_bytes: int = 16 * 1024 * 1024

    def set(self, **settings: Any) -> None:
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise TypeError(f"unknown fault settings {sorted(unknown)}; known: {SETTINGS}")
        if settings.get("body_fault") not in (None, "mixed", *BODY_FAULTS):
            raise ValueError(f"body_fault must be None, 'mixed' or one of {BODY_FAULTS}")
        with self._lock:
            for k, v in settings.items():
                setattr(self, k, v)

    def seed(self, seed: int | None) -> None:
        with self._lock:
            self._rng.seed(seed)

    def reset_counters(self) -> None:
        with self._lock:
            self.requests: collections.Counter[str] = collections.Counter()
            self.faults: collections.Counter[str] = collections.Counter()
            self.records_forwarded = 0
            self.records_withheld = 0
            self.withheld: list[dict[str, Any]] = []
            self.passthrough_unparsed = 0

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the counters."""
        with self._lock:
            return {
                "requests": collections.Counter(self.requests),
                "faults": collections.Counter(self.faults),
                "records_forwarded": self.records_forwarded,
                "records_withheld": self.records_withheld,
                "withheld": list(self.withheld),
                "passthrough_unparsed": self.passthrough_unparsed,
            }

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._closing = False
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=256),
        )

    async def stop(self) -> None:
        self._closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- request handling -------------------------------------------------------------------

    def _applies(self, op: str) -> bool:
        targets = self.fault_targets
        return targets is None or op in targets or (TARGET_PREFIX + op) in targets

    @staticmethod
    def _error(status: int, type_: str, message: str) -> web.Response:
        body = json.dumps({"__type": type_, "message": message}).encode()
        return web.Response(status=status, body=body, headers={"Content-Type": AMZ_JSON, "x-amzn-ErrorType": type_})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = request.headers.get("X-Amz-Target", "")
        op = _op(target)
        body = await request.read()
        with self._lock:
            self.requests[op or f"{request.method} {request.path}"] += 1
            applies = self._applies(op)
            down, stall, throttle_all = self.down, self.stall, self.throttle_all
            error_status, latency = self.error_status, self.latency
            throttled = applies and (
                throttle_all or (self.throttle_fraction > 0 and self._rng.random() < self.throttle_fraction)
            )
            # The RNG is drawn only while a body fault is set: seeded runs without one go as before.
            body_fault = self.body_fault if applies else None
            if body_fault is not None and self._rng.random() >= self.body_fault_fraction:
                body_fault = None
            if body_fault == "mixed":
                body_fault = BODY_FAULTS[self._mixed % len(BODY_FAULTS)]
                self._mixed += 1

        if applies and down:
            with self._lock:
                self.faults["down"] += 1
            if down == "reset":
                return self._abort(request)
            return self._error(503, "ServiceUnavailable", "Service Unavailable (fault proxy down)")
        if throttled:
            with self._lock:
                self.faults["throttle"] += 1
            return self._error(400, "ProvisionedThroughputExceededException", "Rate exceeded")
        if applies and error_status:
            with self._lock:
                self.faults[f"status_{error_status}"] += 1
            type_ = "ServiceUnavailable" if error_status == 503 else "InternalFailure"
            return self._error(int(error_status), type_, f"{type_} (fault proxy)")
        if applies and stall and stall != "after":
            with self._lock:
                self.faults["stall"] += 1
            await self._wait_unstalled(applies)
            if self._closing or request.transport is None or request.transport.is_closing():
                return self._abort(request)  # client gone (or proxy stopping): never forwarded
        if latency:
            await asyncio.sleep(latency)
        if body_fault is not None:
            return await self._damaged(request, body, body_fault)

        if op == "PutRecords" and self.fail_fraction > 0:
            resp = await self._put_records_with_failures(request, body)
        elif op == "PutRecord" and self.fail_fraction > 0:
            resp = await self._put_record_with_failures(request, body)
        else:
            resp = await self._forward(request, body)
            if op in ("PutRecords", "PutRecord"):
                n = self._count_records(op, request, body)
                with self._lock:
                    self.records_forwarded += n

        if applies and self.stall == "after":
            with self._lock:
                self.faults["stall_after"] += 1
            await self._wait_unstalled(applies)
            if self._closing:
                return self._abort(request)
        return resp

    async def _damaged(self, request: web.Request, body: bytes, fault: str) -> web.StreamResponse:
        """An answer with a damaged body (see ``body_fault``); the request reaches the upstream first when
        ``body_fault_forward`` is set."""
        with self._lock:
            self.faults[fault] += 1
            forward = self.body_fault_forward
            garbage = self._rng.randbytes(self._rng.randint(1, 4096))
            oversized = self.oversized_bytes
        up = await self._forward(request, body) if forward else None
        if up is not None and forward:
            op = _op(request.headers.get("X-Amz-Target", ""))
            if op in ("PutRecords", "PutRecord") and up.status == 200:
                with self._lock:
                    self.records_forwarded += self._count_records(op, request, body)
        upstream_body = up.body if up is not None and isinstance(up.body, bytes) else b'{"Records":[]}'
        if fault == "garbage":
            return web.Response(status=200, body=garbage, headers={"Content-Type": AMZ_JSON})
        if fault == "truncated":
            return web.Response(
                status=200, body=upstream_body[: len(upstream_body) // 2], headers={"Content-Type": AMZ_JSON}
            )
        resp = web.StreamResponse(status=200 if fault == "oversized" else (up.status if up is not None else 200))
        resp.content_type = AMZ_JSON
        if fault == "midbody_reset":
            resp.content_length = len(upstream_body)
            await resp.prepare(request)
            await resp.write(upstream_body[: len(upstream_body) // 2])
            return self._abort(request)
        resp.content_length = oversized
        await resp.prepare(request)
        chunk = b'{"Records":[' + b'{"SequenceNumber":"1","ShardId":"shardId-000000000000"},' * 1000
        sent = 0
        try:
            while sent < oversized:
                piece = chunk[: oversized - sent]
                await resp.write(piece)
                sent += len(piece)
        except (ConnectionError, RuntimeError):
            return resp  # the client gave up reading: what it should do
        await resp.write_eof()
        return resp

    @staticmethod
    def _abort(request: web.Request) -> web.Response:
        """Close the client's connection without an answer."""
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)  # written nowhere: the transport is gone

    async def _wait_unstalled(self, applies: bool) -> None:
        # Polling: the settings are plain attributes written from any thread.
        while applies and self.stall and not self._closing:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    def _count_records(self, op: str, request: web.Request, body: bytes) -> int:
        if op == "PutRecord":
            return 1
        if request.content_type not in JSON_TYPES:
            return 0
        try:
            return len(json.loads(body).get("Records", ()))
        except ValueError:
            return 0

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        url = self.upstream_url + request.rel_url.raw_path_qs
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            # BytesIO: aiohttp warns (ResourceWarning) on raw bodies over 1 MiB, and warnings are errors here.
            data=io.BytesIO(body),
            skip_auto_headers=("Content-Type", "User-Agent"),
        ) as up:
            data = await up.read()
            out_headers = [(k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP]
            return web.Response(status=up.status, body=data, headers=out_headers)

    async def _put_record_with_failures(self, request: web.Request, body: bytes) -> web.Response:
        with self._lock:
            fail = self._rng.random() < self.fail_fraction
            if fail:
                self.records_withheld += 1
                self.faults["record_withheld"] += 1
                with contextlib.suppress(ValueError):
                    self.withheld.append(json.loads(body))
        if fail:
            return self._error(400, "ProvisionedThroughputExceededException", "Rate exceeded for shard (fault proxy)")
        resp = await self._forward(request, body)
        with self._lock:
            self.records_forwarded += 1
        return resp

    @staticmethod
    def _parse_put_records(request: web.Request, body: bytes) -> tuple[Any, list[Any] | None]:
        """(payload, records), or (reason, None) when the body is not a JSON PutRecords (e.g. CBOR)."""
        if request.content_type not in JSON_TYPES:
            return f"content type {request.content_type}", None
        try:
            payload = json.loads(body)
        except ValueError as e:
            return str(e), None
        records = payload.get("Records") if isinstance(payload, dict) else None
        if not isinstance(records, list):
            return "no Records list", None
        return payload, records

    async def _put_records_with_failures(self, request: web.Request, body: bytes) -> web.Response:
        payload, records = self._parse_put_records(request, body)
        if records is None:
            log.warning("fault proxy: PutRecords not parsed (%s); forwarded untouched", payload)
            with self._lock:
                self.passthrough_unparsed += 1
            return await self._forward(request, body)

        n = len(records)
        with self._lock:
            fail_fraction = self.fail_fraction
            error_code = self.fail_error_code
            failed = {i for i in range(n) if self._rng.random() < fail_fraction}
        stream = payload.get("StreamName") or payload.get("StreamARN", "?")
        keep = [i for i in range(n) if i not in failed]

        if keep:
            sub = dict(payload)
            sub["Records"] = [records[i] for i in keep]
            up_resp = await self._forward(request, json.dumps(sub, separators=(",", ":")).encode())
            if up_resp.status != 200:
                # The whole (reduced) request failed upstream: pass that on; nothing was written.
                return up_resp
            assert isinstance(up_resp.body, bytes)
            up_payload = json.loads(up_resp.body)
            up_records = up_payload["Records"]
            if len(up_records) != len(keep):
                raise RuntimeError(f"upstream returned {len(up_records)} results for {len(keep)} records")
            content_type = up_resp.headers.get("Content-Type", AMZ_JSON)
        else:
            up_payload, up_records, content_type = {}, [], AMZ_JSON

        results: list[dict[str, Any]] = [{}] * n
        for i, r in zip(keep, up_records, strict=True):
            results[i] = r
        for i in failed:
            results[i] = {
                "ErrorCode": error_code,
                "ErrorMessage": f"Rate exceeded for shard in stream {stream} under account 000000000000.",
            }
        out = dict(up_payload)
        out["Records"] = results
        out["FailedRecordCount"] = sum(1 for r in results if "ErrorCode" in r)
        with self._lock:
            self.records_forwarded += len(keep)
            self.records_withheld += len(failed)
            self.faults["record_withheld"] += len(failed)
            self.withheld.extend(records[i] for i in sorted(failed))
        return web.Response(
            status=200,
            body=json.dumps(out, separators=(",", ":")).encode(),
            headers={"Content-Type": content_type},
        )


class ThreadedFaultProxy:
    """A FaultProxy in a background thread with its own event loop, for sync code and threads.

    ``ThreadedFaultProxy(upstream_url, *, port=0, seed=None)``; sync ``start()`` / ``stop()``; context
    manager; settings, counters, ``set()``, ``snapshot()``, ``reset_faults()``, ``reset_counters()``,
    ``seed()`` and ``endpoint_url`` are the inner proxy's (``.proxy``). Settings are plain attribute
    writes, safe from any thread.
    """

    def __init__(self, upstream_url: str, *, host: str = "127.0.0.1", port: int = 0, seed: int | None = None):
        object.__setattr__(self, "proxy", FaultProxy(upstream_url, host=host, port=port, seed=seed))
        object.__setattr__(self, "_loop", None)
        object.__setattr__(self, "_thread", None)

    def start(self, timeout: float = 10.0) -> ThreadedFaultProxy:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.proxy.start())
            except BaseException as e:
                error.append(e)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.proxy.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=f"fault-proxy->{self.proxy.upstream_url}", daemon=True)
        object.__setattr__(self, "_loop", loop)
        object.__setattr__(self, "_thread", thread)
        thread.start()
        if not started.wait(timeout):
            raise TimeoutError("fault proxy did not start")
        if error:
            raise error[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        object.__setattr__(self, "_loop", None)
        object.__setattr__(self, "_thread", None)
        self.proxy._closing = True  # release stalled handlers at once
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> ThreadedFaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.proxy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SETTINGS:
            self.proxy.set(**{name: value})
        else:
            object.__setattr__(self, name, value)
