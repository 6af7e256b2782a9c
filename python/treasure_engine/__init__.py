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
from treasure_engine.breaker import (
    BreakerConfig,
    BreakerMetrics,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    breakers,
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
from treasure_engine.downstream import (
    Downstream,
    DownstreamClosed,
    DownstreamConfig,
    DownstreamError,
    DownstreamMetrics,
    DownstreamOverloaded,
    DownstreamResponse,
    DownstreamState,
    DownstreamTimeout,
    DownstreamUnavailable,
)
from treasure_engine.errors import (
    AuthError,
    BufferFull,
    CircuitOpen,
    ConfigError,
    EndpointError,
    FlushTimeout,
    InvalidHashKey,
    InvalidPartitionKey,
    MalformedRecord,
    Overloaded,
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
    "BreakerConfig",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerState",
    "BufferFull",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigError",
    "Corruption",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterHook",
    "DeadLetterQueue",
    "DeadLetterStats",
    "Downstream",
    "DownstreamClosed",
    "DownstreamConfig",
    "DownstreamError",
    "DownstreamMetrics",
    "DownstreamOverloaded",
    "DownstreamResponse",
    "DownstreamState",
    "DownstreamTimeout",
    "DownstreamUnavailable",
    "EndpointError",
    "FlushTimeout",
    "InvalidHashKey",
    "InvalidPartitionKey",
    "LogError",
    "LogLocked",
    "LogNotFound",
    "LogReader",
    "MalformedRecord",
    "Overloaded",
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
    "breakers",
]
