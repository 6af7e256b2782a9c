"""Redrive: dead letters sent back to a stream through any `Submitter` (a started Producer is one), so that the
queue never imports the producer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from treasure_engine import _core
from treasure_engine.dlq._entries import ENCODER, DeadLetter, RedriveMark, RedriveReport


class _Stream(Protocol):
    @property
    def stream(self) -> str: ...


class _Counts(Protocol):
    @property
    def dead_lettered(self) -> int: ...


@runtime_checkable
class Submitter(Protocol):
    """What a redrive needs of a producer (`Producer` is one): its stream, `submit`, `flush` and the count of
    what it dead-lettered."""

    @property
    def config(self) -> _Stream: ...

    def submit(
        self, data: bytes | bytearray | memoryview, partition_key: str, explicit_hash_key: str | int | None = None, /
    ) -> None: ...

    async def flush(self, timeout: float | None = None) -> None: ...

    def stats(self) -> _Counts: ...


def target_name(target: Any) -> str:
    if isinstance(target, Submitter):
        return f"stream-{target.config.stream}"
    return f"handler-{getattr(target, '__qualname__', type(target).__name__)}"


async def send_through(producer: Submitter, batch: list[DeadLetter]) -> int:
    """Submits `batch` through `producer` and flushes; returns how many it dead-lettered again (those are new
    entries of the producer's own dead-letter queue: nothing is lost, and the originals count as redriven)."""
    before = producer.stats().dead_lettered
    for d in batch:
        while True:
            try:
                producer.submit(d.data, d.partition_key, d.explicit_hash_key)
                break
            except _core.BufferFull:
                await asyncio.sleep(0.01)
    await producer.flush()
    return producer.stats().dead_lettered - before


async def send_batch(
    target: Submitter | Callable[[list[DeadLetter]], Awaitable[None] | None],
    batch: list[DeadLetter],
    marks: _core.SegmentLog,
    cursor_name: str,
    report: RedriveReport,
    label: str,
) -> int:
    """Sends one batch (through a `Submitter`, or to a callable that succeeds by returning), then marks it
    redriven and moves the cursor past it: a crash between the two repeats the batch (at-least-once)."""
    if isinstance(target, Submitter):
        report.failed += await send_through(target, batch)
    else:
        result = target(batch)
        if isinstance(result, Awaitable):
            await result
    marks.append(ENCODER.encode(RedriveMark("redriven", time.time(), [d.id for d in batch], None, label)))
    marks.commit()
    report.redriven += len(batch)
    report.cursor = batch[-1].id + 1
    marks.set_cursor(cursor_name, report.cursor)
    return len(batch)
