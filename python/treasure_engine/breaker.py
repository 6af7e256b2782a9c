"""Circuit breakers with resilience4j's semantics; the state machine and the sync hot paths are Rust.

`CircuitBreaker(name, BreakerConfig(...))` guards calls with `with breaker:`, `async with breaker:`, `@breaker`
(sync and async functions) or `breaker.call(fn, ...)`, and raises `CircuitOpen` when it refuses one.
`docs/breaker.md` describes the states and the window.
"""

from __future__ import annotations

import enum
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Literal, ParamSpec, TypeVar, cast, overload

import msgspec

from treasure_engine import _core
from treasure_engine._core import CircuitOpen
from treasure_engine._validate import _check, _check_types

__all__ = [
    "BreakerConfig",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "breakers",
]

log = logging.getLogger("treasure_engine.breaker")

P = ParamSpec("P")
R = TypeVar("R")


class BreakerState(enum.StrEnum):
    """The states of a breaker (resilience4j's, in lower case)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DISABLED = "disabled"
    FORCED_OPEN = "forced_open"
    METRICS_ONLY = "metrics_only"


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When a `CircuitBreaker` opens, how long it stays open, and how it tries again. Durations are seconds."""

    window: Literal["count", "time"] = "count"
    """Sliding window over the last `window_size` calls ("count") or the last `window_size` seconds ("time")."""
    window_size: int = 100
    minimum_calls: int = 100
    """Calls in the window before any rate is evaluated (for a count window, at most `window_size`)."""
    failure_rate: float = 0.5
    """Open when failed / calls reaches this, in (0, 1]."""
    slow_call_s: float = 60.0
    """A call lasting at least this long is slow."""
    slow_call_rate: float = 1.0
    """Open when slow / calls reaches this, in (0, 1]."""
    open_s: float = 60.0
    """Time spent open before trial calls are let through."""
    open_backoff: float = 1.0
    """Each consecutive re-open (a failed half-open trial) multiplies the open time by this; 1 = constant."""
    open_max_s: float = 600.0
    """Cap on the open time with backoff."""
    half_open_calls: int = 10
    """Trial calls permitted half-open; when they have all completed, their rates close or re-open it."""
    half_open_max_wait_s: float = 0.0
    """Re-open if the trial calls have not all completed in this time; 0 = wait for them."""
    auto_half_open: bool = False
    """Go half-open at the deadline (as seen by `state`), not only when the next call arrives."""
    record: tuple[type[BaseException], ...] = (Exception,)
    """Exceptions that count as failures; any other `Exception` counts as a success."""
    ignore: tuple[type[BaseException], ...] = ()
    """Exceptions that count as nothing (a half-open trial permit is given back); checked before `record`."""
    failure_predicate: Callable[[BaseException], bool] | None = None
    """If set, decides instead of `record` whether an exception (not in `ignore`) is a failure."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check("window_size", self.window_size >= 1, "must be >= 1", self.window_size)
        if self.window == "time":
            _check("window_size", self.window_size <= 3600, "must be <= 3600 seconds", self.window_size)
        else:
            _check("window_size", self.window_size <= 1 << 20, "must be <= 1048576 calls", self.window_size)
        _check("minimum_calls", 1 <= self.minimum_calls < 1 << 32, "must be >= 1", self.minimum_calls)
        _check("failure_rate", 0 < self.failure_rate <= 1, "must be in (0, 1]", self.failure_rate)
        _check("slow_call_rate", 0 < self.slow_call_rate <= 1, "must be in (0, 1]", self.slow_call_rate)
        _check("slow_call_s", 0 < self.slow_call_s < 1e9, "must be > 0", self.slow_call_s)
        _check("open_s", 0 < self.open_s < 1e9, "must be > 0", self.open_s)
        _check("open_backoff", 1 <= self.open_backoff < 1e9, "must be >= 1", self.open_backoff)
        _check("open_max_s", self.open_s <= self.open_max_s < 1e9, "must be >= open_s", self.open_max_s)
        _check("half_open_calls", 1 <= self.half_open_calls < 1 << 32, "must be >= 1", self.half_open_calls)
        _check(
            "half_open_max_wait_s",
            0 <= self.half_open_max_wait_s < 1e9,
            "must be >= 0",
            self.half_open_max_wait_s,
        )
        for name in ("record", "ignore"):
            value = getattr(self, name)
            _check(
                name,
                isinstance(value, tuple) and all(isinstance(t, type) and issubclass(t, BaseException) for t in value),
                "must be a tuple of exception types",
                value,
            )
        _check(
            "failure_predicate",
            self.failure_predicate is None or callable(self.failure_predicate),
            "must be callable or None",
            self.failure_predicate,
        )


class BreakerMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one breaker. Rates are None until `minimum_calls` calls are in the window."""

    state: BreakerState
    failure_rate: float | None
    slow_call_rate: float | None
    calls: int
    """Calls in the window (half-open: trial calls completed)."""
    failed: int
    slow: int
    slow_failed: int
    not_permitted: int
    """Calls refused since creation or the last `reset()`."""
    transitions: int
    open_remaining_s: float
    """Time left open; inf when forced open, 0 when not open."""


