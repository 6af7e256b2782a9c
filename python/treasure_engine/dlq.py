"""The dead-letter queue: events that could not be delivered or processed, durable, inspectable, redrivable.

```text
<dlq>/                      one segment log (0700): every entry a CRC32C-checked msgpack frame
<dlq>/00000000000000000000.seg ...
<dlq>/marks/                a second, small log: which entries were redriven or purged, and redrive cursors
```

The writer (a producer or consumer) holds `<dlq>`'s lock while it runs; reading (`entries`, `get`, `stats`,
`verify`) never needs it, and neither does `redrive`, which only writes to `marks/`. An entry's id is its
position in the log: stable, unique and ordered by arrival.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import sys
import time
import traceback as tb
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import msgspec

from treasure_engine import _core
from treasure_engine._core import ConfigError, LogLocked, LogNotFound

if TYPE_CHECKING:
    from treasure_engine.producer import Producer

__all__ = [
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterQueue",
    "DeadLetterStats",
    "RedriveReport",
    "VerifyReport",
    "default_state_dir",
]

log = logging.getLogger("treasure_engine.dlq")

MAX_TRACEBACK = 8 * 1024
"""Tracebacks are cut to their last 8 KiB: the frames nearest the failure."""
MAX_MESSAGE = 4 * 1024
MAX_SLOTS = 64
"""Processes sharing one state directory each take a slot: `dlq`, `dlq-1`, ... (see `claim_log`)."""

Source = Literal["producer", "consumer"]
T = TypeVar("T")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One event that could not be delivered (producer) or processed (consumer), with why and where from."""

    data: bytes
    partition_key: str
    source: Source
    stream: str
    attempts: int
    error_type: str
    error_message: str
    first_failure_at: float
    """Unix time of the first failed attempt."""
    dead_lettered_at: float
    """Unix time it was given up on."""
    explicit_hash_key: str | None = None
    shard_id: str | None = None
    sequence_number: str | None = None
    sub_sequence_number: int | None = None
    traceback: str | None = None
    app_name: str = ""
    engine_version: str = ""
    id: int = -1
    """Position in the dead-letter log; -1 until stored."""

    @property
    def age_s(self) -> float:
        """Seconds since it was dead-lettered."""
        return max(0.0, time.time() - self.dead_lettered_at)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output; `data` as UTF-8 when it decodes, else base64 under `data_b64`."""
        out: dict[str, Any] = msgspec.structs.asdict(self)
        raw = out.pop("data")
        try:
            out["data"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            out["data_b64"] = base64.b64encode(raw).decode("ascii")
        return out


class _Stored(msgspec.Struct, array_like=True, frozen=True):
    """The frame format, version 1: positional, so field names cost nothing per entry."""

    version: int
    data: bytes
    partition_key: str
    explicit_hash_key: str | None
    source: str
    stream: str
    shard_id: str | None
    sequence_number: str | None
    sub_sequence_number: int | None
    attempts: int
    error_type: str
    error_message: str
    traceback: str | None
    first_failure_at: float
    dead_lettered_at: float
    app_name: str
    engine_version: str


class _Mark(msgspec.Struct, array_like=True, frozen=True):
    """A frame of `marks/`: entries redriven (`ids`), or everything dead-lettered before `before` purged."""

    kind: str
    at: float
    ids: list[int] = []
    before: float | None = None
    target: str = ""


_encoder = msgspec.msgpack.Encoder()
_stored_decoder = msgspec.msgpack.Decoder(_Stored)
_mark_decoder = msgspec.msgpack.Decoder(_Mark)


def encode(letter: DeadLetter) -> bytes:
    """The stored bytes of an entry (its id is its position, not part of them)."""
    tb_text = letter.traceback
    if tb_text is not None and len(tb_text) > MAX_TRACEBACK:
        tb_text = "…" + tb_text[-MAX_TRACEBACK:]
    return _encoder.encode(
        _Stored(
            1,
            letter.data,
            letter.partition_key,
            letter.explicit_hash_key,
            letter.source,
            letter.stream,
            letter.shard_id,
            letter.sequence_number,
            letter.sub_sequence_number,
            letter.attempts,
            letter.error_type,
            letter.error_message[:MAX_MESSAGE],
            tb_text,
            letter.first_failure_at,
            letter.dead_lettered_at,
            letter.app_name,
            letter.engine_version,
        )
    )


def decode(position: int, payload: bytes) -> DeadLetter:
    """An entry from its stored bytes; raises `msgspec.DecodeError` for bytes that are not one."""
    s = _stored_decoder.decode(payload)
    if s.version != 1 or s.source not in ("producer", "consumer"):
        raise msgspec.DecodeError(f"unknown entry version {s.version} or source {s.source!r}")
    return DeadLetter(
        id=position,
        data=s.data,
        partition_key=s.partition_key,
        explicit_hash_key=s.explicit_hash_key,
        source=s.source,  # type: ignore[arg-type]
        stream=s.stream,
        shard_id=s.shard_id,
        sequence_number=s.sequence_number,
        sub_sequence_number=s.sub_sequence_number,
        attempts=s.attempts,
        error_type=s.error_type,
        error_message=s.error_message,
        traceback=s.traceback,
        first_failure_at=s.first_failure_at,
        dead_lettered_at=s.dead_lettered_at,
        app_name=s.app_name,
        engine_version=s.engine_version,
    )


def format_traceback(exc: BaseException) -> str:
    """A traceback bounded to `MAX_TRACEBACK` characters."""
    text = "".join(tb.format_exception(exc))
    return text if len(text) <= MAX_TRACEBACK else "…" + text[-MAX_TRACEBACK:]


class DeadLetterFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Selects entries; every given condition must hold. `partition_key` is a shell pattern (`user-*`)."""

    stream: str | None = None
    source: Source | None = None
    error_type: str | None = None
    partition_key: str | None = None
    shard_id: str | None = None
    since: float | None = None
    """Dead-lettered at or after this Unix time."""
    before: float | None = None
    """Dead-lettered before this Unix time."""

    def __call__(self, d: DeadLetter) -> bool:
        return (
            (self.stream is None or d.stream == self.stream)
            and (self.source is None or d.source == self.source)
            and (self.error_type is None or d.error_type == self.error_type)
            and (self.shard_id is None or d.shard_id == self.shard_id)
            and (self.partition_key is None or fnmatch.fnmatchcase(d.partition_key, self.partition_key))
            and (self.since is None or d.dead_lettered_at >= self.since)
            and (self.before is None or d.dead_lettered_at < self.before)
        )

    def describe(self) -> str:
        """A stable text of the conditions, used to name redrive cursors."""
        parts = [f"{k}={v}" for k, v in msgspec.structs.asdict(self).items() if v is not None]
        return ",".join(parts) or "all"


