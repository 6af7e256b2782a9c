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
import concurrent.futures
import enum
import inspect
import logging
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, Self

import msgspec

from treasure_engine import _core
from treasure_engine.config import ProducerConfig
from treasure_engine.errors import AuthError, FlushTimeout, ProducerClosed, StreamNotFound
from treasure_engine.kinesis import KinesisClient, Outcome

__all__ = ["BackgroundProducer", "DeadLetter", "DeadLetterHook", "Producer", "ProducerState", "ProducerStats"]

log = logging.getLogger("treasure_engine.producer")

DEAD_LETTER_BATCH = 10_000
"""Most dead letters handed to the hook at once (memory stays bounded however many there are)."""


class ProducerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class ProducerStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counts of events (not Kinesis records, except `records_sent` and `requests`)."""

    accepted: int
    refused: int
    delivered: int
    dead_lettered: int
    in_flight: int
    retried: int
    throttled: int
    requests: int
    requests_failed: int
    records_sent: int
    ring_bytes_used: int
    buffered_bytes: int


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An event the producer could not deliver, with why."""

    data: bytes
    partition_key: str
    explicit_hash_key: str | None
    attempts: int
    error_code: str
    error_message: str
    age_s: float
    stream: str


DeadLetterHook = Callable[[list[DeadLetter]], Awaitable[None] | None]
"""Called with batches of dead letters; they count as dead-lettered once it returns without raising."""


class _Submit(Protocol):
    def __call__(
        self,
        data: bytes | bytearray | memoryview,
        partition_key: str,
        /,
        explicit_hash_key: str | int | None = None,
    ) -> None: ...


class _SubmitMany(Protocol):
    def __call__(self, records: Iterable[tuple[Any, ...]], /) -> int: ...


def _not_running(*_args: Any, **_kwargs: Any) -> Any:
    raise ProducerClosed("producer is not running (call start() or use `async with`)")


async def _log_dead_letters(batch: list[DeadLetter]) -> None:
    reasons: dict[str, int] = {}
    for d in batch:
        reasons[d.error_code] = reasons.get(d.error_code, 0) + 1
    log.error(
        "dead-lettered %d event(s) with no dead-letter hook configured",
        len(batch),
        extra={"dead_letters": len(batch), "reasons": reasons, "stream": batch[0].stream if batch else ""},
    )


