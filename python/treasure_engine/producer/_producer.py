"""Producer: `submit()` from any thread into the Rust ring; sender tasks deliver what the batcher seals.

```text
submit ─► Rust ring ─► Rust batcher thread ─► ready queue ─(eventfd)─► sender tasks (this module)
                                                                          │ sign + POST (bounded in flight)
                                                 Rust: complete/fail ◄────┘
```

Every accepted event ends delivered or dead-lettered (`accepted == delivered + dead_lettered + in_flight`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, Self, cast

from treasure_engine import _core
from treasure_engine._loop_thread import LoopThread
from treasure_engine._metrics_slot import MetricsSlot
from treasure_engine._state import default_app_name, state_dir_of
from treasure_engine.breaker import BreakerState, CircuitBreaker, CircuitOpen
from treasure_engine.config import ProducerConfig
from treasure_engine.dlq import DeadLetterQueue
from treasure_engine.errors import AuthError, FlushTimeout, ProducerClosed, StreamNotFound
from treasure_engine.kinesis import KinesisClient, Outcome, Shard
from treasure_engine.producer._dead_letters import DeadLetterDrain, DeadLetterHook
from treasure_engine.producer._sender import (
    KINESIS_BREAKER,
    EndpointFailed,
    Throttled,
    endpoint_breaker_of,
    judge,
    open_pipeline,
)
from treasure_engine.producer._types import ProducerState, ProducerStats, Submit, SubmitMany, not_running

if TYPE_CHECKING:
    from treasure_engine.monitoring import ProducerMetrics  # noqa: F401 - named in the MetricsSlot base, a string

log = logging.getLogger("treasure_engine.producer")


FLUSH_POLL_S = 0.1
"""Longest `flush` waits between looks at the counters when no request comes back meanwhile."""


ABANDON_DEAD_BOUND_BYTES = 8 << 20
"""While a close abandons a backlog, the batcher reads on only once the dead list holds less than this."""


class Producer(MetricsSlot["ProducerMetrics"]):
    """Delivers events to one Kinesis stream.

    `submit()` and `submit_many()` are the Rust methods themselves once started: safe from any thread, never
    blocking on I/O. Use `async with Producer(config) as p:` or `start()` / `close()`.
    """

    submit: Submit
    """`submit(data, partition_key, explicit_hash_key=None)`: accept one event or raise (nothing half-accepted)."""
    submit_many: SubmitMany
    """`submit_many([(data, key), ...]) -> int`: accept in order, stop at the first refused for lack of room."""

    def __init__(self, config: ProducerConfig, *, on_dead_letter: DeadLetterHook | None = None) -> None:
        if not isinstance(config, ProducerConfig):
            raise TypeError(f"config must be a ProducerConfig, not {type(config).__name__}")
        self.config = config
        self.state = ProducerState.NEW
        self._pipeline: _core.Pipeline | None = None
        self._client: KinesisClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        # The request each send task was given: a task cancelled before it ran never reaches its own `fail`, and
        # its cancellation's traceback keeps the request alive past the batcher's stop (its records then counted
        # in flight for good). `_sent` hands such a request back.
        self._sending: dict[asyncio.Task[None], _core.Request] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_error: tuple[Outcome, str] | None = None
        self._auth_failures = 0
        self._app_name = config.app_name or default_app_name()
        self._closed = asyncio.Event()
        self._stopping = False
        self._breaker = endpoint_breaker_of(config)
        self._probes = (config.endpoint_breaker_config or KINESIS_BREAKER).half_open_calls
        self._pump_timer: asyncio.TimerHandle | None = None
        # Set when a response showed the shard map stale: the batcher holds the shards concerned until it comes.
        self._refresh_now = asyncio.Event()
        # Set when the batcher reports dead letters (through the wake-up fd), and when requests come back: the
        # dead-letter pump and flush wait on these instead of polling.
        self._progress = asyncio.Event()
        self._dead = DeadLetterDrain(
            config.stream, self._app_name, on_dead_letter, lambda: self._pipeline, self._progress
        )
        self.submit = not_running
        self.submit_many = not_running

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Reads the shard map, starts the batcher thread and the sender. A closed producer cannot restart."""
        if self.state is not ProducerState.NEW:
            raise ProducerClosed(f"producer cannot start from state {self.state.value}")
        self.state = ProducerState.STARTING
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        client = KinesisClient(
            region=cfg.region,
            endpoint_url=cfg.endpoint_url,
            max_connections=cfg.max_in_flight,
            request_timeout_s=cfg.request_timeout_s,
        )
        state_dir = state_dir_of(cfg.state_dir, cfg.app_name)
        try:
            if self._dead.hook is None:
                # Opened before anything is accepted: a state directory we cannot write fails the start.
                self._dead.dlq = await asyncio.to_thread(
                    DeadLetterQueue.claim, state_dir / "dlq", app_name=cfg.app_name
                )
            await client.open()
            shards = await client.list_open_shards(cfg.stream)
            pipeline = await asyncio.to_thread(open_pipeline, cfg, shards, state_dir)
        except BaseException:
            if self._dead.dlq is not None:
                self._dead.dlq.close()
            await client.close()
            self.state = ProducerState.CLOSED
            self._closed.set()
            raise
        self._client = client
        self._pipeline = pipeline
        self.submit = pipeline.submit
        self.submit_many = pipeline.submit_many
        self._loop.add_reader(pipeline.wakeup_fd(), self._on_wakeup)
        self._tasks = [
            asyncio.create_task(self._refresh_shards(shards), name="treasure-engine-shards"),
            asyncio.create_task(self._dead.pump(), name="treasure-engine-dead-letters"),
        ]
        self.state = ProducerState.RUNNING
        log.info(
            "producer started",
            extra={
                "stream": cfg.stream,
                "shards": len(shards),
                "endpoint": client.endpoint_url,
                "dead_letter_queue": str(self._dead.dlq.path) if self._dead.dlq is not None else "on_dead_letter hook",
            },
        )
        if self._dead.dlq is not None:
            log.info("dead letters of stream %s go to %s", cfg.stream, self._dead.dlq.path)

    async def flush(self, timeout: float | None = None) -> None:
        """Waits until every accepted event is delivered or dead-lettered.

        Raises `FlushTimeout` when `timeout` passes, and `AuthError` when the endpoint keeps rejecting our
        credentials; in both cases nothing is dropped (the events stay in flight and are retried).
        """
        _check_timeout(timeout)
        pipeline = self._require_pipeline()
        deadline = None if timeout is None else time.monotonic() + timeout
        pipeline.begin_flush()
        try:
            while True:
                self._progress.clear()
                s = pipeline.stats()
                backlog = s["spill_backlog_bytes"] or s["wal_replay_pending"]
                if s["in_flight"] == 0 and not backlog and not self._dead.pending:
                    return
                if self._last_error is not None and self._last_error[0] is Outcome.AUTH and self._auth_failures >= 2:
                    raise AuthError(
                        f"Kinesis rejected our credentials: {self._last_error[1]} "
                        f"({s['in_flight']} event(s) kept in flight, none dropped)"
                    )
                if self._last_error is not None and self._last_error[0] is Outcome.MISSING:
                    raise StreamNotFound(f"{self._last_error[1]} ({s['in_flight']} event(s) kept in flight)")
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise FlushTimeout(f"flush timed out after {timeout}s with {s['in_flight']} event(s) in flight")
                # Woken by each request that comes back and each stored batch of dead letters; the rest (a
                # misplaced aggregate judged by the batcher, spill or WAL replay) is seen within FLUSH_POLL_S.
                wait = FLUSH_POLL_S if deadline is None else max(0.0, min(FLUSH_POLL_S, deadline - now))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._progress.wait()
        finally:
            pipeline.end_flush()

    async def close(self, timeout: float | None = 30.0) -> None:
        """Flushes (up to `timeout`), then stops. Idempotent. Undelivered events are dead-lettered, not lost."""
        if self.state in (ProducerState.CLOSING, ProducerState.CLOSED):
            await self._closed.wait()
            return
        if self.state is ProducerState.NEW:
            self.state = ProducerState.CLOSED
            self._closed.set()
            return
        self.state = ProducerState.CLOSING
        pipeline = self._require_pipeline()
        pipeline.close()
        try:
            await self.flush(timeout)
        except (FlushTimeout, AuthError, StreamNotFound) as e:
            log.error("closing with undelivered events: %s; they go to the dead-letter hook", e)  # noqa: TRY400
        finally:
            await self._stop(pipeline)

    async def _stop(self, pipeline: _core.Pipeline) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pipeline.wakeup_fd())
        # No new sends from here on: a send started now (by a finishing task's callback) would still hold its
        # records when the batcher stops, and its outcome would reach nobody.
        self._stopping = True
        if self._pump_timer is not None:
            self._pump_timer.cancel()
            self._pump_timer = None
        while self._inflight:
            pending = list(self._inflight)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            # Every request is back with the batcher: abandoning now dead-letters everything undelivered.
            await self._abandon(pipeline)
            await self._dead.drain(final=True)
            # Every dead letter is stored: the WAL holds nothing that needs replaying.
            await asyncio.to_thread(pipeline.finish_wal)
        finally:
            await self._release(pipeline)
        left = pipeline.stats()["spill_backlog_bytes"]
        if left:
            log.warning(
                "%d byte(s) of spilled events were not delivered; they stay in the spill and are replayed by the "
                "next producer of stream %s on this state_dir",
                left,
                self.config.stream,
            )
        log.info("producer closed", extra={"stream": self.config.stream, **self.stats_dict()})

    async def _release(self, pipeline: _core.Pipeline) -> None:
        """Closes the storage and the HTTP client and marks the producer closed, even after a failed stop (whose
        error `close` raises): a second `close` then returns at once instead of waiting for this one."""
        try:
            await asyncio.to_thread(pipeline.close_storage)
            if self._dead.dlq is not None:
                self._dead.dlq.close()
        finally:
            if self._client is not None:
                await self._client.close()
            self.submit = not_running
            self.submit_many = not_running
            self.state = ProducerState.CLOSED
            self._closed.set()

    async def _abandon(self, pipeline: _core.Pipeline) -> None:
        """Stops the batcher, storing dead letters while it turns the backlog into them: it reads no more of
        the ring while the dead list holds more than ``ABANDON_DEAD_BOUND_BYTES``, so closing with a full ring
        costs about that much memory on top of the ring, not the ring's contents again in dead records. When
        the dead letters cannot be stored, the bound is lifted and ``close`` reports that after the stop."""
        stop = asyncio.get_running_loop().run_in_executor(None, pipeline.shutdown, True, ABANDON_DEAD_BOUND_BYTES)
        storing = True
        try:
            while not stop.done():
                if storing:
                    try:
                        if await self._dead.drain_batch(final=True):
                            continue
                    except Exception:  # logged by the drain; the final drain retries and raises it
                        storing = False
                        pipeline.lift_dead_bound()
                await asyncio.wait({stop}, timeout=0.005)
        except BaseException:
            # Cancelled: nobody takes dead letters any more, so the stop must not wait for that; it ends before
            # the storage it writes to is closed.
            pipeline.lift_dead_bound()
            with contextlib.suppress(BaseException):
                await stop
            raise
        await stop

    def __del__(self) -> None:
        if getattr(self, "state", ProducerState.CLOSED) in (ProducerState.RUNNING, ProducerState.STARTING):
            warnings.warn(
                f"Producer for {self.config.stream!r} was never closed; undelivered events are lost to this "
                "process (call `await producer.close()`)",
                ResourceWarning,
                stacklevel=1,
            )

    # --- stats -------------------------------------------------------------------------------------------

    def stats(self) -> ProducerStats:
        return ProducerStats(**{k: v for k, v in self.stats_dict().items() if k in ProducerStats.__struct_fields__})

    def stats_dict(self) -> dict[str, int]:
        if self._pipeline is None:
            return dict.fromkeys(ProducerStats.__struct_fields__, 0)
        stats = cast(dict[str, int], dict(self._pipeline.stats()))  # a TypedDict of ints
        # Counted by the pipeline until confirmed stored, including those taken and waiting here for the store.
        stats["dead_letter_pending"] = self._pipeline.dead_pending()
        stats["dead_letter_write_failures"] = self._dead.failures
        return stats

    @property
    def dead_letter_queue(self) -> DeadLetterQueue | None:
        """Where this producer's dead letters are stored (None when an `on_dead_letter` hook takes them)."""
        return self._dead.dlq

    @property
    def endpoint_breaker(self) -> CircuitBreaker | None:
        """The circuit breaker guarding the Kinesis endpoint (None with `endpoint_breaker=False`)."""
        return self._breaker

    @property
    def last_error(self) -> str | None:
        """The last request-level error from the endpoint, if any."""
        return None if self._last_error is None else self._last_error[1]

    # --- sender ------------------------------------------------------------------------------------------

    def _require_pipeline(self) -> _core.Pipeline:
        if self._pipeline is None:
            raise ProducerClosed("producer is not running (call start() or use `async with`)")
        return self._pipeline

    def _on_wakeup(self) -> None:
        """The batcher sealed requests. Clear the signal first, room or not: it is level-triggered, and a send
        finishing pumps again, so nothing waits on it."""
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.clear_wakeup()
            if pipeline.dead_pending():
                self._dead.wake.set()
        self._pump()

    def _pump(self) -> None:
        """Starts a send task for each ready request, up to max_in_flight (one probe at a time half-open)."""
        pipeline = self._pipeline
        if pipeline is None or self._stopping:
            return
        room = self.config.max_in_flight - len(self._inflight)
        breaker = self._breaker
        if breaker is not None:
            state = breaker.state
            if state in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
                # Nothing is sent while the endpoint's breaker is open; the ring and the spill hold the burst.
                self._pump_later(breaker.metrics().open_remaining_s)
                return
            if state is BreakerState.HALF_OPEN:
                room = min(room, self._probes - len(self._inflight))
        if room <= 0:
            return
        for request in pipeline.poll(room):
            task = asyncio.create_task(self._send(pipeline, request))
            self._inflight.add(task)
            self._sending[task] = request
            task.add_done_callback(self._sent)

    def _pump_later(self, delay: float) -> None:
        """Pumps again when the breaker may let requests through (it does not wake the eventfd)."""
        if self._pump_timer is not None and not self._pump_timer.cancelled():
            return
        loop = self._loop
        if loop is None:
            return

        def fire() -> None:
            self._pump_timer = None
            self._pump()

        self._pump_timer = loop.call_later(min(max(delay, 0.005), 60.0), fire)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        request = self._sending.pop(task, None)
        pipeline = self._pipeline
        if request is not None and pipeline is not None and task.cancelled():
            # Cancelled before `_send` could give it back (or after it did: then this says so, and is ignored).
            with contextlib.suppress(RuntimeError):
                pipeline.fail(request, "not_sent", "producer stopping")
        self._progress.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("sender task failed", exc_info=task.exception())
        self._pump()

    async def _send(self, pipeline: _core.Pipeline, request: _core.Request) -> None:
        client = self._client
        assert client is not None
        metrics, started = self.attached_metrics, time.perf_counter()
        try:
            response = await self._put(client, request)
        except CircuitOpen as e:
            pipeline.fail(request, "not_sent", f"endpoint circuit breaker open: {e}")
            self._pump_later(e.remaining_s)
            return
        except asyncio.CancelledError:
            pipeline.fail(request, "not_sent", "producer stopping")
            raise
        except Exception as e:
            if metrics is not None:
                metrics.request(started, request.records, "error")
            pipeline.fail(request, "transient", f"{type(e).__name__}: {e}")
            raise
        if metrics is not None:
            metrics.request(started, request.records, response.outcome.value)
        if response.outcome is Outcome.OK:
            self._last_error = None
            self._auth_failures = 0
            try:
                pipeline.complete(request, response.body)
            except _core.MalformedRecord as e:
                # complete() already sent every record back for retry.
                log.warning("unparseable PutRecords response, retrying its records: %s", e)
            if pipeline.refresh_wanted():
                self._refresh_now.set()
            return
        message = f"{response.error_type}: {response.message}"
        self._last_error = (response.outcome, message)
        if response.outcome is Outcome.THROTTLED:
            pipeline.fail(request, "throttled", message)
        elif response.outcome is Outcome.AUTH:
            self._auth_failures += 1
            log.error("Kinesis rejected the request's credentials: %s", message)
            pipeline.fail(request, "auth", message)
        elif response.outcome is Outcome.MISSING:
            log.error("stream unavailable: %s", message)
            pipeline.fail(request, "not_sent", message)
        else:
            log.warning("PutRecords failed (HTTP %s): %s", response.status, message)
            pipeline.fail(request, "transient", message)

    async def _put(self, client: KinesisClient, request: _core.Request) -> Any:
        """Posts one request, through the endpoint's breaker when there is one."""
        breaker = self._breaker
        with memoryview(request) as body:
            if breaker is None:
                return await client.put_records(body, request.body_sha256)
            response = None
            try:
                async with breaker:
                    # Hashed only once the breaker lets the request through (a refused one is never signed).
                    response = await client.put_records(body, request.body_sha256)
                    judge(response.outcome)
            except (Throttled, EndpointFailed):
                pass
            return response

    async def _refresh_shards(self, known: list[Shard]) -> None:
        """Re-reads the shard map on a timer, and at once when a response shows it is stale (the batcher holds
        the shards concerned until the new map comes). Logs once per reshard."""
        pipeline, client = self._require_pipeline(), self._client
        assert client is not None
        last = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._refresh_now.wait()
            self._refresh_now.clear()
            if not pipeline.refresh_wanted() and time.monotonic() - last < self.config.shard_refresh_s:
                continue
            last = time.monotonic()
            try:
                shards = await client.list_open_shards(self.config.stream)
                pipeline.set_shards(shards)
            except Exception as e:
                log.warning("shard map refresh failed: %s", e)
                continue
            if shards != known:
                s = pipeline.stats()
                log.warning(
                    "stream %s resharded: open shards %s (were %s); records held by the batcher are re-routed, and "
                    "aggregates that landed in a shard whose range does not hold them are sent again "
                    "(%d event(s) so far, see wrong_shard_records)",
                    self.config.stream,
                    ", ".join(sid for sid, _, _ in shards),
                    ", ".join(sid for sid, _, _ in known),
                    s["wrong_shard_records"],
                    extra={"stream": self.config.stream, "shards": len(shards)},
                )
                known = shards

    # --- threaded services -------------------------------------------------------------------------------

    @classmethod
    def background(cls, config: ProducerConfig, *, on_dead_letter: DeadLetterHook | None = None) -> BackgroundProducer:
        """A started producer whose event loop runs in a daemon thread, for WSGI and threaded services."""
        return BackgroundProducer(cls(config, on_dead_letter=on_dead_letter))


class BackgroundProducer:
    """A `Producer` driven by its own event loop (uvloop when installed) in a daemon thread.

    `submit`/`submit_many` are the same Rust methods as on `Producer`; `flush()` and `close()` block.
    """

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._thread = LoopThread("treasure-engine-producer")
        try:
            self._thread.call(producer.start(), None)
        except BaseException:
            self._thread.stop()
            raise
        self.submit = producer.submit
        self.submit_many = producer.submit_many

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> None:
        _check_timeout(timeout)
        self._thread.call(self.producer.flush(timeout), timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        if not self._thread.running:
            return
        try:
            self._thread.call(self.producer.close(timeout), timeout)
        finally:
            self._thread.stop()

    def stats(self) -> ProducerStats:
        return self.producer.stats()

    @property
    def state(self) -> ProducerState:
        return self.producer.state


def _check_timeout(timeout: object) -> None:
    """`flush`'s timeout: None (no limit) or a number of seconds >= 0."""
    if timeout is None:
        return
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not timeout >= 0:
        raise _core.ConfigError(f"invalid configuration: timeout: must be >= 0 seconds or None (got {timeout!r})")