class DeadLetterStats(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    """Entries waiting: neither redriven nor purged."""
    bytes: int
    """Payload bytes of the waiting entries."""
    oldest_age_s: float | None
    """Seconds since the oldest waiting entry was dead-lettered."""
    rate_per_s: float
    """Entries dead-lettered per second over the last `window_s` seconds."""
    window_s: float
    redriven: int
    purged: int
    corrupted_frames: int
    by_error_type: dict[str, int]
    log_bytes: int
    """Bytes of the log on disk (segments), including redriven and purged entries not yet deleted."""


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    entries: int
    corruptions: list[dict[str, Any]]
    undecodable: list[int]
    """Positions of frames whose checksum holds but whose content is not an entry."""

    @property
    def ok(self) -> bool:
        return not self.corruptions and not self.undecodable


class RedriveReport(msgspec.Struct, kw_only=True):
    redriven: int = 0
    failed: int = 0
    """Sent again but dead-lettered again by the target producer (now new entries of its dead-letter queue)."""
    skipped: int = 0
    """Already redriven by an earlier run, purged, or not matching the filter."""
    cursor: int = 0
    """Position the next run resumes from."""


def _data_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) if xdg else Path.home() / ".local" / "share"


def _app_name() -> str:
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "python"


def default_state_dir(app_name: str | None = None) -> Path:
    """`$XDG_DATA_HOME/treasure-engine/<app>` (`~/.local/share/...` without it): where dead letters, spill and
    the WAL live when no `state_dir` is configured, so that no configuration loses them."""
    return _data_home() / "treasure-engine" / (app_name or _app_name())


