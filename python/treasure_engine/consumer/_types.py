"""What the handler sees and returns, and the per-shard stats."""

from __future__ import annotations

import dataclasses
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
        self.failed: tuple[Record, ...] = tuple(failed)
        self.reasons: Mapping[Record, BaseException | str] = reasons or {}

    def __repr__(self) -> str:
        return f"BatchResult(failed={len(self.failed)} record(s))"


Handler = Callable[[list[Record]], Awaitable[BatchResult | None]]


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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
