"""The producer's state and stats, the types of its `submit` methods, and `submit_waiting` for callers that
wait for room."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from treasure_engine.errors import ProducerClosed

if TYPE_CHECKING:
    pass


class ProducerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class ProducerStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counts of events (not Kinesis records, except `records_sent` and `requests`)."""

    accepted: int
    refused: int
    delivered: int
    dead_lettered: int
    in_flight: int
    retried: int
    throttled: int
    requests: int
    requests_failed: int
    records_sent: int
    ring_bytes_used: int
    buffered_bytes: int
    dead_letter_pending: int = 0
    """Dead letters not yet stored: non-zero for long means the dead-letter queue cannot be written (alert)."""
    dead_letter_write_failures: int = 0
    """Failed attempts to store dead letters (disk full, read-only); the letters are kept and retried."""
    spilled: int = 0
    """Events written to the spill (overflow="spill") because the ring was full."""
    spill_backlog_bytes: int = 0
    """Bytes in the spill not yet replayed into the batcher."""
    wal_recovered: int = 0
    """Events an earlier, crashed process accepted and this one replayed from the WAL."""
    shard_mismatches: int = 0
    """Kinesis records acknowledged in another shard than the one predicted: the shard map was stale (a reshard)."""
    wrong_shard_records: int = 0
    """Events sent again because their aggregate landed in a shard whose hash range does not hold all of them."""


class Submit(Protocol):
    def __call__(
        self,
        data: bytes | bytearray | memoryview,
        partition_key: str,
        /,
        explicit_hash_key: str | int | None = None,
    ) -> None: ...


class SubmitMany(Protocol):
    def __call__(self, records: Iterable[tuple[Any, ...]], /) -> int: ...


def not_running(*_args: Any, **_kwargs: Any) -> Any:
    raise ProducerClosed("producer is not running (call start() or use `async with`)")


async def submit_waiting(
    submit_many: SubmitMany,
    events: Sequence[tuple[Any, ...]],
    *,
    stop: asyncio.Event | None = None,
    pause_s: float = 0.01,
) -> tuple[int, int]:
    """Submits `events` in order through `submit_many` (a Producer's or an Engine's), yielding to the loop
    while the ring is full instead of dropping; gives up early only once `stop` is set. Returns (accepted, the
    number of waits for room)."""
    done = waits = 0
    while done < len(events):
        done += submit_many(events[done:] if done else events)
        if done < len(events):
            if stop is not None and stop.is_set():
                break
            waits += 1
            await asyncio.sleep(pause_s)
    return done, waits
