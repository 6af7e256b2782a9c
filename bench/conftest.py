"""Shared fixtures of the benchmarks (`make bench` runs them through bench/run.py).

Every benchmark carries ``@pytest.mark.bench``, sets ``benchmark.group`` and is parametrized over its peers,
so one group compares treasure_engine with its peer in the same run. Figures that are not times (per-event
nanoseconds, events/s, RSS) go into ``benchmark.extra_info``, where bench/run.py reads them back from the
``--benchmark-json`` file.

Fixtures
--------
submit_events (session)     10,000 ``(bytes, str)`` tuples: 100-byte payloads, 10,000 distinct keys.
canned_pipeline (module)    a started ``_core.Pipeline`` (64 MiB ring, 4 shards, no rate limit) whose
                            requests a background thread completes with a canned success response; the
                            ring has been warmed (more than its size pushed through). ``.drain()`` waits
                            until everything accepted is delivered. ``CannedPipeline(**options)`` passes
                            further keywords to ``_core.Pipeline`` (``wal_dir=...``, ``wal_fsync=...``).
child_env (session)         environment for child processes: fake AWS credentials, no proxy, and no
                            variable that could point a client at a real endpoint.

``filesystem(path)`` names the file system holding ``path``, for benchmarks whose cost depends on the disk.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support.emulators import FAKE_AWS_ENV, UNSET_AWS_ENV  # noqa: E402

from treasure_engine import _core  # noqa: E402

MiB = 1024 * 1024
STREAM = "bench"
EVENTS = 10_000
KEYS = 10_000
DATA_BYTES = 100
RING_BYTES = 64 * MiB
HASH_MAX = (1 << 128) - 1


def shard_list(n: int) -> list[tuple[str, int, int]]:
    """``n`` shards splitting the hash space evenly (the layout of rust/core/benches/batch.rs)."""
    step = HASH_MAX // n
    return [(f"shardId-{i:012d}", i * step, HASH_MAX if i == n - 1 else (i + 1) * step - 1) for i in range(n)]


def make_events(n: int) -> list[tuple[bytes, str]]:
    """``n`` events as in the criterion bench: 100-byte zero-padded payloads, keys from 10,000.

    Each event gets its own key object, allocated with it (as the criterion bench and most applications
    do): with 10,000 shared key objects read in the events' permuted order, every peer that reads its input
    pays a cache miss per key on a cold cache, which measures the heap layout rather than the library.
    """
    return [(f"{i:0>{DATA_BYTES}}".encode(), f"key-{(i * 7919) % KEYS}") for i in range(n)]


@pytest.fixture(scope="session")
def submit_events() -> list[tuple[bytes, str]]:
    events = make_events(EVENTS)
    assert all(len(d) == DATA_BYTES for d, _ in events)
    assert len({k for _, k in events}) == KEYS
    return events


def success_response(records: int) -> bytes:
    """A PutRecords 200 body accepting ``records`` records (empty ShardId: no shard-map check)."""
    one = '{"SequenceNumber":"49590338271490256608559692538361571095921575989136588898","ShardId":""}'
    return ('{"FailedRecordCount":0,"Records":[' + ",".join([one] * records) + "]}").encode()


def filesystem(path: Path) -> str:
    """The file system holding ``path``, as ``"ext4 (/dev/vda on /)"``, from /proc/self/mounts."""
    target = str(path.resolve())
    best = ("", "unknown", "unknown")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        device, mount, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, fstype, device)
    return f"{best[1]} ({best[2]} on {best[0]})"


def interleaved_rounds(
    benchmark: Any,
    runs: dict[str, Callable[[], None]],
    *,
    rounds: int,
    warmup_rounds: int,
    per_round: int,
    setup: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Times every peer side by side: one benchmark round runs one round of each peer, in an order that rotates
    (after the untimed ``setup``). Returns each peer's nanoseconds per item (``per_round`` items a round), one
    value per timed round, warm-up rounds left out, in round order, so callers can pair peers round by round.
    Peers measured one after the other would each meet a different stretch of this shared machine's noise."""
    per_item: dict[str, list[float]] = {p: [] for p in runs}
    order = list(runs)

    def one_round() -> None:
        order.append(order.pop(0))
        for peer in order:
            if setup is not None:
                setup()
            t0 = time.perf_counter_ns()
            runs[peer]()
            per_item[peer].append((time.perf_counter_ns() - t0) / per_round)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return {p: v[warmup_rounds:] for p, v in per_item.items()}


