"""Every exception treasure_engine raises, under one base class.

```text
TreasureEngineError(Exception)
├── ConfigError(TreasureEngineError, ValueError)          a config value out of range; names the field
├── RecordTooLarge(TreasureEngineError, ValueError)       data + partition key over max_record_bytes
├── InvalidPartitionKey(TreasureEngineError, ValueError)  empty, or over 256 characters
├── InvalidHashKey(TreasureEngineError, ValueError)       explicit hash key not a decimal in [0, 2**128)
├── MalformedRecord(TreasureEngineError, ValueError)      bytes that do not decode (KPL, responses)
├── BufferFull(TreasureEngineError)                       ring full: policy reject, or the block timed out
│   └── Overloaded(BufferFull)                            backlog critical and the producer sheds (shed_when_critical)
├── ProducerClosed(TreasureEngineError)                   submit after close (or before start)
├── CircuitOpen(TreasureEngineError)                      a circuit breaker refused the call (name, remaining_s)
├── LogError(TreasureEngineError, OSError)                a segment log (DLQ, spill, WAL) cannot be read or written
│   ├── LogLocked(LogError)                               another writer holds the log's directory
│   └── LogNotFound(LogError)                             no log at that path
├── FlushTimeout(TreasureEngineError, TimeoutError)       flush/close did not finish in time; nothing dropped
└── EndpointError(TreasureEngineError)                    Kinesis refused requests; records are kept
    ├── AuthError(EndpointError)                          credentials or permissions rejected
    ├── StreamNotFound(EndpointError)                     the stream does not exist (or is not ACTIVE)
    └── LeaseTableNotFound(EndpointError)                 the consumer's lease table does not exist
```

The first twelve come from the Rust extension (`DownstreamError` and its subclasses live in
`treasure_engine.downstream`: `DownstreamOverloaded`, `DownstreamTimeout`, `DownstreamUnavailable`,
`DownstreamClosed`); `TypeError` is raised as is for data that is not bytes-like.
"""

from __future__ import annotations

from treasure_engine._core import (
    BufferFull,
    CircuitOpen,
    ConfigError,
    InvalidHashKey,
    InvalidPartitionKey,
    LogError,
    LogLocked,
    LogNotFound,
    MalformedRecord,
    Overloaded,
    ProducerClosed,
    RecordTooLarge,
    TreasureEngineError,
)

__all__ = [
    "AuthError",
    "BufferFull",
    "CircuitOpen",
    "ConfigError",
    "EndpointError",
    "FlushTimeout",
    "InvalidHashKey",
    "InvalidPartitionKey",
    "LeaseTableNotFound",
    "LogError",
    "LogLocked",
    "LogNotFound",
    "MalformedRecord",
    "Overloaded",
    "ProducerClosed",
    "RecordTooLarge",
    "StreamNotFound",
    "TreasureEngineError",
]


class FlushTimeout(TreasureEngineError, TimeoutError):
    """`flush()` or `close()` ran out of time; the undelivered events are still held (or dead-lettered on close)."""


class EndpointError(TreasureEngineError):
    """Kinesis refused requests in a way that retrying alone will not fix; records are kept, not dropped."""


class AuthError(EndpointError):
    """The endpoint rejected the credentials or the signature (wrong secret, expired token, no permission)."""


class StreamNotFound(EndpointError):
    """The stream does not exist or is not active."""


class LeaseTableNotFound(EndpointError):
    """The consumer's DynamoDB lease table does not exist (and `create_lease_table` is False)."""
