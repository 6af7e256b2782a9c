"""treasure_engine: push bursts of events into Amazon Kinesis without backlog, cascading failure or loss.

The hot path is Rust: `submit()` copies into a lock-free ring, a batcher thread aggregates (KPL) and seals
PutRecords requests per shard, and asyncio tasks deliver them with retries and per-shard rate limits. The
consumer shares a stream's shards across processes through DynamoDB leases, de-aggregates in Rust and calls an
async handler with ordered batches, isolating poison records in the dead-letter queue.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from treasure_engine._core import (
    Corruption,
    LogError,
    LogLocked,
    LogNotFound,
    LogReader,
    Record,
    SegmentLog,
    __version__,
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
    LeaseTableNotFound,
    MalformedRecord,
    Overloaded,
    ProducerClosed,
    RecordTooLarge,
    StreamNotFound,
    TreasureEngineError,
)

if TYPE_CHECKING:
    from treasure_engine.breaker import (
        BreakerConfig,
        BreakerMetrics,
        BreakerRegistry,
        BreakerState,
        CircuitBreaker,
        breakers,
    )
    from treasure_engine.config import ConsumerConfig, ProducerConfig
    from treasure_engine.consumer import BatchResult, Consumer, Handler, ShardStats
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
    from treasure_engine.engine import BackgroundEngine, Engine, EngineConfig
    from treasure_engine.monitoring import Alert, AlertRule, AlertState, LagStatus, Monitor, MonitorConfig, MonitorState
    from treasure_engine.producer import (
        BackgroundProducer,
        DeadLetterHook,
        Producer,
        ProducerState,
        ProducerStats,
    )

# Everything else is imported on first use (PEP 562): a service that only produces does not pay for the
# consumer, the engine or the monitor (and their imports) at start-up.
_LAZY_BY_MODULE: dict[str, tuple[str, ...]] = {
    "breaker": ("BreakerConfig", "BreakerMetrics", "BreakerRegistry", "BreakerState", "CircuitBreaker", "breakers"),
    "config": ("ConsumerConfig", "ProducerConfig"),
    "consumer": ("BatchResult", "Consumer", "Handler", "ShardStats"),
    "dlq": ("DeadLetter", "DeadLetterFilter", "DeadLetterQueue", "DeadLetterStats", "RedriveReport", "VerifyReport"),
    "downstream": (
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
    ),
    "engine": ("BackgroundEngine", "Engine", "EngineConfig"),
    "monitoring": ("Alert", "AlertRule", "AlertState", "LagStatus", "Monitor", "MonitorConfig", "MonitorState"),
    "producer": ("BackgroundProducer", "DeadLetterHook", "Producer", "ProducerState", "ProducerStats"),
}
_LAZY: dict[str, str] = {name: module for module, names in _LAZY_BY_MODULE.items() for name in names}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'treasure_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"treasure_engine.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Alert",
    "AlertRule",
    "AlertState",
    "AuthError",
    "BackgroundEngine",
    "BackgroundProducer",
    "BatchResult",
    "BreakerConfig",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerState",
    "BufferFull",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigError",
    "Consumer",
    "ConsumerConfig",
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
    "Engine",
    "EngineConfig",
    "FlushTimeout",
    "Handler",
    "InvalidHashKey",
    "InvalidPartitionKey",
    "LagStatus",
    "LeaseTableNotFound",
    "LogError",
    "LogLocked",
    "LogNotFound",
    "LogReader",
    "MalformedRecord",
    "Monitor",
    "MonitorConfig",
    "MonitorState",
    "Overloaded",
    "Producer",
    "ProducerClosed",
    "ProducerConfig",
    "ProducerState",
    "ProducerStats",
    "Record",
    "RecordTooLarge",
    "RedriveReport",
    "SegmentLog",
    "ShardStats",
    "StreamNotFound",
    "TreasureEngineError",
    "VerifyReport",
    "__version__",
    "breakers",
]
