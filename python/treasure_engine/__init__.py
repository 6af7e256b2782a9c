"""treasure_engine: push bursts of events into Amazon Kinesis without backlog, cascading failure or loss.

The hot path is Rust: `submit()` copies into a lock-free ring, a batcher thread aggregates (KPL) and seals
PutRecords requests per shard, and asyncio tasks deliver them with retries and per-shard rate limits.
"""

from __future__ import annotations

from treasure_engine._core import (
    Corruption,
    LogError,
    LogLocked,
    LogNotFound,
    LogReader,
    SegmentLog,
    __version__,
)
from treasure_engine.config import ProducerConfig
from treasure_engine.dlq import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterQueue,
    DeadLetterStats,
    RedriveReport,
    VerifyReport,
)
from treasure_engine.errors import (
    AuthError,
    BufferFull,
    ConfigError,
    EndpointError,
    FlushTimeout,
    InvalidHashKey,
    InvalidPartitionKey,
    MalformedRecord,
    ProducerClosed,
    RecordTooLarge,
    StreamNotFound,
    TreasureEngineError,
)
from treasure_engine.producer import (
    BackgroundProducer,
    DeadLetterHook,
    Producer,
    ProducerState,
    ProducerStats,
)

__all__ = [
    "AuthError",
    "BackgroundProducer",
    "BufferFull",
    "ConfigError",
    "Corruption",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterHook",
    "DeadLetterQueue",
    "DeadLetterStats",
    "EndpointError",
    "FlushTimeout",
    "InvalidHashKey",
    "InvalidPartitionKey",
    "LogError",
    "LogLocked",
    "LogNotFound",
    "LogReader",
    "MalformedRecord",
    "Producer",
    "ProducerClosed",
    "ProducerConfig",
    "ProducerState",
    "ProducerStats",
    "RecordTooLarge",
    "RedriveReport",
    "SegmentLog",
    "StreamNotFound",
    "TreasureEngineError",
    "VerifyReport",
    "__version__",
]
