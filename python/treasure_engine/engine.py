"""The Engine: Producer, Consumer, Monitor, dead-letter queues and breakers composed from one `EngineConfig`.

    async with Engine(EngineConfig.from_toml("engine.toml"), handler=handle) as engine:
        engine.submit(b'{"user": 7}', "user-7")

`Engine.background(config)` runs the same on its own event loop in a daemon thread, for threaded services (Flask,
Django, gunicorn sync workers): `submit` is the Rust method itself, safe from any thread.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Mapping
from typing import Any, Self

import msgspec

from treasure_engine._core import ConfigError, ProducerClosed
from treasure_engine._loop_thread import LoopThread
from treasure_engine.config import ConsumerConfig, ProducerConfig, _convert, read_toml
from treasure_engine.consumer import Consumer, Handler
from treasure_engine.monitoring import Monitor, MonitorConfig
from treasure_engine.producer import Producer

__all__ = ["BackgroundEngine", "Engine", "EngineConfig"]

ENV_PREFIX = "TREASURE_ENGINE__"


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything an Engine runs; a section left out is not run. TOML tables `[producer]`, `[consumer]`,
    `[monitor]`; each is the config struct of that part (see docs/configuration.md)."""

    producer: ProducerConfig | None = None
    """Deliver events submitted through the engine to Kinesis."""
    consumer: ConsumerConfig | None = None
    """Read a stream into the handler (`Engine(..., handler=)` or `treasure-engine run --handler`)."""
    monitor: MonitorConfig | None = None
    """The monitor's settings (metrics, health endpoints, alerts); None: not served."""
    handler: str | None = None
    """`module:function` of the consumer's handler, for `treasure-engine run` (`--handler` overrides it)."""
    shutdown_timeout_s: float = 10.0
    """Longest `stop()` takes: the consumer's batches in flight, the producer's flush."""

    def __post_init__(self) -> None:
        if self.producer is None and self.consumer is None:
            raise ConfigError("engine: configure [producer], [consumer] or both")
        if not self.shutdown_timeout_s > 0:
            raise ConfigError(f"shutdown_timeout_s: must be > 0, got {self.shutdown_timeout_s!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Builds a config from plain data, applying `TREASURE_ENGINE__SECTION__KEY` overrides from `env`
        (default: the process environment). Errors raise `ConfigError` naming the field."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"invalid configuration: expected a table (mapping), got {type(data).__name__}")
        merged = _apply_env(dict(data), os.environ if env is None else env)
        return _convert(merged, cls)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Reads a TOML file (see `from_dict`); a missing or malformed file raises `ConfigError` naming it."""
        data = read_toml(path)
        return cls.from_dict(data, env=env)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """`TREASURE_ENGINE__PRODUCER__LINGER_MS=20` sets data["producer"]["linger_ms"] = 20: values are read as TOML
    values (numbers, booleans, quoted strings, arrays) and otherwise taken as plain strings."""
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty section or key")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


class Engine:
    """Runs what its config enables. Use `async with Engine(config, handler=...) as engine:` or `start()`/`stop()`."""

    def __init__(self, config: EngineConfig, *, handler: Handler | None = None) -> None:
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, not {type(config).__name__}")
        if config.consumer is not None and handler is None:
            raise ConfigError("engine: [consumer] is configured but no handler was given")
        self.config = config
        self.producer = Producer(config.producer) if config.producer is not None else None
        self.consumer = Consumer(config.consumer, handler) if config.consumer is not None and handler else None
        self.monitor: Monitor | None = None
        self._started = False

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, handler: Handler | None = None) -> Engine:
        return cls(EngineConfig.from_toml(path), handler=handler)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Starts the monitor, the producer and the consumer; on a failure, stops what started and raises."""
        if self._started:
            raise RuntimeError("an Engine starts once")
        self._started = True
        try:
            if self.config.monitor is not None:
                self.monitor = Monitor(self.config.monitor)
                await self.monitor.start()
            if self.producer is not None:
                await self.producer.start()
                if self.monitor is not None:
                    self.monitor.watch_producer(self.producer)
            if self.consumer is not None:
                await self.consumer.start()
                if self.monitor is not None:
                    self.monitor.watch_consumer(self.consumer)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, timeout: float | None = None) -> None:
        """Consumer first (batches in flight, final checkpoints, leases handed back), then the producer (flush;
        what cannot be delivered is dead-lettered), then the monitor. Idempotent."""
        timeout = self.config.shutdown_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self.consumer is not None:
            await self.consumer.stop(timeout=timeout * 0.6 if self.producer is not None else timeout)
        if self.producer is not None:
            await self.producer.close(max(0.5, deadline - time.monotonic()))
        if self.monitor is not None:
            await self.monitor.stop()

    def submit(self, data: bytes, partition_key: str, explicit_hash_key: str | None = None) -> None:
        """`Producer.submit`: accept one event or raise, never blocking on I/O."""
        self._require_producer().submit(data, partition_key, explicit_hash_key)

    def submit_many(self, events: Any) -> int:
        """`Producer.submit_many`: accept in order, stop at the first refused for lack of room."""
        return int(self._require_producer().submit_many(events))

    async def flush(self, timeout: float | None = None) -> None:
        await self._require_producer().flush(timeout)

    def stats(self) -> dict[str, Any]:
        """{"producer": counters, "consumer": per shard, "alerts": current alert states}, for what runs."""
        out: dict[str, Any] = {}
        if self.producer is not None:
            out["producer"] = self.producer.stats_dict()
        if self.consumer is not None:
            out["consumer"] = self.consumer.stats()
        if self.monitor is not None:
            out["alerts"] = [msgspec.to_builtins(a) for a in self.monitor.alerts()]
        return out

    def _require_producer(self) -> Producer:
        if self.producer is None:
            raise ProducerClosed("this engine has no [producer] section")
        return self.producer

    @classmethod
    def background(cls, config: EngineConfig, *, handler: Handler | None = None) -> BackgroundEngine:
        """The engine on its own event loop in a daemon thread; `submit` is callable from any thread."""
        return BackgroundEngine(cls(config, handler=handler))


class BackgroundEngine:
    """An `Engine` driven by its own event loop (uvloop when installed) in a daemon thread. `submit` and
    `submit_many` are the producer's Rust methods; `flush()` and `stop()` block."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread = LoopThread("treasure-engine")
        try:
            self._thread.call(engine.start(), None)
        except BaseException:
            self._thread.stop()
            raise
        producer = engine.producer
        if producer is not None:
            self.submit = producer.submit
            self.submit_many = producer.submit_many

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flush(self, timeout: float | None = None) -> None:
        self._thread.call(self.engine.flush(timeout), timeout)

    def stats(self) -> dict[str, Any]:
        return dict(self._thread.call(_value(self.engine.stats), 10.0))

    def stop(self, timeout: float | None = None) -> None:
        if not self._thread.running:
            return
        try:
            self._thread.call(self.engine.stop(timeout), timeout or self.engine.config.shutdown_timeout_s)
        finally:
            self._thread.stop()


async def _value(f: Any) -> Any:
    return f()