TransitionCallback = Callable[[str, BreakerState, BreakerState], object]


class CircuitBreaker(_core.CircuitBreaker):
    """A named circuit breaker. Thread-safe and task-safe; no lock is held while a guarded call runs.

    `clock` (a callable returning monotonic seconds) replaces the system clock, for tests.
    """

    __slots__ = ("_callbacks", "_config")

    _callbacks: list[TransitionCallback]
    _config: BreakerConfig | None

    def __new__(
        cls, name: str, config: BreakerConfig | None = None, *, clock: Callable[[], float] | None = None
    ) -> Any:
        if name == "":  # a metric label and a registry key: it must say which breaker
            raise _core.ConfigError("invalid configuration: breaker name must not be empty")
        c = config if config is not None else BreakerConfig()
        if not isinstance(c, BreakerConfig):
            raise TypeError(f"config must be a BreakerConfig, not {type(c).__name__}")
        return super().__new__(
            cls,
            name,
            window=c.window,
            window_size=c.window_size,
            minimum_calls=c.minimum_calls,
            failure_rate=c.failure_rate,
            slow_call_s=c.slow_call_s,
            slow_call_rate=c.slow_call_rate,
            open_s=c.open_s,
            open_backoff=c.open_backoff,
            open_max_s=c.open_max_s,
            half_open_calls=c.half_open_calls,
            half_open_max_wait_s=c.half_open_max_wait_s,
            auto_half_open=c.auto_half_open,
            record=c.record,
            ignore=c.ignore,
            predicate=c.failure_predicate,
            clock=clock,
        )

    def __init__(self, name: str, config: BreakerConfig | None = None, *, clock: Callable[[], float] | None = None):
        self._callbacks = []
        self._config = config

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state.value}>"

    @property
    def state(self) -> BreakerState:
        """The current state (a lazy OPEN -> HALF_OPEN shows here only with `auto_half_open`)."""
        return BreakerState(self._state)

    def metrics(self) -> BreakerMetrics:
        m = self._metrics()
        m["state"] = BreakerState(m["state"])
        return BreakerMetrics(**m)

    def acquire(self) -> _core.Permit:
        """Takes a permit for one call, or raises `CircuitOpen`: for a caller that cannot wrap the call in
        `async with`, `@breaker` or `call()`. Every permit goes back through `release`, however the call ends
        (a half-open trial permit never given back would hold the breaker half-open)."""
        return self._acquire()

    def release(self, permit: _core.Permit, error: BaseException | None = None) -> None:
        """Gives back a permit from `acquire` with the call's outcome: `error` None for a success, else the
        exception, classified as the guards classify it (recorded, ignored, or not a failure)."""
        self._release(permit, error)

    def on_transition(self, callback: TransitionCallback) -> TransitionCallback:
        """Calls `callback(name, from, to)` on every transition (usable as a decorator). A callback that raises
        is logged, never raised into the guarded call. It runs on the thread that noticed the transition."""
        self._callbacks.append(callback)
        return callback

    def _on_transitions(self, transitions: list[tuple[str, str, float]]) -> None:
        for old, new, at in transitions:
            from_, to = BreakerState(old), BreakerState(new)
            level = logging.WARNING if to in (BreakerState.OPEN, BreakerState.FORCED_OPEN) else logging.INFO
            log.log(
                level,
                "circuit breaker %s: %s -> %s",
                self.name,
                from_.value,
                to.value,
                extra={"breaker": self.name, "from_state": from_.value, "to_state": to.value, "at": at},
            )
            for callback in list(self._callbacks):
                try:
                    callback(self.name, from_, to)
                except Exception:
                    log.exception("circuit breaker %s: transition callback %r failed", self.name, callback)

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        """`@breaker`: every call of `func` (sync or async) goes through the breaker.

        The result is a Rust `GuardedFunction` (no Python frame is added; it binds as a method and shows `func`'s
        name, docstring, signature and code, so `inspect.iscoroutinefunction` sees an async `func` as one). Calling
        a guarded async function returns an awaitable that takes the permit when first awaited (`CircuitOpen`
        comes out of the `await`) and records the outcome when `func`'s coroutine returns or raises; cancelled,
        closed or dropped before that, it gives the permit back unrecorded.
        """
        return cast("Callable[P, Any]", self._guard(func, inspect.iscoroutinefunction(func)))


class BreakerRegistry:
    """Breakers by name: `breakers.get(name, config)` makes one the first time and returns it after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, CircuitBreaker] = {}

    def get(self, name: str, config: BreakerConfig | None = None) -> CircuitBreaker:
        """The breaker called `name`; `config` is used when it is made (a later different config is refused)."""
        with self._lock:
            breaker = self._by_name.get(name)
            if breaker is None:
                breaker = self._by_name[name] = CircuitBreaker(name, config)
            elif config is not None and config != breaker._config:
                raise _core.ConfigError(f"invalid configuration: breaker {name!r} exists with another config")
            return breaker

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Any:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)


breakers = BreakerRegistry()
"""The process-wide registry."""
