"""The dead-letter queue: a segment log of entries with queries, stats, verification, purge and
redrive (through `dlq._redrive`)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Self, TypeGuard, TypeVar

import msgspec

from treasure_engine import _core
from treasure_engine._core import ConfigError, LogLocked, LogNotFound
from treasure_engine._state import default_app_name
from treasure_engine._validate import _check
from treasure_engine.dlq._entries import (
    ENCODER,
    MARK_DECODER,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStats,
    RedriveMark,
    RedriveReport,
    VerifyReport,
    decode,
    encode,
    tally,
)
from treasure_engine.dlq._redrive import Submitter, send_batch, target_name

log = logging.getLogger("treasure_engine.dlq")


MAX_SLOTS = 64
"""Processes sharing one state directory each take a slot: `dlq`, `dlq-1`, ... (see `claim_log`)."""


T = TypeVar("T")


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
        _check_options(fsync, segment_bytes, retention_bytes, retention_s, app_name)
        self.path = Path(path)
        self.app_name = app_name or default_app_name()
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
        letters = list(letters)
        for d in letters:
            if not isinstance(d, DeadLetter):
                raise TypeError(f"put takes DeadLetter entries, not {type(d).__name__} {d!r}")
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
                m = MARK_DECODER.decode(payload)
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
        if not isinstance(id, int) or isinstance(id, bool):
            raise TypeError(f"id must be an int, not {type(id).__name__}")
        if not 0 <= id < 1 << 64:  # positions are u64: none lies outside
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
        _check("window_s", _is_number(window_s) and window_s > 0, "must be a number > 0", window_s)
        redriven, purged_before = self._marks()
        corruptions: list[Any] = []
        entries = (item for item in self._frames(0, corruptions) if not isinstance(item, int))
        counts = tally(entries, redriven, purged_before, now=time.time(), window_s=window_s)
        log_bytes = sum(p.stat().st_size for p in self.path.glob("*.seg"))
        return msgspec.structs.replace(counts, corrupted_frames=len(corruptions), log_bytes=log_bytes)

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
        target: Submitter | Callable[[list[DeadLetter]], Awaitable[None] | None],
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
        label = target_name(target)
        cursor_name = _cursor_name(name or f"{label}-{(filter or DeadLetterFilter()).describe()}")
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
                    sent_total += await send_batch(target, batch, marks, cursor_name, report, label)
                    batch = []
                    if progress is not None:
                        progress(report)
                    if rate is not None:
                        ahead = sent_total / rate - (time.monotonic() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            if batch:
                await send_batch(target, batch, marks, cursor_name, report, label)
                if progress is not None:
                    progress(report)
            return report
        finally:
            marks.close()

    def purge(self, before: float) -> int:
        """Removes entries dead-lettered before Unix time `before`; returns how many were waiting.

        Whole segments older than `before` are deleted when no other process holds the queue; otherwise a
        purge mark hides them until the writer's retention removes them.
        """
        if not _is_number(before):
            raise TypeError(f"before must be a Unix time (a number), not {type(before).__name__} {before!r}")
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
            marks.append(ENCODER.encode(RedriveMark("purged", time.time(), [], before, "")))
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


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_options(
    fsync: object, segment_bytes: object, retention_bytes: object, retention_s: object, app_name: object
) -> None:
    """The segment log's own checks, made when the queue is constructed rather than at its first write."""
    _check("fsync", fsync in ("always", "interval", "never"), "must be 'always', 'interval' or 'never'", fsync)
    _check(
        "segment_bytes",
        isinstance(segment_bytes, int) and not isinstance(segment_bytes, bool) and 64 <= segment_bytes <= 1 << 40,
        "must be an int in [64, 2**40]",
        segment_bytes,
    )
    _check(
        "retention_bytes",
        retention_bytes is None
        or (isinstance(retention_bytes, int) and not isinstance(retention_bytes, bool) and retention_bytes >= 0),
        "must be None or an int >= 0",
        retention_bytes,
    )
    _check(
        "retention_s",
        retention_s is None or (_is_number(retention_s) and 0 <= retention_s < float("inf")),
        "must be None or a finite number >= 0",
        retention_s,
    )
    _check(
        "app_name",
        app_name is None or (isinstance(app_name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", app_name) is not None),
        "must be 1-64 characters of letters, digits, '_', '.', '-'",
        app_name,
    )


def _log_end(path: Path) -> int:
    """The position after the last byte written to the log at `path` (read from its segment files)."""
    end = 0
    for seg in path.glob("*.seg"):
        try:
            end = max(end, int(seg.stem) + seg.stat().st_size)
        except (ValueError, FileNotFoundError):
            continue
    return end


def _cursor_name(text: str) -> str:
    """A cursor name the log accepts: [A-Za-z0-9_.-]{1,64}, kept unique with a digest when cut."""
    import hashlib

    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    if len(clean) <= 64:
        return clean
    return clean[:47] + "-" + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]
