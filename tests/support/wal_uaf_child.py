"""A stress run for `submit_many` under `durability="wal"` and `overflow="block"` while other threads change the
lists it reads: run with ``PYTHONMALLOC=debug`` so that freed memory is overwritten (0xDD) as it is freed, and
any read of an object after its last reference went away shows up as bytes nobody submitted.

    PYTHONMALLOC=debug python -m tests.support.wal_uaf_child WAL_DIR

Submitter threads push lists of unique ``(bytes, str)`` events into a tiny ring, so each blocks for room again
and again; mutator threads meanwhile clear the lists or replace their tails with new events (and allocate
same-sized decoys that are never submitted), freeing the items a blocked submitter was pushing. A drainer takes
sealed requests without answering them, so the ring frees room but the WAL keeps every frame. Then a second
pipeline on the same directory replays the WAL. Prints one JSON line: what was accepted, what the ring sent
and what the WAL replayed, and every event among them that was never submitted.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import sys
import threading
import time
from typing import Any

import orjson
from tests.unit.fake_kinesis import FAST, even_shards

from treasure_engine import _core

SIZE = 200
SUBMITTERS = 3
MUTATORS = 2
ROUNDS = 40
PER_LIST = 150
MAGIC = b"EVT!"


def event(n: int) -> tuple[bytes, str]:
    """Event `n`: its id in the first bytes of `SIZE` bytes, and a key built at run time (not interned)."""
    return MAGIC + struct.pack(">Q", n) + bytes([n % 251]) * (SIZE - 12), f"key-{n}"


def check(data: bytes, key: str, valid: set[int]) -> str | None:
    """Why (data, key) is not an event that was put in a list; None when it is one."""
    if len(data) != SIZE or not data.startswith(MAGIC):
        return f"foreign data {data[:16]!r}... ({len(data)} bytes), key {key[:16]!r}"
    n = struct.unpack(">Q", data[4:12])[0]
    if n not in valid:
        return f"unknown id {n}"
    if (data, key) != event(n):
        return f"event {n} damaged: data {data[:16]!r}..., key {key[:16]!r}"
    return None


def wal_event(frame: bytes) -> tuple[bytes, str]:
    """The data and key of a WAL frame: the ring's event layout (time, key length, flags; key; data)."""
    key_len = int.from_bytes(frame[8:10], "little")
    assert frame[10] == 0, "no explicit hash key, no WAL field in a frame"
    return frame[16 + key_len :], frame[16 : 16 + key_len].decode("utf-8", "replace")


def main(wal_dir: str) -> None:
    shards = even_shards(1)
    options: dict[str, Any] = {
        **FAST,
        "ring_bytes": 16384,
        "max_record_bytes": 1024,
        "max_request_bytes": 1024,
        "max_buffered_bytes": 2048,
        "max_ready_requests": 1,
        "aggregate": False,
        "aggregation_max_bytes": 1024,
        "overflow": "block",
        "block_timeout_s": 10.0,
        "wal_fsync": "never",
    }
    p = _core.Pipeline("stream", shards, wal_dir=wal_dir, **options)

    valid: set[int] = set()  # ids only: keeping the objects would keep them alive
    ids = iter(range(10**9))
    ids_lock = threading.Lock()

    def fresh(count: int) -> list[tuple[bytes, str]]:
        with ids_lock:
            numbers = [next(ids) for _ in range(count)]
            valid.update(numbers)
        return [event(n) for n in numbers]

    lists: list[list[tuple[bytes, str]]] = [[] for _ in range(SUBMITTERS)]
    accepted = [0] * SUBMITTERS
    errors: list[str] = []
    done = threading.Event()

    def submitter(i: int) -> None:
        try:
            for _ in range(ROUNDS):
                items = fresh(PER_LIST)
                lists[i] = items
                del items  # only the list in `lists` holds the events now
                accepted[i] += p.submit_many(lists[i])
        except Exception as e:  # reported to the parent
            errors.append(repr(e))

    def mutator(seed: int) -> None:
        rng = random.Random(seed)
        decoys: list[bytes] = []
        while not done.is_set():
            target = lists[rng.randrange(SUBMITTERS)]
            if rng.random() < 0.5:
                target.clear()
            else:
                cut = rng.randrange(len(target) + 1)
                target[cut:] = fresh(rng.randrange(1, 8))
            # Same-sized objects that no list ever holds, to take the memory of what was just freed.
            decoys = [b"\xee" * SIZE for _ in range(8)]
            time.sleep(rng.uniform(0, 0.002))
        del decoys

    delivered: list[tuple[bytes, str]] = []

    def pump() -> int:
        """Answers every ready request with success, keeping what it carried (read leniently: a damaged key
        may not even be UTF-8)."""
        requests = p.poll(64)
        for r in requests:
            with memoryview(r) as view:
                records = json.loads(bytes(view).decode("utf-8", "replace"))["Records"]
            delivered.extend((base64.b64decode(rec["Data"]), rec["PartitionKey"]) for rec in records)
            results = [{"SequenceNumber": str(len(delivered)), "ShardId": shards[0][0]} for _ in records]
            p.complete(r, orjson.dumps({"FailedRecordCount": 0, "Records": results}))
        return len(requests)

    def drainer() -> None:
        while not done.is_set():
            if not pump():
                time.sleep(0.0005)

    submitters = [threading.Thread(target=submitter, args=(i,)) for i in range(SUBMITTERS)]
    others = [threading.Thread(target=mutator, args=(s,)) for s in range(MUTATORS)]
    drain = threading.Thread(target=drainer)
    for t in [*submitters, *others, drain]:
        t.start()
    for t in submitters:
        t.join()
    done.set()
    for t in [*others, drain]:
        t.join()
    p.begin_flush()
    deadline = time.monotonic() + 30
    while (p.stats()["in_flight"] or p.stats()["outstanding_requests"]) and time.monotonic() < deadline:
        if not pump():
            time.sleep(0.001)
    p.end_flush()
    stats = p.stats()
    p.shutdown(False)
    p.close_storage()
    delivered_bad = [why for data, key in delivered if (why := check(data, key, valid)) is not None]

    # Every frame the run wrote, read back from the closed WAL (its segments are never deleted at this size).
    frames = [payload for _, payload in _core.LogReader(wal_dir)]
    wal_bad = [why for f in frames if (why := check(*wal_event(f), valid)) is not None]
    report = {
        "accepted": sum(accepted),
        "delivered": len(delivered),
        "delivered_foreign": len(delivered_bad),
        "delivered_distinct": len(set(delivered)),
        "in_flight": stats["in_flight"],
        "wal_frames": len(frames),
        "wal_foreign": len(wal_bad),
        "wal_errors": stats["wal_errors"],
        "errors": errors,
        "examples": (delivered_bad + wal_bad)[:5],
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
