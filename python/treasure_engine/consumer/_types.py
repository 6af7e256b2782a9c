"""What the handler sees and returns, and the per-shard stats."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from treasure_engine._core import Record


class BatchResult:
    """What a handler may return: the records of its batch that failed (Lambda's ReportBatchItemFailures).

    Only those are retried; the others count as handled. Returning None means the whole batch was handled;
    raising means none of it was. `reasons` may say why a record failed (an exception or a message): a record
    that ends in the dead-letter queue carries it as its error type and message.
    """

    __slots__ = ("failed", "reasons")

    def __init__(
        self, failed: Iterable[Record] = (), reasons: Mapping[Record, BaseException | str] | None = None
    ) -> None:
        try:
            self.failed: tuple[Record, ...] = tuple(failed)
        except TypeError:
            raise TypeError(f"failed must be an iterable of Record, not {type(failed).__name__}") from None
        for r in self.failed:
            if not isinstance(r, Record):
                raise TypeError(f"failed must hold the batch's Record objects, not {type(r).__name__} {r!r}")
        self.reasons: Mapping[Record, BaseException | str] = reasons or {}

    def __repr__(self) -> str:
        return f"BatchResult(failed={len(self.failed)} record(s))"


Handler = Callable[[list[Record]], Awaitable[BatchResult | None]]


LAG_STALE_AFTER_S = 5.0
"""A shard whose reader read no GetRecords answer for this long has stopped reading (idle polls come every
`idle_poll_ms`, 1 s by default): its lag is then estimated (`ShardStats.lag`)."""


@dataclass(slots=True)
class ShardStats:
    """One shard as this worker sees it."""

    shard_id: str
    owned: bool = True
    checkpoint: str | None = None
    sub_sequence: int = 0
    millis_behind_latest: int | None = None
    records_read: int = 0
    records_handled: int = 0
    records_failed: int = 0
    """Failed handler attempts, counted per record (a record retried three times counts three)."""
    records_dead_lettered: int = 0
    malformed: int = 0
    """Records that did not de-aggregate (bad MD5, truncated protobuf): dead-lettered raw with the reason."""
    out_of_range_records: int = 0
    """Records delivered from KPL aggregates that hold any record outside the shard's hash-key range, all of their
    records (`out_of_range_aggregates="deliver"`; the KCL skips them): written before a reshard, or by a producer
    aggregating across shards. After a reshard, a repairing producer re-sent them: these are the duplicates."""
    skipped_out_of_range_records: int = 0
    """Records of KPL aggregates skipped whole, as the KCL does, because one of them lies outside the shard's
    hash-key range (`out_of_range_aggregates="skip"`); not in `records_read`."""
    checkpoints: int = 0
    """Checkpoints written to the lease table (at most one per checkpoint_interval_s while the shard is busy)."""
    paused: bool = False
    """Waiting for the downstream breaker to let calls through."""
    ended: bool = False
    """Read to SHARD_END and checkpointed so (a closed parent of a reshard)."""
    read_at: float | None = None
    """Unix time of the last GetRecords answer read."""

    def lag(self, now: float) -> tuple[int | None, bool]:
        """How far behind the tip the shard's reader is, in ms, and whether that is an estimate.

        `millis_behind_latest` is what Kinesis said at the last read. When reading has stopped (paused by the
        downstream breaker, or no answer read for `LAG_STALE_AFTER_S`: the handler holds the reader back), that
        figure is stale, and it would read "0 ms" while events pile up: the lag is then estimated as that figure
        plus the time since that read, which assumes records kept arriving (an upper bound when none did).
        """
        behind = self.millis_behind_latest
        if behind is None or self.read_at is None:
            return behind, False
        stopped = max(0.0, now - self.read_at)
        if self.paused or stopped > LAG_STALE_AFTER_S:
            return behind + int(stopped * 1000), True
        return behind, False

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """The fields, plus `lag_ms` and `lag_estimated` (see `lag`) as of `now` (default: the time now)."""
        d = dataclasses.asdict(self)
        d["lag_ms"], d["lag_estimated"] = self.lag(time.time() if now is None else now)
        return d
