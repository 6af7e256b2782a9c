"""Load shedding for a downstream: the adaptive concurrency limit (gradient), the retry budget and the
async guard that holds a slot."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from treasure_engine.downstream._errors import DownstreamOverloaded

log = logging.getLogger("treasure_engine.downstream")


class GradientLimiter:
    """Concurrency limit from the ratio of no-load latency to current latency (Netflix's Gradient limit).

    Samples are collected in windows (at least `window_s` long and `window_min_samples` samples). When a window
    closes, with `rtt` its mean latency and `noload` the least window mean seen since the last probe:

    - a window that saw a drop: `limit *= backoff_ratio`;
    - a window whose peak in-flight stayed under half the limit changes nothing (the limit was not the constraint);
    - else `gradient = clamp(rtt_tolerance * noload / rtt, 0.5, 1)` and
      `new = limit * gradient + sqrt(limit)`: flat latency grows the limit by its square root per window, latency
      climbing past `rtt_tolerance` times the no-load latency shrinks it; decreases are smoothed
      (`limit + smoothing * (new - limit)`).

    The limit stays in [min_limit, max_limit]; latency alone brings it no lower than 4 (where L = L/2 + sqrt(L)),
    drops bring it down to min_limit. Every `probe_interval_s` (jittered) the limit is halved and the
    no-load latency forgotten, so that a no-load latency learned under load, or a service grown slower for good,
    is re-measured.
    """

    def __init__(
        self,
        *,
        initial_limit: int,
        min_limit: int,
        max_limit: int,
        rtt_tolerance: float = 1.5,
        smoothing: float = 0.2,
        backoff_ratio: float = 0.9,
        window_s: float = 0.1,
        window_min_samples: int = 10,
        probe_interval_s: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.rtt_tolerance = rtt_tolerance
        self.smoothing = smoothing
        self.backoff_ratio = backoff_ratio
        self.window_s = window_s
        self.window_min_samples = window_min_samples
        self.probe_interval_s = probe_interval_s
        self._rng = rng or random.Random()
        self._limit = float(min(max(initial_limit, min_limit), max_limit))
        self.noload_rtt: float | None = None
        """Least window mean latency since the last probe (seconds)."""
        self.last_rtt: float | None = None
        """Mean latency of the last closed window (seconds)."""
        self.windows = 0
        self.probes = 0
        self.stale = 0
        """Samples left out because their call started before the window opened."""
        self._win_start: float | None = None
        self._win_n = 0
        self._win_sum = 0.0
        self._win_max_in_flight = 0
        self._win_dropped = False
        self._next_probe: float | None = None

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        return max(self.min_limit, int(self._limit))

    @property
    def estimate(self) -> float:
        """The limit before rounding down."""
        return self._limit

    def on_sample(self, rtt_s: float, in_flight: int, now: float) -> None:
        """A call that started with `in_flight` calls in flight (itself included) completed in `rtt_s`.

        A call that started before the window opened measured the limit before the last change: it is left out,
        so that each window measures the limit it opened with (a window lasts at least one round trip)."""
        self._open(now - rtt_s)
        assert self._win_start is not None
        if now - rtt_s < self._win_start:
            self.stale += 1
            return
        self._win_n += 1
        self._win_sum += rtt_s
        self._win_max_in_flight = max(self._win_max_in_flight, in_flight)
        self._maybe_close(now)

    def on_drop(self, in_flight: int, now: float) -> None:
        """A call timed out or was turned away by the service for overload (429, 503)."""
        self._open(now)
        self._win_dropped = True
        self._win_max_in_flight = max(self._win_max_in_flight, in_flight)
        self._maybe_close(now)

    def open_window(self, now: float) -> None:
        """Starts sampling at `now` (otherwise the first sample's start opens the first window)."""
        self._win_start = None
        self._open(now)

    def _open(self, now: float) -> None:
        """Opens the first window at `now` (the first sample's start)."""
        if self._win_start is None:
            self._win_start = now
        if self._next_probe is None and self.probe_interval_s > 0:
            self._next_probe = now + self._probe_delay()

    def _probe_delay(self) -> float:
        return self.probe_interval_s * self._rng.uniform(0.75, 1.25)

    def _maybe_close(self, now: float) -> None:
        assert self._win_start is not None
        if now - self._win_start < self.window_s:
            return
        if self._win_n < self.window_min_samples and not self._win_dropped:
            return
        n, total, peak, dropped = self._win_n, self._win_sum, self._win_max_in_flight, self._win_dropped
        self._win_start, self._win_n, self._win_sum, self._win_max_in_flight, self._win_dropped = now, 0, 0.0, 0, False
        self.windows += 1
        if self._next_probe is not None and now >= self._next_probe:
            self._next_probe = now + self._probe_delay()
            self.probes += 1
            self.noload_rtt = None
            self._set(self._limit / 2)
            log.debug("limiter probe", extra={"limit": self.limit})
            return
        self._update(total / n if n else None, peak, dropped)

    def _update(self, rtt: float | None, peak_in_flight: int, dropped: bool) -> None:
        if rtt is not None:
            self.last_rtt = rtt
            self.noload_rtt = rtt if self.noload_rtt is None else min(self.noload_rtt, rtt)
        if dropped:
            self._set(self._limit * self.backoff_ratio)
            return
        if rtt is None or self.noload_rtt is None or peak_in_flight < self._limit / 2:
            return
        gradient = min(1.0, max(0.5, self.rtt_tolerance * self.noload_rtt / rtt))
        new = self._limit * gradient + math.sqrt(self._limit)
        if new < self._limit:
            new = self._limit + self.smoothing * (new - self._limit)
        self._set(new)

    def _set(self, value: float) -> None:
        self._limit = min(float(self.max_limit), max(float(self.min_limit), value))


class RetryBudget:
    """Token bucket that caps retries at a fraction of calls: each call deposits `ratio`, a retry withdraws 1.

    It starts empty, so over any span `retries <= ratio * calls` (the cap only lowers the count).
    """

    def __init__(self, ratio: float, max_tokens: float) -> None:
        self.ratio = ratio
        self.max_tokens = max_tokens
        self.tokens = 0.0
        self.deposits = 0
        self.withdrawals = 0
        self.denied = 0

    def deposit(self) -> None:
        self.deposits += 1
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def try_withdraw(self) -> bool:
        # A hair of slack so that 10 deposits of 0.1 buy one retry despite binary floating point.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            self.withdrawals += 1
            return True
        self.denied += 1
        return False


class AsyncGuard(Protocol):
    """What `Downstream` needs of a breaker: an async context manager around each attempt that raises when it
    refuses on entry and records the exception (or its absence) on exit. `treasure_engine.CircuitBreaker` is one."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool | None: ...


class Admission:
    """The slots of one downstream: a call takes one while fewer than the limiter's limit are in flight, else
    waits in line (at most `max_queue` waiting, each at most `queue_timeout_s`); a freed slot passes straight to
    the next waiter, so `in_flight` counts granted waiters too."""

    def __init__(
        self,
        limiter: GradientLimiter,
        name: str,
        clock: Callable[[], float],
        queue_timeout_s: float,
        max_queue: int,
    ) -> None:
        self.limiter = limiter
        self.name = name
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.rejected = 0
        """Calls refused for want of a slot."""
        self._queue_timeout_s = queue_timeout_s
        self._max_queue = max_queue
        self._clock = clock

    def close(self, error: Callable[[], BaseException]) -> None:
        """Fails every call waiting for a slot with `error()`."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())

    async def acquire(self, deadline: float) -> None:
        """Takes a slot, waiting in line until `deadline` at the latest; `DownstreamOverloaded` when the line is
        full or the wait runs out."""
        if self.in_flight < self.limiter.limit and not self.waiters:
            self.in_flight += 1
            return
        wait = min(self._queue_timeout_s, deadline - self._clock())
        if len(self.waiters) >= self._max_queue or wait <= 0:
            self.rejected += 1
            raise DownstreamOverloaded(
                f"downstream {self.name}: {self.in_flight} call(s) in flight at limit {self.limiter.limit}, "
                f"{len(self.waiters)} waiting"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted just as the wait ran out: the slot is ours, give it back.
                self.release()
            self.rejected += 1
            raise DownstreamOverloaded(
                f"downstream {self.name}: no slot within {wait:.3f} s (limit {self.limiter.limit})"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            raise
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def release(self) -> None:
        """Gives a slot back: it passes straight to the next waiter while the limit allows."""
        self.in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        # A slot passes straight to the next waiter, so in_flight counts granted waiters too.
        while self.waiters and self.in_flight < self.limiter.limit:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