def claim_slot(base: Path, open_: Callable[[Path], T]) -> T:
    """`open_(base)`, or when another process holds `base`'s lock, `open_` of the first free slot `base-1`,
    `base-2`, ... (the DLQ, the spill and the WAL all claim their directories this way).

    Several workers of one service (gunicorn, multiprocessing) can share a state directory; a worker restarted
    after a crash takes over a free slot and whatever was left in it.
    """
    last: LogLocked | None = None
    for slot in range(MAX_SLOTS):
        path = base if slot == 0 else base.with_name(f"{base.name}-{slot}")
        try:
            return open_(path)
        except LogLocked as e:
            last = e
    raise LogLocked(f"all {MAX_SLOTS} slots of {base} are held by other processes: {last}")


def claim_log(base: Path, **options: Any) -> _core.SegmentLog:
    """The segment log at the first free slot of `base` (see `claim_slot`)."""
    return claim_slot(base, lambda path: _core.SegmentLog(path, **options))


class DeadLetterQueue:
    """The dead-letter queue at `path` (a directory; created on the first write).

    Writers (`put`) take the log's lock for as long as the queue is open; readers do not. Entries are durable
    once `put` returns: the frame is written and fsynced (`fsync="always"`, the default for dead letters, which
    are rare and precious).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: Literal["always", "interval", "never"] = "always",
        segment_bytes: int = 64 * 1024 * 1024,
        retention_bytes: int | None = None,
        retention_s: float | None = None,
        app_name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.app_name = app_name or _app_name()
        self._options: dict[str, Any] = {
            "fsync": fsync,
            "segment_bytes": segment_bytes,
            "retention_bytes": retention_bytes,
            "retention_s": retention_s,
        }
        self._log: _core.SegmentLog | None = None

    # --- writing -----------------------------------------------------------------------------------------

    @classmethod
    def claim(cls, base: str | os.PathLike[str], **kwargs: Any) -> DeadLetterQueue:
        """Opens for writing the first free slot of `base` (see `claim_log`)."""
        base = Path(base)
        options = {k: kwargs[k] for k in ("fsync", "segment_bytes", "retention_bytes", "retention_s") if k in kwargs}
        log_ = claim_log(base, **{"fsync": "always", **options})
        dlq = cls(log_.path, **kwargs)
        dlq._log = log_
        return dlq

    def _writer(self) -> _core.SegmentLog:
        if self._log is None:
            self._log = _core.SegmentLog(self.path, **self._options)
            if self._log.recovery:
                log.warning("dead-letter log %s recovered after a crash: %s", self.path, self._log.recovery)
        return self._log

    def put(self, letters: Iterable[DeadLetter]) -> list[int]:
        """Stores entries durably (one group commit) and returns their ids. Raises `LogError` on I/O failure
        (disk full, read-only): nothing was acknowledged then, so the caller keeps the entries and retries."""
        writer = self._writer()
        ids = writer.append_many([encode(d) for d in letters])
        writer.commit()
        writer.enforce_retention()
        return ids

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------------------------------

    def _require(self) -> None:
        if not self.path.is_dir():
            raise LogNotFound(f"no dead-letter queue at {self.path}")

    def _frames(self, since: int = 0, corruptions: list[Any] | None = None) -> Iterator[DeadLetter | int]:
        """Entries from position `since`; an int for a frame that is not an entry (its position)."""
        self._require()
        reader = _core.LogReader(self.path, since)
        while batch := reader.read(1024):
            for position, payload in batch:
                try:
                    yield decode(position, payload)
                except (msgspec.DecodeError, ValueError, TypeError):
                    yield position
        if corruptions is not None:
            corruptions.extend(reader.corruptions)
        for c in reader.corruptions:
            log.warning(
                "dead-letter log %s: skipped %d damaged byte(s) at %d: %s", self.path, c.length, c.position, c.reason
            )

    def _marks(self) -> tuple[set[int], float | None]:
        """Ids redriven, and the latest purge horizon."""
        redriven: set[int] = set()
        before: float | None = None
        marks = self.path / "marks"
        if not marks.is_dir():
            return redriven, before
        for _, payload in _core.LogReader(marks, 0):
            try:
                m = _mark_decoder.decode(payload)
            except msgspec.DecodeError:
                continue
            if m.kind == "redriven":
                redriven.update(m.ids)
            elif m.kind == "purged" and m.before is not None:
                before = m.before if before is None else max(before, m.before)
        return redriven, before

    def entries(
        self,
        since: int | None = None,
        filter: DeadLetterFilter | Callable[[DeadLetter], bool] | None = None,
        *,
        include_redriven: bool = False,
    ) -> Iterator[DeadLetter]:
        """Waiting entries in arrival order, from id `since` on, that `filter` accepts. Damaged frames are
        skipped and logged (see `verify`)."""
        redriven, purged_before = self._marks()
        for item in self._frames(since or 0):
            if isinstance(item, int):
                continue
            if purged_before is not None and item.dead_lettered_at < purged_before:
                continue
            if not include_redriven and item.id in redriven:
                continue
            if filter is None or filter(item):
                yield item

    def get(self, id: int) -> DeadLetter:
        """The entry with this id (redriven or not); `KeyError` when there is none."""
        if id < 0:
            raise KeyError(id)
        self._require()
        reader = _core.LogReader(self.path, id)
        for position, payload in reader.read(1):
            if position == id:
                try:
                    return decode(position, payload)
                except (msgspec.DecodeError, ValueError, TypeError):
                    break
        raise KeyError(id)

    def stats(self, *, window_s: float = 60.0) -> DeadLetterStats:
        redriven, purged_before = self._marks()
        now = time.time()
        count = nbytes = recent = n_redriven = n_purged = 0
        oldest: float | None = None
        by_error: dict[str, int] = {}
        corruptions: list[Any] = []
        for item in self._frames(0, corruptions):
            if isinstance(item, int):
                continue
            if now - item.dead_lettered_at <= window_s:
                recent += 1
            if purged_before is not None and item.dead_lettered_at < purged_before:
                n_purged += 1
                continue
            if item.id in redriven:
                n_redriven += 1
                continue
            count += 1
            nbytes += len(item.data)
            by_error[item.error_type] = by_error.get(item.error_type, 0) + 1
            oldest = item.dead_lettered_at if oldest is None else min(oldest, item.dead_lettered_at)
        log_bytes = sum(p.stat().st_size for p in self.path.glob("*.seg"))
        return DeadLetterStats(
            count=count,
            bytes=nbytes,
            oldest_age_s=None if oldest is None else max(0.0, now - oldest),
            rate_per_s=recent / window_s,
            window_s=window_s,
            redriven=n_redriven,
            purged=n_purged,
            corrupted_frames=len(corruptions),
            by_error_type=by_error,
            log_bytes=log_bytes,
        )

    def verify(self) -> VerifyReport:
        """Reads every frame: checksums, then the entry format. Damage is reported, never raised."""
        corruptions: list[Any] = []
        entries = 0
        undecodable: list[int] = []
        for item in self._frames(0, corruptions):
            if isinstance(item, int):
                undecodable.append(item)
            else:
                entries += 1
        return VerifyReport(
            entries=entries,
            corruptions=[
                {"segment": c.segment, "position": c.position, "length": c.length, "reason": c.reason}
                for c in corruptions
            ],
            undecodable=undecodable,
        )

    # --- redrive and purge -------------------------------------------------------------------------------

    def _marks_log(self) -> _core.SegmentLog:
        self._require()
        return _core.SegmentLog(self.path / "marks", fsync="always")

    async def redrive(
        self,
        target: Producer | Callable[[list[DeadLetter]], Awaitable[None] | None],
        *,
        filter: DeadLetterFilter | None = None,
        rate: float | None = None,
        batch_size: int = 500,
        name: str | None = None,
        progress: Callable[[RedriveReport], None] | None = None,
    ) -> RedriveReport:
        """Sends waiting entries back, oldest first, at most `rate` per second, and marks each one redriven.

        `target` is a started `Producer` (entries go to its stream once it has flushed them; what it fails to
        deliver it dead-letters again, as new entries) or a callable taking a batch, which succeeds by
        returning. A run resumes from its cursor (named by `name`, default the target and filter); marks make
        a second run send nothing twice. A crash between delivery and marking can repeat one batch
        (at-least-once, like Kinesis itself).
        """
        if batch_size < 1:
            raise ConfigError(f"invalid configuration: batch_size: must be >= 1 (got {batch_size})")
        if rate is not None and rate <= 0:
            raise ConfigError(f"invalid configuration: rate: must be > 0 (got {rate})")
        target_name = _target_name(target)
        cursor_name = _cursor_name(name or f"{target_name}-{(filter or DeadLetterFilter()).describe()}")
        marks = self._marks_log()
        try:
            redriven, purged_before = self._marks()
            # Entries that arrive during the run (the target's own failures among them) wait for the next one.
            end = _log_end(self.path)
            start = marks.cursor(cursor_name) or 0
            report = RedriveReport(cursor=start)
            batch: list[DeadLetter] = []
            started = time.monotonic()
            sent_total = 0
            for item in self._frames(start):
                if isinstance(item, int):
                    continue
                if item.id >= end:
                    break
                skip = (
                    item.id in redriven
                    or (purged_before is not None and item.dead_lettered_at < purged_before)
                    or (filter is not None and not filter(item))
                )
                if skip:
                    report.skipped += 1
                    continue
                batch.append(item)
                if len(batch) >= batch_size:
                    sent_total += await self._redrive_batch(target, batch, marks, cursor_name, report, target_name)
                    batch = []
                    if progress is not None:
                        progress(report)
                    if rate is not None:
                        ahead = sent_total / rate - (time.monotonic() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            if batch:
                await self._redrive_batch(target, batch, marks, cursor_name, report, target_name)
                if progress is not None:
                    progress(report)
            return report
        finally:
            marks.close()

    async def _redrive_batch(
        self,
        target: Any,
        batch: list[DeadLetter],
        marks: _core.SegmentLog,
        cursor_name: str,
        report: RedriveReport,
        target_name: str,
    ) -> int:
        from treasure_engine.producer import Producer

        if isinstance(target, Producer):
            report.failed += await _send_through(target, batch)
        else:
            result = target(batch)
            if isinstance(result, Awaitable):
                await result
        marks.append(_encoder.encode(_Mark("redriven", time.time(), [d.id for d in batch], None, target_name)))
        marks.commit()
        report.redriven += len(batch)
        report.cursor = batch[-1].id + 1
        marks.set_cursor(cursor_name, report.cursor)
        return len(batch)

    def purge(self, before: float) -> int:
        """Removes entries dead-lettered before Unix time `before`; returns how many were waiting.

        Whole segments older than `before` are deleted when no other process holds the queue; otherwise a
        purge mark hides them until the writer's retention removes them.
        """
        redriven, purged_before = self._marks()
        waiting = 0  # entries older than `before` that were neither redriven nor purged
        cut = 0  # end of the prefix of entries older than `before`: whole segments below it can go
        in_prefix = True
        for item in self._frames(0):
            if isinstance(item, int):
                continue
            old = item.dead_lettered_at < before
            in_prefix = in_prefix and old
            if in_prefix:
                cut = item.id + 1
            already_gone = item.id in redriven or (purged_before is not None and item.dead_lettered_at < purged_before)
            if old and not already_gone:
                waiting += 1
        marks = self._marks_log()
        try:
            marks.append(_encoder.encode(_Mark("purged", time.time(), [], before, "")))
            marks.commit()
        finally:
            marks.close()
        if waiting:
            self._delete_segments_before(cut)
        return waiting

    def _delete_segments_before(self, cut: int) -> None:
        """Deletes whole segments wholly below position `cut`, if the lock is free."""
        if cut == 0:
            return
        try:
            writer = self._writer()
        except LogLocked:
            log.info(
                "dead-letter queue %s is held by another process; purged entries are hidden, not deleted", self.path
            )
            return
        writer.delete_before(cut)


def _log_end(path: Path) -> int:
    """The position after the last byte written to the log at `path` (read from its segment files)."""
    end = 0
    for seg in path.glob("*.seg"):
        try:
            end = max(end, int(seg.stem) + seg.stat().st_size)
        except (ValueError, FileNotFoundError):
            continue
    return end


def _target_name(target: Any) -> str:
    from treasure_engine.producer import Producer

    if isinstance(target, Producer):
        return f"stream-{target.config.stream}"
    return f"handler-{getattr(target, '__qualname__', type(target).__name__)}"


def _cursor_name(text: str) -> str:
    """A cursor name the log accepts: [A-Za-z0-9_.-]{1,64}, kept unique with a digest when cut."""
    import hashlib

    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    if len(clean) <= 64:
        return clean
    return clean[:47] + "-" + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]


async def _send_through(producer: Producer, batch: list[DeadLetter]) -> int:
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
