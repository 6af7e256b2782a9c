"""The context a consumer shares with its shard workers (the workers' only view of the consumer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from treasure_engine._core import Record
from treasure_engine.breaker import CircuitBreaker
from treasure_engine.config import ConsumerConfig
from treasure_engine.consumer._coordinator import LeaseCoordinator
from treasure_engine.consumer._types import BatchResult
from treasure_engine.dlq import DeadLetter
from treasure_engine.kinesis import KinesisClient


@dataclass(eq=False)
class ShardContext:
    """What the shard workers of one consumer share with it and with each other: its config, its clients once
    started, the shard map's facts, and the handler, metrics and dead-letter calls. The consumer owns it and
    keeps it current; a worker reads it and touches nothing else of the consumer."""

    config: ConsumerConfig
    handle: Callable[[list[Record]], Awaitable[BatchResult | None]]
    """The user's handler."""
    observe: Callable[[float, list[Record]], None]
    """Records one handler call (started at `time.perf_counter()`) while a Monitor watches."""
    letter: Callable[..., DeadLetter]
    """Builds the dead letter of one record (`Consumer` context: stream, shard, application)."""
    dead_letter: Callable[[list[DeadLetter]], Awaitable[None]]
    """Stores dead letters durably (the consumer's queue)."""
    breaker: CircuitBreaker | None = None
    owns_breaker: bool = False
    """True for a breaker of the consumer's own (`ConsumerConfig.breaker`): each handler call takes a permit."""
    client: KinesisClient | None = None
    coordinator: LeaseCoordinator | None = None
    closed_shards: set[str] = field(default_factory=set)
    """Shards the last ListShards showed closed (a reshard's parents)."""
    hash_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    """shard -> its (starting, ending) hash keys, from the last ListShards."""
    warned_out_of_range: set[str] = field(default_factory=set)
    sync_now: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to ask the consumer for a shard sync now (a shard read to its end)."""
