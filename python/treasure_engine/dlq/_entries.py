"""Dead-letter entries and their on-disk encoding, the filter that selects them and the reports about them."""

from __future__ import annotations

import fnmatch
import logging
import time
import traceback as tb
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from treasure_engine._validate import _check_types

log = logging.getLogger("treasure_engine.dlq")


MAX_TRACEBACK = 8 * 1024
"""Tracebacks are cut to their last 8 KiB: the frames nearest the failure."""


MAX_MESSAGE = 4 * 1024


Source = Literal["producer", "consumer"]


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


class StoredEntry(msgspec.Struct, array_like=True, frozen=True):
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


class RedriveMark(msgspec.Struct, array_like=True, frozen=True):
    """A frame of `marks/`: entries redriven (`ids`), or everything dead-lettered before `before` purged."""

    kind: str
    at: float
    ids: list[int] = []
    before: float | None = None
    target: str = ""


ENCODER = msgspec.msgpack.Encoder()


STORED_DECODER = msgspec.msgpack.Decoder(StoredEntry)


MARK_DECODER = msgspec.msgpack.Decoder(RedriveMark)


def encode(letter: DeadLetter) -> bytes:
    """The stored bytes of an entry (its id is its position, not part of them)."""
    tb_text = letter.traceback
    if tb_text is not None and len(tb_text) > MAX_TRACEBACK:
        tb_text = "…" + tb_text[-MAX_TRACEBACK:]
    return ENCODER.encode(
        StoredEntry(
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
    s = STORED_DECODER.decode(payload)
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

    def __post_init__(self) -> None:
        _check_types(self)

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


def tally(
    entries: Iterable[DeadLetter], redriven: set[int], purged_before: float | None, *, now: float, window_s: float
) -> DeadLetterStats:
    """The stats of `entries` (corrupted frames and log bytes left at 0 for the queue to fill in): waiting ones
    counted by error type, redriven and purged ones apart, the rate over the last `window_s` seconds."""
    count = nbytes = recent = n_redriven = n_purged = 0
    oldest: float | None = None
    by_error: dict[str, int] = {}
    for item in entries:
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
    return DeadLetterStats(
        count=count,
        bytes=nbytes,
        oldest_age_s=None if oldest is None else max(0.0, now - oldest),
        rate_per_s=recent / window_s,
        window_s=window_s,
        redriven=n_redriven,
        purged=n_purged,
        corrupted_frames=0,
        by_error_type=by_error,
        log_bytes=0,
    )


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