class Producer:
    """Delivers events to one Kinesis stream.

    `submit()` and `submit_many()` are the Rust methods themselves once started: safe from any thread, never
    blocking on I/O. Use `async with Producer(config) as p:` or `start()` / `close()`.
    """

    submit: _Submit
    """`submit(data, partition_key, explicit_hash_key=None)`: accept one event or raise (nothing half-accepted)."""
    submit_many: _SubmitMany
    """`submit_many([(data, key), ...]) -> int`: accept in order, stop at the first refused for lack of room."""

    def __init__(self, config: ProducerConfig, *, on_dead_letter: DeadLetterHook | None = None) -> None:
        if not isinstance(config, ProducerConfig):
            raise TypeError(f"config must be a ProducerConfig, not {type(config).__name__}")
        self.config = config
        self.state = ProducerState.NEW
        self._hook: DeadLetterHook = on_dead_letter or _log_dead_letters
        self._pipeline: _core.Pipeline | None = None
        self._client: KinesisClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_error: tuple[Outcome, str] | None = None
        self._auth_failures = 0
        self._pending_dead: list[DeadLetter] = []
        self._closed = asyncio.Event()
        self._stopping = False
        self.submit = _not_running
        self.submit_many = _not_running

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
        try:
            await client.open()
            shards = await client.list_open_shards(cfg.stream)
            pipeline = _core.Pipeline(cfg.stream, shards, **cfg.pipeline_kwargs())
        except BaseException:
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
            asyncio.create_task(self._refresh_shards(), name="treasure-engine-shards"),
            asyncio.create_task(self._dead_letter_pump(), name="treasure-engine-dead-letters"),
        ]
        self.state = ProducerState.RUNNING
        log.info(
            "producer started",
            extra={"stream": cfg.stream, "shards": len(shards), "endpoint": client.endpoint_url},
        )

    async def flush(self, timeout: float | None = None) -> None:
        """Waits until every accepted event is delivered or dead-lettered.

        Raises `FlushTimeout` when `timeout` passes, and `AuthError` when the endpoint keeps rejecting our
        credentials; in both cases nothing is dropped (the events stay in flight and are retried).
        """
        pipeline = self._require_pipeline()
        deadline = None if timeout is None else time.monotonic() + timeout
        pipeline.begin_flush()
        try:
            delay = 0.001
            while True:
                s = pipeline.stats()
                if s["in_flight"] == 0 and not self._pending_dead:
                    return
                if self._last_error is not None and self._last_error[0] is Outcome.AUTH and self._auth_failures >= 2:
                    raise AuthError(
                        f"Kinesis rejected our credentials: {self._last_error[1]} "
                        f"({s['in_flight']} event(s) kept in flight, none dropped)"
                    )
                if self._last_error is not None and self._last_error[0] is Outcome.MISSING:
                    raise StreamNotFound(f"{self._last_error[1]} ({s['in_flight']} event(s) kept in flight)")
                if deadline is not None and time.monotonic() >= deadline:
                    raise FlushTimeout(f"flush timed out after {timeout}s with {s['in_flight']} event(s) in flight")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
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
        while self._inflight:
            pending = list(self._inflight)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Every request is back with the batcher: abandoning now dead-letters everything undelivered.
        await loop.run_in_executor(None, pipeline.shutdown, True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._drain_dead(final=True)
        if self._client is not None:
            await self._client.close()
        self.submit = _not_running
        self.submit_many = _not_running
        self.state = ProducerState.CLOSED
        self._closed.set()
        log.info("producer closed", extra={"stream": self.config.stream, **self.stats_dict()})

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
        return dict(self._pipeline.stats())

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
        self._pump()

    def _pump(self) -> None:
        """Starts a send task for each ready request, up to max_in_flight."""
        pipeline = self._pipeline
        if pipeline is None or self._stopping:
            return
        room = self.config.max_in_flight - len(self._inflight)
        if room <= 0:
            return
        for request in pipeline.poll(room):
            task = asyncio.create_task(self._send(pipeline, request))
            self._inflight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sender task failed", exc_info=task.exception())
        self._pump()

    async def _send(self, pipeline: _core.Pipeline, request: _core.Request) -> None:
        client = self._client
        assert client is not None
        try:
            with memoryview(request) as body:
                response = await client.put_records(body)
        except asyncio.CancelledError:
            pipeline.fail(request, "not_sent", "producer stopping")
            raise
        except Exception as e:
            pipeline.fail(request, "transient", f"{type(e).__name__}: {e}")
            raise
        if response.outcome is Outcome.OK:
            self._last_error = None
            self._auth_failures = 0
            try:
                pipeline.complete(request, response.body)
            except _core.MalformedRecord as e:
                # complete() already sent every record back for retry.
                log.warning("unparseable PutRecords response, retrying its records: %s", e)
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

    async def _refresh_shards(self) -> None:
        """Re-reads the shard map on a timer, and at once when a response shows it is stale."""
        pipeline, client = self._require_pipeline(), self._client
        assert client is not None
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            if not pipeline.refresh_wanted() and time.monotonic() - last < self.config.shard_refresh_s:
                continue
            last = time.monotonic()
            try:
                pipeline.set_shards(await client.list_open_shards(self.config.stream))
            except Exception as e:
                log.warning("shard map refresh failed: %s", e)

    async def _dead_letter_pump(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            await self._drain_dead(final=False)

    async def _drain_dead(self, *, final: bool) -> None:
        while await self._drain_dead_batch(final=final):
            pass

    async def _drain_dead_batch(self, *, final: bool) -> bool:
        """Hands one bounded batch of dead letters to the hook; True when there may be more."""
        pipeline = self._pipeline
        if pipeline is None:
            return False
        stream = self.config.stream
        for rec in pipeline.take_dead(DEAD_LETTER_BATCH):
            data, key, ehk, attempts, code, message, age = rec
            self._pending_dead.append(
                DeadLetter(
                    data=data,
                    partition_key=key,
                    explicit_hash_key=ehk,
                    attempts=attempts,
                    error_code=code,
                    error_message=message,
                    age_s=age,
                    stream=stream,
                )
            )
        if not self._pending_dead:
            return False
        batch = self._pending_dead
        try:
            result = self._hook(batch)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("dead-letter hook failed; %d event(s) kept and retried", len(batch))
            if final:
                raise
            return False
        self._pending_dead = []
        pipeline.confirm_dead(len(batch))
        return len(batch) >= DEAD_LETTER_BATCH

    # --- threaded services -------------------------------------------------------------------------------

    @classmethod
    def background(cls, config: ProducerConfig, *, on_dead_letter: DeadLetterHook | None = None) -> BackgroundProducer:
        """A started producer whose event loop runs in a daemon thread, for WSGI and threaded services."""
        return BackgroundProducer(cls(config, on_dead_letter=on_dead_letter))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class BackgroundProducer:
    """A `Producer` driven by its own event loop (uvloop when installed) in a daemon thread.

    `submit`/`submit_many` are the same Rust methods as on `Producer`; `flush()` and `close()` block.
    """

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name="treasure-engine-producer", daemon=True)
        self._thread.start()
        try:
            self._call(producer.start(), None)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            raise
        self.submit = producer.submit
        self.submit_many = producer.submit_many

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    def _call(self, coro: Awaitable[Any], timeout: float | None) -> Any:
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop)
        try:
            return future.result(None if timeout is None else timeout + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise FlushTimeout("background producer did not answer in time") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, timeout: float | None = None) -> None:
        self._call(self.producer.flush(timeout), timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self.producer.close(timeout), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def stats(self) -> ProducerStats:
        return self.producer.stats()

    @property
    def state(self) -> ProducerState:
        return self.producer.state


async def _as_coroutine(aw: Awaitable[Any]) -> Any:
    return await aw