class CannedPipeline:
    """A started Pipeline plus a thread that plays Kinesis: it polls sealed requests and completes them."""

    def __init__(self, ring_bytes: int = RING_BYTES, shards: int = 4, **options: Any) -> None:
        """``options``: further keyword arguments of ``_core.Pipeline`` (``wal_dir``, ``wal_fsync``, ...)."""
        self.pipeline = _core.Pipeline(
            STREAM,
            shard_list(shards),
            ring_bytes=ring_bytes,
            # No shard rate limit: the batcher, not the simulated Kinesis quota, must keep the ring empty.
            shard_records_per_s=1e12,
            shard_bytes_per_s=1e15,
            linger_ms=1.0,
            **options,
        )
        self.ring_bytes = ring_bytes
        self._storage = options.get("wal_dir") is not None or options.get("spill_dir") is not None
        self._responses: dict[int, bytes] = {}
        self._stop = threading.Event()
        self.completed_requests = 0
        self._thread = threading.Thread(target=self._complete_forever, name="bench-completer", daemon=True)
        self._thread.start()

    def _complete_forever(self) -> None:
        p, fd = self.pipeline, self.pipeline.wakeup_fd()
        while not self._stop.is_set():
            select.select([fd], [], [], 0.01)
            self._complete(p.poll(64))
        self._complete(p.poll(1 << 20))

    def _complete(self, requests: list[_core.Request]) -> None:
        for req in requests:
            body = self._responses.get(req.records)
            if body is None:
                body = self._responses[req.records] = success_response(req.records)
            self.pipeline.complete(req, body)
            self.completed_requests += 1

    def drain(self, timeout: float = 30.0) -> None:
        """Waits (flushing: linger ignored) until every accepted event is delivered."""
        p = self.pipeline
        deadline = time.monotonic() + timeout
        p.begin_flush()
        try:
            while True:
                s = p.stats()
                if s["in_flight"] == 0 and s["ring_bytes_used"] == 0:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pipeline did not drain in {timeout}s: {s}")
                time.sleep(0.0002)
        finally:
            p.end_flush()

    def warm(self, events: list[tuple[bytes, str]]) -> int:
        """Pushes more than twice the ring's size through it, so its pages are faulted in before timing."""
        floor = sum(len(d) + len(k) for d, k in events)  # an event takes at least this much ring space
        pushed = 0
        while pushed < 2 * self.ring_bytes:
            accepted = self.pipeline.submit_many(events)
            if accepted != len(events):
                raise RuntimeError(f"ring refused events while warming ({accepted}/{len(events)})")
            pushed += floor
            self.drain()
        return pushed

    def close(self) -> None:
        self.drain()
        self._stop.set()
        self._thread.join(10)
        self.pipeline.shutdown(True)
        if self._storage:
            # As Producer.close does: nothing is held, so the whole WAL is acknowledged; then the directories
            # are written out and released.
            self.pipeline.finish_wal()
            self.pipeline.close_storage()


@pytest.fixture(scope="module")
def canned_pipeline(submit_events: list[tuple[bytes, str]]) -> Iterator[CannedPipeline]:
    cp = CannedPipeline()
    try:
        cp.warm(submit_events)
        yield cp
    finally:
        cp.close()


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET_AWS_ENV}
    env.update(FAKE_AWS_ENV)
    return env
