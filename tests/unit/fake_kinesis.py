"""An in-process fake Kinesis that drives `_core.Pipeline` deterministically: no network, no event loop.

It polls sealed requests, parses their PutRecords bodies, de-aggregates KPL records with `_core.kpl_decode`,
decides each record's fate with a `responder`, appends successful records to per-shard "streams" in response
order and answers with a PutRecords response through `pipeline.complete`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from treasure_engine import _core

MAX_HASH = 2**128 - 1
THROTTLED = "ProvisionedThroughputExceededException"

Shards = list[tuple[str, int, int]]


def shard_id(i: int) -> str:
    return f"shardId-{i:012d}"


def even_shards(n: int, *, first: int = 0) -> Shards:
    """`n` shards splitting the hash space evenly, as CreateStream does."""
    step = (MAX_HASH + 1) // n
    return [(shard_id(first + i), i * step, MAX_HASH if i == n - 1 else (i + 1) * step - 1) for i in range(n)]


def key_hash(key: str) -> int:
    """The hash key Kinesis routes a partition key by: MD5, big-endian."""
    return int.from_bytes(hashlib.md5(key.encode()).digest(), "big")


def route(shards: Shards, hash_key: int) -> str:
    """Id of the shard whose range holds `hash_key`."""
    for sid, start, end in shards:
        if start <= hash_key <= end:
            return sid
    raise AssertionError(f"hash key {hash_key} is in no shard of {shards}")


@dataclass(frozen=True)
class Event:
    """One user record: what `submit` took."""

    data: bytes
    key: str
    ehk: str | None = None

    @property
    def hash_key(self) -> int:
        return int(self.ehk) if self.ehk is not None else key_hash(self.key)


@dataclass(frozen=True)
class SentRecord:
    """One Kinesis record of a PutRecords body, with the user records it carries."""

    data: bytes
    key: str
    ehk: str | None
    aggregated: bool
    events: tuple[Event, ...]

    @property
    def hash_key(self) -> int:
        return int(self.ehk) if self.ehk is not None else key_hash(self.key)

    @property
    def cost(self) -> int:
        """What Kinesis counts against its limits: data plus partition key bytes."""
        return len(self.data) + len(self.key.encode())


def parse_records(body: bytes | memoryview) -> tuple[str, list[SentRecord]]:
    doc = orjson.loads(body)
    assert set(doc) == {"StreamName", "Records"}, doc.keys()
    out = []
    for r in doc["Records"]:
        assert set(r) <= {"Data", "PartitionKey", "ExplicitHashKey"}, r.keys()
        data = base64.b64decode(r["Data"], validate=True)
        key, ehk = r["PartitionKey"], r.get("ExplicitHashKey")
        if _core.kpl_is_aggregated(data):
            events = tuple(Event(d, k, e) for d, k, e in _core.kpl_decode(data))
            out.append(SentRecord(data, key, ehk, True, events))
        else:
            out.append(SentRecord(data, key, ehk, False, (Event(data, key, ehk),)))
    return doc["StreamName"], out


@dataclass
class Sent:
    """What the fake saw of one request."""

    id: int
    shard_ids: list[str]
    records: list[SentRecord]
    events_attr: int
    records_attr: int
    payload_bytes: int
    body_len: int


Responder = Callable[[SentRecord], str | None]
"""Returns an error code for a record that should fail, None to accept it."""


def accept_all(_: SentRecord) -> str | None:
    return None


@dataclass
class FakeKinesis:
    pipeline: _core.Pipeline
    shards: Shards
    responder: Responder = accept_all
    stream: str | None = None
    streams: dict[str, list[Event]] = field(default_factory=dict)
    delivered: list[Event] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    _seq: Iterable[int] = field(default_factory=lambda: itertools.count(1))

    def answer(self, request: _core.Request) -> tuple[int, int, int]:
        """Parses a request, decides every record and completes it."""
        with memoryview(request) as view:
            stream, records = parse_records(view)
        if self.stream is not None:
            assert stream == self.stream
        self.sent.append(
            Sent(
                request.id,
                list(request.shard_ids),
                records,
                request.events,
                request.records,
                request.payload_bytes,
                len(request),
            )
        )
        results: list[dict[str, Any]] = []
        failed = 0
        for rec in records:
            code = self.responder(rec)
            if code is None:
                sid = route(self.shards, rec.hash_key)
                self.streams.setdefault(sid, []).extend(rec.events)
                self.delivered.extend(rec.events)
                results.append({"SequenceNumber": str(next(self._seq)), "ShardId": sid})  # type: ignore[call-overload]
            else:
                failed += 1
                results.append({"ErrorCode": code, "ErrorMessage": "fake"})
        response = orjson.dumps({"FailedRecordCount": failed, "Records": results})
        return self.pipeline.complete(request, response)

    def pump(self, max_requests: int = 64) -> int:
        """Answers every ready request; returns how many there were."""
        requests = self.pipeline.poll(max_requests)
        for r in requests:
            self.answer(r)
        return len(requests)

    def run_until(self, done: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.pump() == 0:
                if time.monotonic() > deadline:
                    pytest.fail(f"timed out after {timeout}s waiting for {what}; stats {self.pipeline.stats()}")
                time.sleep(0.0005)

    def drain(self, *, timeout: float = 10.0) -> dict[str, int]:
        """Flushes: answers requests until nothing is in flight but unconfirmed dead letters."""
        self.pipeline.begin_flush()
        try:
            self.run_until(self.settled, timeout=timeout, what="the pipeline to drain")
        finally:
            self.pipeline.end_flush()
        return self.pipeline.stats()

    def settled(self) -> bool:
        s = self.pipeline.stats()
        return s["in_flight"] == s["dead_pending"] and s["outstanding_requests"] == 0


FAST: dict[str, Any] = {
    "linger_ms": 2.0,
    "ring_bytes": 1 << 20,
    "max_record_bytes": 64 * 1024,
    "max_request_bytes": 1 << 20,
    "aggregation_max_bytes": 16 * 1024,
    "shard_records_per_s": 1e9,
    "shard_bytes_per_s": 1e12,
    "backoff_base_s": 0.0005,
    "backoff_max_s": 0.002,
}
"""Pipeline keywords for quick tests: small ring and records, no rate limit, tiny back-off."""
