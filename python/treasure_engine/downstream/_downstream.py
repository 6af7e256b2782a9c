"""Calls from handlers to an HTTP service: bounded pool, deadline, breaker, retry budget, adaptive concurrency limit.

A `Downstream` sends each call through four guards, outermost first:

1. an adaptive concurrency limit (a gradient limiter in the spirit of Netflix's concurrency-limits) that lowers the
   number of calls in flight when the service's latency climbs, so load rolls back before the breaker has to trip;
   calls over the limit wait in a bounded queue for at most `queue_timeout_s`, else `DownstreamOverloaded`;
2. the optional breaker (any async context manager, e.g. `treasure_engine.CircuitBreaker`), around each attempt;
3. a deadline per call (`timeout_s`) covering the queue, every attempt and the backoff between them;
4. a retry budget: each admitted call deposits `retry_ratio` tokens and a retry spends one, so retries are at most
   that fraction of calls however hard the service fails. Calls refused by the limiter or the breaker are never
   retried; a call keeps its slot through its retries, and gives up retrying when the limit has come down below
   the calls in flight.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import random
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, Self

import aiohttp
import msgspec
import orjson

from treasure_engine._validate import _check, _check_types
from treasure_engine.downstream._errors import (
    DownstreamClosed,
    DownstreamError,
    DownstreamTimeout,
    DownstreamUnavailable,
)
from treasure_engine.downstream._limits import Admission, AsyncGuard, GradientLimiter, RetryBudget

log = logging.getLogger("treasure_engine.downstream")


LATENCY_SAMPLES = 2048
"""Recent attempt latencies kept for the p50/p99 in `metrics`."""


class DownstreamConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a `Downstream` calls one HTTP service. Durations are seconds."""

    timeout_s: float = 10.0
    """Deadline of a call: queueing, every attempt and the backoff between them (`request(timeout=...)` overrides)."""
    max_connections: int = 100
    """Connections in the pool (aiohttp's connector limit)."""
    limiter: Literal["gradient", "fixed"] = "gradient"
    """"gradient": the limit adapts to the service's latency; "fixed": it stays at `initial_limit`."""
    initial_limit: int = 20
    min_limit: int = 1
    max_limit: int = 100
    rtt_tolerance: float = 1.5
    """Latency, as a multiple of the no-load latency, that the limiter accepts before it lowers the limit."""
    smoothing: float = 0.2
    """Weight of a new, lower limit against the current one (1 = take it at once)."""
    backoff_ratio: float = 0.9
    """Factor applied to the limit after a window that saw a drop (a timeout, 429 or 503)."""
    window_s: float = 0.1
    """Shortest sampling window of the limiter; a window also needs `window_min_samples` calls to close."""
    window_min_samples: int = 10
    probe_interval_s: float = 30.0
    """How often (jittered ±25%) the limiter halves its limit and re-learns the no-load latency (0 = never)."""
    max_queue: int = 1000
    """Calls that may wait for a slot; beyond it calls are refused at once."""
    queue_timeout_s: float = 0.5
    """Longest wait for a slot (0 = refuse at once when the limit is full)."""
    max_attempts: int = 3
    """Attempts per call, the first included."""
    retry_ratio: float = 0.1
    """Tokens each admitted call deposits in the retry budget; a retry spends 1."""
    retry_budget_max: float = 10.0
    """Most tokens the budget holds (it starts empty)."""
    retry_statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    """Responses that are retried (when the budget allows) and recorded as failures by the breaker."""
    retry_on_timeout: bool = True
    retry_on_connection_error: bool = True
    retry_methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
    """Methods that are retried: the idempotent ones by default."""
    backoff_base_s: float = 0.05
    backoff_max_s: float = 1.0
    """Retry n waits a random time in [0, min(backoff_max_s, backoff_base_s * 2**(n-1))] (full jitter)."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check("timeout_s", self.timeout_s > 0, "must be > 0", self.timeout_s)
        _check("max_connections", self.max_connections >= 1, "must be >= 1", self.max_connections)
        _check("min_limit", self.min_limit >= 1, "must be >= 1", self.min_limit)
        _check("max_limit", self.max_limit >= self.min_limit, "must be >= min_limit", self.max_limit)
        _check(
            "initial_limit",
            self.min_limit <= self.initial_limit <= self.max_limit,
            "must be in [min_limit, max_limit]",
            self.initial_limit,
        )
        _check("rtt_tolerance", self.rtt_tolerance >= 1.0, "must be >= 1", self.rtt_tolerance)
        _check("smoothing", 0 < self.smoothing <= 1, "must be in (0, 1]", self.smoothing)
        _check("backoff_ratio", 0 < self.backoff_ratio < 1, "must be in (0, 1)", self.backoff_ratio)
        _check("window_s", self.window_s >= 0, "must be >= 0", self.window_s)
        _check("window_min_samples", self.window_min_samples >= 1, "must be >= 1", self.window_min_samples)
        _check("probe_interval_s", self.probe_interval_s >= 0, "must be >= 0", self.probe_interval_s)
        _check("max_queue", self.max_queue >= 0, "must be >= 0", self.max_queue)
        _check("queue_timeout_s", self.queue_timeout_s >= 0, "must be >= 0", self.queue_timeout_s)
        _check("max_attempts", self.max_attempts >= 1, "must be >= 1", self.max_attempts)
        _check("retry_ratio", 0 <= self.retry_ratio <= 1, "must be in [0, 1]", self.retry_ratio)
        _check("retry_budget_max", self.retry_budget_max >= 0, "must be >= 0", self.retry_budget_max)
        _check(
            "retry_statuses",
            isinstance(self.retry_statuses, (tuple, list))
            and all(isinstance(s, int) and 100 <= s <= 599 for s in self.retry_statuses),
            "must be HTTP status codes in [100, 599]",
            self.retry_statuses,
        )
        _check(
            "retry_methods",
            isinstance(self.retry_methods, (tuple, list))
            and all(isinstance(m, str) and m == m.upper() and m for m in self.retry_methods),
            "must be upper-case method names",
            self.retry_methods,
        )
        _check("backoff_base_s", self.backoff_base_s >= 0, "must be >= 0", self.backoff_base_s)
        _check(
            "backoff_max_s", self.backoff_max_s >= self.backoff_base_s, "must be >= backoff_base_s", self.backoff_max_s
        )


class DownstreamState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class DownstreamResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A downstream's answer, body read in full. Any status is returned; only transport failures raise."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed_s: float
    """Time of the whole call: queueing, attempts and backoff."""
    attempt_s: float
    """Time of the last attempt alone: the service's latency as this client saw it."""
    attempts: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    def json(self) -> Any:
        return orjson.loads(self.body)


class DownstreamMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a `Downstream`'s counters; latencies are of recent attempts, in seconds."""

    limit: int
    in_flight: int
    queued: int
    calls: int
    """Calls admitted past the limiter."""
    attempts: int
    succeeded: int
    """Calls that got a response whose status is not in retry_statuses."""
    failures: int
    """Calls that ended in an error or a retry_statuses response."""
    rejected: int
    """Calls refused by the limiter (`DownstreamOverloaded`); nothing sent."""
    breaker_refusals: int
    """Attempts the breaker refused; nothing sent."""
    timeouts: int
    retries: int
    retries_denied: int
    """Retries the budget did not allow."""
    budget_tokens: float
    noload_rtt_s: float | None
    p50_s: float | None
    p99_s: float | None


class _FailedStatus(Exception):
    """Raised inside the breaker's block so that it records a retry_statuses response as a failure."""

    def __init__(self, response: DownstreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class Downstream:
    """An HTTP service as handlers call it: `async with Downstream(url, config) as d: r = await d.request(...)`."""

    def __init__(
        self,
        base_url: str,
        config: DownstreamConfig | None = None,
        *,
        breaker: AsyncGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(base_url, str):
            raise TypeError(f"base_url must be a str, not {type(base_url).__name__}")
        _check("base_url", base_url.startswith(("http://", "https://")), "must be an http(s) URL", base_url)
        self.base_url = base_url.rstrip("/")
        self.config = config or DownstreamConfig()
        self.breaker = breaker
        self.state = DownstreamState.NEW
        self._clock = clock
        cfg = self.config
        fixed = cfg.limiter == "fixed"
        self.limiter = GradientLimiter(
            initial_limit=cfg.initial_limit,
            min_limit=cfg.initial_limit if fixed else cfg.min_limit,
            max_limit=cfg.initial_limit if fixed else cfg.max_limit,
            rtt_tolerance=cfg.rtt_tolerance,
            smoothing=cfg.smoothing,
            backoff_ratio=cfg.backoff_ratio,
            window_s=cfg.window_s,
            window_min_samples=cfg.window_min_samples,
            probe_interval_s=0.0 if fixed else cfg.probe_interval_s,
        )
        self.budget = RetryBudget(cfg.retry_ratio, cfg.retry_budget_max)
        self._session: aiohttp.ClientSession | None = None
        self._admission = Admission(self.limiter, self.base_url, clock, cfg.queue_timeout_s, cfg.max_queue)
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._calls = self._attempts = self._succeeded = self._failures = 0
        self._breaker_refusals = self._timeouts = 0

    # --- lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Opens the connection pool. Idempotent while running; a closed `Downstream` cannot restart."""
        if self.state is DownstreamState.RUNNING:
            return
        if self.state is DownstreamState.CLOSED:
            raise DownstreamClosed(f"downstream {self.base_url} is closed and cannot restart")
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, limit_per_host=self.config.max_connections)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        self.limiter.open_window(self._clock())
        self.state = DownstreamState.RUNNING
        log.info("downstream started", extra={"base_url": self.base_url, "limiter": self.config.limiter})

    async def close(self) -> None:
        """Closes the pool; calls waiting for a slot get `DownstreamClosed`. Idempotent."""
        if self.state is DownstreamState.CLOSED:
            return
        self.state = DownstreamState.CLOSED
        self._admission.close(lambda: DownstreamClosed(f"downstream {self.base_url} closed"))
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("downstream closed", extra={"base_url": self.base_url, **msgspec.structs.asdict(self.metrics)})

    def __del__(self) -> None:
        if getattr(self, "state", DownstreamState.CLOSED) is DownstreamState.RUNNING:
            warnings.warn(
                f"Downstream {self.base_url!r} was never closed (call `await downstream.close()`)",
                ResourceWarning,
                stacklevel=1,
            )

    # --- metrics

    @property
    def limit(self) -> int:
        return self.limiter.limit

    @property
    def in_flight(self) -> int:
        return self._admission.in_flight

    @property
    def metrics(self) -> DownstreamMetrics:
        recent = sorted(self._latencies)
        return DownstreamMetrics(
            limit=self.limiter.limit,
            in_flight=self._admission.in_flight,
            queued=len(self._admission.waiters),
            calls=self._calls,
            attempts=self._attempts,
            succeeded=self._succeeded,
            failures=self._failures,
            rejected=self._admission.rejected,
            breaker_refusals=self._breaker_refusals,
            timeouts=self._timeouts,
            retries=self.budget.withdrawals,
            retries_denied=self.budget.denied,
            budget_tokens=self.budget.tokens,
            noload_rtt_s=self.limiter.noload_rtt,
            p50_s=_percentile(recent, 0.50),
            p99_s=_percentile(recent, 0.99),
        )

    # --- calls

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> DownstreamResponse:
        """Sends `method base_url+path` and returns the response, whatever its status.

        Raises `DownstreamOverloaded` (limit and queue full; nothing sent), `DownstreamTimeout` (deadline passed),
        `DownstreamUnavailable` (connection failed), `DownstreamClosed`, or what the breaker raises when it refuses.
        """
        if self.state is not DownstreamState.RUNNING:
            raise DownstreamClosed(f"downstream {self.base_url} is {self.state.value}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if json is not None and data is not None:
            raise ValueError("pass json or data, not both")
        body: bytes | str | None = orjson.dumps(json) if json is not None else data
        hdrs = dict(headers or {})
        if json is not None:
            hdrs.setdefault("Content-Type", "application/json")
        method = method.upper()
        url = self.base_url + path
        started = self._clock()
        deadline = started + (self.config.timeout_s if timeout is None else timeout)

        await self._admission.acquire(deadline)
        self._calls += 1
        self.budget.deposit()
        attempt = 0
        try:
            while True:
                attempt += 1
                outcome = await self._attempt(method, url, body, hdrs, deadline, started, attempt)
                if isinstance(outcome, DownstreamResponse) and outcome.status not in self.config.retry_statuses:
                    self._succeeded += 1
                    return outcome
                if not self._may_retry(method, outcome, attempt, deadline):
                    self._failures += 1
                    if isinstance(outcome, DownstreamResponse):
                        return outcome
                    raise outcome
                delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
                delay = min(random.uniform(0, delay), max(0.0, deadline - self._clock()))
                # The slot is held through the backoff: the retry does not queue behind new calls.
                await asyncio.sleep(delay)
                if self._clock() >= deadline:
                    self._failures += 1
                    self._timeouts += 1
                    if isinstance(outcome, DownstreamResponse):
                        return outcome
                    raise DownstreamTimeout(f"{method} {url}: deadline passed after {attempt} attempt(s)")
        finally:
            self._admission.release()

    async def get(self, path: str, **kwargs: Any) -> DownstreamResponse:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> DownstreamResponse:
        return await self.request("POST", path, **kwargs)

    def _may_retry(
        self, method: str, outcome: DownstreamResponse | DownstreamError, attempt: int, deadline: float
    ) -> bool:
        cfg = self.config
        if attempt >= cfg.max_attempts or method not in cfg.retry_methods or self._clock() >= deadline:
            return False
        if self._admission.in_flight > self.limiter.limit:
            # The limit came down while this call was out: shed its retry rather than add load.
            return False
        if isinstance(outcome, DownstreamTimeout):
            retryable = cfg.retry_on_timeout
        elif isinstance(outcome, DownstreamUnavailable):
            retryable = cfg.retry_on_connection_error
        else:
            retryable = isinstance(outcome, DownstreamResponse)
        return retryable and self.budget.try_withdraw()

    async def _attempt(
        self,
        method: str,
        url: str,
        body: bytes | str | None,
        headers: dict[str, str],
        deadline: float,
        started: float,
        attempt: int,
    ) -> DownstreamResponse | DownstreamError:
        """One HTTP exchange through the breaker. Returns the response or the typed error; raises only what the
        breaker raises when it refuses (never retried), or cancellation."""
        session = self._session
        if session is None:
            raise DownstreamClosed(f"downstream {self.base_url} closed")
        remaining = deadline - self._clock()
        if remaining <= 0:
            self._timeouts += 1
            return DownstreamTimeout(f"{method} {url}: deadline passed before attempt {attempt}")
        if self.breaker is None:
            self._attempts += 1
            return await self._exchange(session, method, url, body, headers, remaining, started, attempt)
        entered = False
        try:
            async with self.breaker:
                entered = True
                self._attempts += 1
                outcome = await self._exchange(session, method, url, body, headers, remaining, started, attempt)
                return _raise_failure(outcome, self.config.retry_statuses)
        except _FailedStatus as failed:
            return failed.response
        except Exception as exc:
            if not entered:
                self._breaker_refusals += 1
                raise
            if isinstance(exc, DownstreamError):
                return exc
            raise

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        body: bytes | str | None,
        headers: dict[str, str],
        remaining: float,
        started: float,
        attempt: int,
    ) -> DownstreamResponse | DownstreamError:
        """One request and its body; transport failures come back as typed errors, and feed the limiter."""
        in_flight = self._admission.in_flight
        t0 = self._clock()
        try:
            async with session.request(
                method, url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=remaining)
            ) as resp:
                payload = await resp.read()
                status, resp_headers = resp.status, resp.headers
        except TimeoutError:
            now = self._clock()
            self._timeouts += 1
            self._latencies.append(now - t0)
            self.limiter.on_drop(in_flight, now)
            return DownstreamTimeout(f"{method} {url}: no response within {remaining:.3f} s (attempt {attempt})")
        except aiohttp.ClientError as exc:
            return DownstreamUnavailable(f"{method} {url}: {type(exc).__name__}: {exc} (attempt {attempt})")
        now = self._clock()
        self._latencies.append(now - t0)
        if status in (429, 503):
            self.limiter.on_drop(in_flight, now)
        else:
            self.limiter.on_sample(now - t0, in_flight, now)
        return DownstreamResponse(
            status=status,
            headers=resp_headers,
            body=payload,
            elapsed_s=now - started,
            attempt_s=now - t0,
            attempts=attempt,
        )


def _raise_failure(
    outcome: DownstreamResponse | DownstreamError, failure_statuses: tuple[int, ...]
) -> DownstreamResponse:
    """Inside the breaker's block: errors and failure statuses are raised so that the breaker records them."""
    if isinstance(outcome, DownstreamError):
        raise outcome
    if outcome.status in failure_statuses:
        raise _FailedStatus(outcome)
    return outcome


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
