"""The sender's pieces: the Kinesis endpoint breaker and its judgement of responses, and the Rust
pipeline opened on its state directory."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from treasure_engine import _core
from treasure_engine.breaker import BreakerConfig, CircuitBreaker
from treasure_engine.config import ProducerConfig
from treasure_engine.dlq import claim_slot
from treasure_engine.kinesis import Outcome


class EndpointFailed(Exception):
    """Raised inside the endpoint breaker for a request Kinesis failed: it counts as a failure."""


class Throttled(Exception):
    """Raised inside the endpoint breaker for a throttled request: ignored (throttling is flow control)."""


KINESIS_BREAKER = BreakerConfig(
    window="count",
    window_size=20,
    minimum_calls=5,
    failure_rate=0.5,
    open_s=1.0,
    open_backoff=2.0,
    open_max_s=30.0,
    half_open_calls=1,
)
"""The endpoint breaker's defaults (`ProducerConfig.endpoint_breaker_config=None`)."""


def judge(outcome: Outcome) -> None:
    """Tells the endpoint breaker what a response means, by raising inside its guard."""
    if outcome is Outcome.THROTTLED:
        raise Throttled
    if outcome is not Outcome.OK:
        raise EndpointFailed


def endpoint_breaker_of(config: ProducerConfig) -> CircuitBreaker | None:
    if not config.endpoint_breaker:
        return None
    base = config.endpoint_breaker_config or KINESIS_BREAKER
    # The producer decides what a failure is: it raises EndpointFailed or Throttled inside the guard, and the
    # sender needs the state to move to half-open at the deadline to know when to probe.
    tuned = msgspec.structs.replace(base, record=(Exception,), ignore=(*base.ignore, Throttled), auto_half_open=True)
    return CircuitBreaker(f"kinesis:{config.stream}", tuned)


def open_pipeline(cfg: ProducerConfig, shards: list[tuple[str, int, int]], state_dir: Path) -> _core.Pipeline:
    """Starts the Rust pipeline; with a spill or a WAL, on the first free slot of `<state_dir>/<kind>/<stream>`
    (a restarted process takes over a free slot, and replays what it holds)."""
    kwargs = cfg.pipeline_kwargs()
    if cfg.durability == "wal":
        kind, arg = "wal", "wal_dir"
    elif cfg.overflow == "spill":
        kind, arg = "spill", "spill_dir"
    else:
        return _core.Pipeline(cfg.stream, shards, **kwargs)
    base = state_dir / kind / re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.stream.rsplit("/", 1)[-1])
    return claim_slot(base, lambda path: _core.Pipeline(cfg.stream, shards, **{**kwargs, arg: str(path)}))
