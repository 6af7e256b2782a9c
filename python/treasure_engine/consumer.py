"""The consumer: shard leases shared across processes, ordered parallel dispatch, poison isolation.

One `Consumer` per process. Its lease loop (see `leases.LeaseCoordinator`) decides which shards this worker
reads; each owned shard gets a `_ShardWorker` with two tasks:

- the *reader* calls GetRecords within the shard's limits (5 calls/s, 2 MiB/s), hands every response body to
  Rust (`_core.parse_get_records`: JSON, base64 and KPL de-aggregation in one pass, every aggregate checked
  against the shard's hash-key range by `out_of_range_aggregates`) and queues the pages, one page ahead of the
  dispatcher;
- the *dispatcher* splits pages into `parallelism` lanes by partition key (order per key kept), calls the
  handler with batches of up to `batch_size`, retries failures with backoff, bisects a failing batch to isolate
  a poison record, dead-letters what exhausts `max_attempts` or `max_record_age_s`, and checkpoints once every
  record of the pages before the checkpoint was handled or durably dead-lettered.

A downstream circuit breaker (`ConsumerConfig.breaker`, or any `CircuitBreaker` passed in) pauses the
dispatchers while it is open: the pages wait, the readers stop at one page ahead, the stream is the buffer,
and no record is dead-lettered because the downstream was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from treasure_engine import _core
from treasure_engine._core import CircuitOpen, ConfigError, MalformedRecord, Record
from treasure_engine.breaker import BreakerState, CircuitBreaker
from treasure_engine.config import ConsumerConfig
from treasure_engine.dlq import DeadLetter, DeadLetterQueue, default_state_dir, format_traceback
from treasure_engine.errors import AuthError, StreamNotFound
from treasure_engine.kinesis import KinesisClient, Outcome, ShardInfo
from treasure_engine.leases import AT_TIMESTAMP, LATEST, SHARD_END, TRIM_HORIZON, Lease, LeaseCoordinator, LeaseTable

if TYPE_CHECKING:
    from treasure_engine.metrics import ConsumerMetrics

__all__ = ["BatchResult", "Consumer", "Handler", "Record", "ShardStats"]

log = logging.getLogger("treasure_engine.consumer")

_OPEN_STATES = (BreakerState.OPEN, BreakerState.FORCED_OPEN)
_GET_RECORDS_MIN_INTERVAL_S = 0.2
"""Kinesis allows 5 GetRecords calls per second per shard."""
_SHARD_BYTES_PER_S = 2 * 1024 * 1024
"""... and 2 MiB per second per shard."""
_EMPTY_READS_TO_END = 3
"""Empty, caught-up reads of a shard ListShards reports closed before it counts as ended. Kinesis and kinesalite
end a closed shard with a null NextShardIterator; some emulators (moto) never do."""


class BatchResult:
    """What a handler may return: the records of its batch that failed (Lambda's ReportBatchItemFailures).

    Only those are retried; the others count as handled. Returning None means the whole batch was handled;
    raising means none of it was. `reasons` may say why a record failed (an exception or a message): a record
    that ends in the dead-letter queue carries it as its error type and message.
    """

    __slots__ = ("failed", "reasons")

    def __init__(
        self, failed: Iterable[Record] = (), reasons: Mapping[Record, BaseException | str] | None = None
    ) -> None:
        self.failed: tuple[Record, ...] = tuple(failed)
        self.reasons: Mapping[Record, BaseException | str] = reasons or {}

    def __repr__(self) -> str:
        return f"BatchResult(failed={len(self.failed)} record(s))"


Handler = Callable[[list[Record]], Awaitable[BatchResult | None]]


@dataclass(slots=True)
class ShardStats:
    """One shard as this worker sees it."""

    shard_id: str
    owned: bool = True
    checkpoint: str | None = None
    sub_sequence: int = 0
    millis_behind_latest: int | None = None
    records_read: int = 0
    records_handled: int = 0
    records_failed: int = 0
    """Failed handler attempts, counted per record (a record retried three times counts three)."""
    records_dead_lettered: int = 0
    malformed: int = 0
    """Records that did not de-aggregate (bad MD5, truncated protobuf): dead-lettered raw with the reason."""
    out_of_range_records: int = 0
    """Records delivered from KPL aggregates that hold any record outside the shard's hash-key range, all of their
    records (`out_of_range_aggregates="deliver"`; the KCL skips them): written before a reshard, or by a producer
    aggregating across shards. After a reshard, a repairing producer re-sent them: these are the duplicates."""
    skipped_out_of_range_records: int = 0
    """Records of KPL aggregates skipped whole, as the KCL does, because one of them lies outside the shard's
    hash-key range (`out_of_range_aggregates="skip"`); not in `records_read`."""
    checkpoints: int = 0
    """Checkpoints written to the lease table (at most one per checkpoint_interval_s while the shard is busy)."""
    paused: bool = False
    """Waiting for the downstream breaker to let calls through."""
    ended: bool = False
    """Read to SHARD_END and checkpointed so (a closed parent of a reshard)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Page:
    """Records read from one shard and not yet checkpointed."""

    __slots__ = ("bad", "end_seq", "end_sub", "lanes", "records")

    def __init__(self, lanes: list[list[Record]], bad: list[Any], end_seq: str | None, end_sub: int) -> None:
        self.lanes = lanes
        self.bad = bad
        self.records = sum(len(lane) for lane in lanes)
        self.end_seq = end_seq
        self.end_sub = end_sub


_END = object()
"""Queued by a reader after the last page of a shard that reached SHARD_END."""
_TIMEOUT = object()
"""No page came in the time given."""


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Consumer:
    """Reads one stream with the other workers of its application and calls `handle` with batches of records.

    `async with Consumer(config, handle) as consumer:` starts it; leaving the block (or `await stop()`) finishes
    the batches in flight, checkpoints and hands the leases back so other workers take them at once.
    """

    def __init__(
        self,
        config: ConsumerConfig,
        handle: Handler,
        *,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(config, ConsumerConfig):
            raise TypeError(f"config must be a ConsumerConfig, not {type(config).__name__}")
        if not (inspect.iscoroutinefunction(handle) or inspect.iscoroutinefunction(type(handle).__call__)):
            raise ConfigError(f"handler {handle!r} must be an async function: async def handle(records) -> ...")
        if breaker is not None and config.breaker is not None:
            raise ConfigError("give the consumer a breaker or a breaker config, not both")
        self.config = config
        self.worker_id = config.worker_id or _default_worker_id()
        self._handle = handle
        self._breaker = breaker if breaker is not None else _breaker_of(config)
        self._owns_breaker = breaker is None
        self._clock = clock
        self._app_name = config.app_name or config.application
        self._client: KinesisClient | None = None
        self._table: LeaseTable | None = None
        self._coordinator: LeaseCoordinator | None = None
        self._dlq: DeadLetterQueue | None = None
        self._workers: dict[str, _ShardWorker] = {}
        self._stats: dict[str, ShardStats] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed_shards: set[str] = set()
        self._hash_ranges: dict[str, tuple[int, int]] = {}
        """shard -> its (starting, ending) hash keys, from the last ListShards."""
        self._warned_out_of_range: set[str] = set()
        self._sync_now = asyncio.Event()
        self._rebalance_now = asyncio.Event()
        self._stopping = False
        self._started = False
        self._stopped = asyncio.Event()
        self._failure: BaseException | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._metrics: ConsumerMetrics | None = None  # set while a Monitor watches this consumer

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Checks the stream, opens (or creates) the lease table and starts taking leases.

        Raises `StreamNotFound` for a missing stream and `LeaseTableNotFound` for a missing lease table (with
        `create_lease_table=False`) or an unreachable endpoint: before anything starts, never in a loop.
        """
        if self._started:
            raise RuntimeError("a Consumer starts once")
        self._started = True
        cfg = self.config
        client = KinesisClient(
            region=cfg.region,
            endpoint_url=cfg.endpoint_url,
            max_connections=64,
            request_timeout_s=cfg.request_timeout_s,
        )
        table = LeaseTable(
            cfg.application,
            worker_id=self.worker_id,
            region=cfg.region,
            endpoint_url=cfg.dynamodb_endpoint_url,
            create=cfg.create_lease_table,
        )
        state_dir = Path(cfg.state_dir) if cfg.state_dir else default_state_dir(self._app_name)
        try:
            await client.open()
            shards = await client.list_all_shards(cfg.stream)
            await table.open()
            await table.ensure_table()
            await self._sync_leases(table, shards)
            self._dlq = await asyncio.to_thread(DeadLetterQueue.claim, state_dir / "dlq", app_name=self._app_name)
        except BaseException:
            await table.close()
            await client.close()
            self._stopped.set()
            raise
        self._client = client
        self._table = table
        self._coordinator = LeaseCoordinator(
            table, lease_duration_s=cfg.lease_duration_s, max_leases=cfg.max_leases, clock=self._clock
        )
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="treasure-engine-leases"),
            asyncio.create_task(self._shard_sync_loop(), name="treasure-engine-shard-sync"),
        ]
        log.info(
            "consumer %s started on stream %s (%d shard(s) listed); dead letters go to %s",
            self.worker_id,
            cfg.stream,
            len(shards),
            self._dlq.path,
            extra={"stream": cfg.stream, "application": cfg.application, "worker": self.worker_id},
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Finishes the batches in flight (up to `timeout`, default `shutdown_timeout_s`), checkpoints, hands the
        leases back and closes. A batch waiting on an open breaker or a retry backoff is abandoned at once: it is
        not checkpointed, so the next owner reads it again. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._coordinator is None:
            self._stopped.set()
            return
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self._workers.values())
        for w in workers:
            w.finish()
        if workers:
            limit = self.config.shutdown_timeout_s if timeout is None else timeout
            _, pending = await asyncio.wait([w.task for w in workers], timeout=limit or None)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.warning("stop: %d shard(s) did not finish in time; they go on from their checkpoints", len(pending))
        self._workers.clear()
        try:
            await self._coordinator.release_all()
        except Exception:
            log.exception("stop: could not hand the leases back; other workers take them when they expire")
        for s in self._stats.values():
            s.owned = False
        if self._dlq is not None:
            self._dlq.close()
        if self._table is not None:
            await self._table.close()
        if self._client is not None:
            await self._client.close()
        self._stopped.set()
        log.info("consumer %s stopped", self.worker_id, extra={"stats": self.stats()})

    async def wait(self) -> None:
        """Returns when the consumer has stopped; raises what stopped it if it failed on its own."""
        await self._stopped.wait()
        if self._failure is not None:
            raise self._failure

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per shard this worker has held: owned, checkpoint, millis_behind_latest, records read, handled,
        failed, dead-lettered, malformed, out of range, skipped out of range, paused, ended."""
        return {shard: s.as_dict() for shard, s in sorted(self._stats.items())}

    def _observe(self, started: float, batch: list[Record]) -> None:
        """Records one handler call's latency and size while a Monitor watches."""
        if self._metrics is not None:
            self._metrics.handled(started, len(batch))

    @property
    def breaker(self) -> CircuitBreaker | None:
        return self._breaker

    @property
    def dead_letter_queue(self) -> DeadLetterQueue | None:
        return self._dlq

    def owned_shards(self) -> list[str]:
        return sorted(self._workers)

    # --- leases and shards -------------------------------------------------------------------------------

    async def _sync_leases(self, table: LeaseTable, shards: Sequence[ShardInfo]) -> None:
        """Adds a lease for every listed shard that has none. A shard whose parents are listed too starts at its
        beginning (TRIM_HORIZON), as a reshard's child must; the others start at `start_at`."""
        listed = {s.shard_id for s in shards}
        self._closed_shards = {s.shard_id for s in shards if s.closed}
        self._hash_ranges.update((s.shard_id, (s.starting_hash_key, s.ending_hash_key)) for s in shards)
        children = [(s.shard_id, s.parents) for s in shards if any(p in listed for p in s.parents)]
        roots = [(s.shard_id, s.parents) for s in shards if not any(p in listed for p in s.parents)]
        start = {"TRIM_HORIZON": TRIM_HORIZON, "LATEST": LATEST, "AT_TIMESTAMP": AT_TIMESTAMP}[self.config.start_at]
        if roots:
            await table.sync_shards(roots, start)
        if children:
            await table.sync_shards(children, TRIM_HORIZON)

    async def _shard_sync_loop(self) -> None:
        assert self._client is not None
        assert self._table is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_now.wait(), self.config.shard_sync_s)
            self._sync_now.clear()
            try:
                await self._sync_leases(self._table, await self._client.list_all_shards(self.config.stream))
                self._rebalance_now.set()
            except (StreamNotFound, AuthError) as e:
                log.error("shard sync: %s", e)  # noqa: TRY400 - a config problem, not a bug: no traceback
            except Exception:
                log.exception("shard sync failed; retrying in %.0f s", self.config.shard_sync_s)

    async def _lease_loop(self) -> None:
        coordinator = self._coordinator
        assert coordinator is not None
        duration = self.config.lease_duration_s
        # Renew well inside the duration; look for expired leases often, since the failover time is the lease
        # duration plus up to two looks (expiry is timed from when a renewal was first seen).
        renew_every, rebalance_every = duration / 3, duration / 4
        next_renew = next_rebalance = 0.0
        while True:
            now = self._clock()
            try:
                if now >= next_renew:
                    next_renew = now + renew_every
                    self._drop(await coordinator.renew_all(), "its lease was taken by another worker")
                if now >= next_rebalance or self._rebalance_now.is_set():
                    self._rebalance_now.clear()
                    next_rebalance = now + rebalance_every
                    gained, lost = await coordinator.rebalance()
                    self._drop(lost, "its lease was lost")
                    held = coordinator.held()
                    for shard_id in sorted(gained):
                        if shard_id in held:
                            self._spawn(held[shard_id])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease cycle failed; retrying")
            wait = min(next_renew, next_rebalance) - self._clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rebalance_now.wait(), wait)

    def _spawn(self, lease: Lease) -> None:
        if lease.shard_id in self._workers or self._stopping:
            return
        stats = self._stats.setdefault(lease.shard_id, ShardStats(lease.shard_id))
        stats.owned, stats.checkpoint, stats.sub_sequence = True, lease.checkpoint, lease.sub_sequence
        worker = _ShardWorker(self, lease, stats)
        self._workers[lease.shard_id] = worker
        worker.task = asyncio.create_task(worker.run(), name=f"treasure-engine-shard-{lease.shard_id}")
        worker.task.add_done_callback(functools.partial(self._worker_done, lease.shard_id, worker))
        log.info("worker %s took shard %s at %s", self.worker_id, lease.shard_id, lease.checkpoint)

    def _drop(self, shard_ids: Iterable[str], why: str) -> None:
        for shard_id in shard_ids:
            worker = self._workers.pop(shard_id, None)
            if worker is not None:
                log.info("shard %s stops here: %s", shard_id, why)
                worker.task.cancel()
            if shard_id in self._stats:
                self._stats[shard_id].owned = False

    def _worker_done(self, shard_id: str, worker: _ShardWorker, _task: object = None) -> None:
        if self._workers.get(shard_id) is worker:
            del self._workers[shard_id]
        worker.stats.owned = self._coordinator is not None and shard_id in self._coordinator.held()
        if worker.task.cancelled():
            return
        exc = worker.task.exception()
        if isinstance(exc, (StreamNotFound, AuthError)) and not self._stopping:
            # Not the shard's fault: every shard would fail the same way. Stop; `wait()` raises it.
            log.error("consumer %s stops: %s", self.worker_id, exc)
            self._failure = exc
            self._stop_task = asyncio.create_task(self.stop(), name="treasure-engine-consumer-stop")
            return
        if exc is not None and not self._stopping:
            log.error("shard %s reader failed: %r; its lease is handed back", shard_id, exc, exc_info=exc)
            if self._coordinator is not None:
                lease = self._coordinator.held().get(shard_id)
                if lease is not None:
                    task = asyncio.create_task(self._give_back(lease))
                    self._tasks.append(task)
        if worker.stats.ended:
            # The children may start now: re-list the shards and rebalance at once.
            self._sync_now.set()

    async def _give_back(self, lease: Lease) -> None:
        assert self._coordinator is not None
        with contextlib.suppress(Exception):
            await self._coordinator.release(lease.shard_id)
        self._rebalance_now.set()

    # --- dead letters ------------------------------------------------------------------------------------

    async def _dead_letter(self, letters: list[DeadLetter]) -> None:
        """Stores dead letters durably, retrying (with the shard paused) until the store accepts them: the
        checkpoint must not pass a record that is neither handled nor stored."""
        assert self._dlq is not None
        delay = self.config.backoff_base_s or 0.1
        while True:
            try:
                await asyncio.to_thread(self._dlq.put, letters)
            except OSError as e:
                log.error("cannot store %d dead letter(s) (%s); retrying in %.1f s", len(letters), e, delay)  # noqa: TRY400
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)
            else:
                return

    def _letter(
        self,
        record: Any,
        *,
        attempts: int,
        error: BaseException | None,
        error_type: str,
        message: str,
        first_failure_at: float,
    ) -> DeadLetter:
        return DeadLetter(
            data=record.data,
            partition_key=record.partition_key,
            explicit_hash_key=getattr(record, "explicit_hash_key", None),
            source="consumer",
            stream=self.config.stream,
            shard_id=record.shard_id,
            sequence_number=record.sequence_number,
            sub_sequence_number=record.sub_sequence_number,
            attempts=attempts,
            error_type=error_type,
            error_message=message,
            traceback=format_traceback(error) if error is not None else None,
            first_failure_at=first_failure_at,
            dead_lettered_at=time.time(),
            app_name=self._app_name,
            engine_version=_core.__version__,
        )


def _breaker_of(config: ConsumerConfig) -> CircuitBreaker | None:
    if config.breaker is None:
        return None
    from treasure_engine.breaker import breakers

    return breakers.get(f"{config.application}-downstream", config.breaker)


class _Failure:
    """Attempts and first failure time of one record, while its batch is retried."""

    __slots__ = ("attempts", "error", "first_at")

    def __init__(self) -> None:
        self.attempts = 0
        self.first_at = time.time()
        self.error: BaseException | None = None


@dataclass(eq=False)
class _ShardWorker:
    consumer: Consumer
    lease: Lease
    stats: ShardStats
    task: asyncio.Task[None] = field(init=False)
    _finishing: bool = False
    _pages: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(maxsize=1))
    _last_read: str | None = None
    # Handled up to here, not yet written (see ConsumerConfig.checkpoint_interval_s), and how much since the last.
    _pending: tuple[str, int] | None = None
    _pending_records: int = 0
    _checkpointed_at: float = field(default_factory=time.monotonic)

    def finish(self) -> None:
        """Stop after the batch in flight: checkpoint what was handled and return."""
        self._finishing = True
        if self._pages.empty():
            # Wakes a dispatcher waiting for the next page; a full queue means it is busy and checks the flag.
            self._pages.put_nowait(None)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read(), name=f"treasure-engine-read-{self.lease.shard_id}")
        try:
            await self._dispatch(reader)
        except _Abandoned:
            # What was handled before the unfinished batch is written; the batch is read again.
            with contextlib.suppress(_LeaseLost):
                await self._write_pending()
            log.info(
                "shard %s: stopping with a batch unfinished; it is read again from the checkpoint", self.lease.shard_id
            )
        except _LeaseLost:
            log.info("shard %s: its lease was taken while checkpointing; the new owner goes on", self.lease.shard_id)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    # --- reading -----------------------------------------------------------------------------------------

    async def _iterator(self) -> str | None:
        """A shard iterator at the checkpoint (or after the last record read), None when the shard is gone."""
        consumer = self.consumer
        client = consumer._client
        assert client is not None
        cfg = consumer.config
        checkpoint = self.lease.checkpoint
        delay = cfg.backoff_base_s or 0.1
        while True:
            sequence: str | None = None
            timestamp: float | None = None
            if self._last_read is not None:
                kind, sequence = "AFTER_SEQUENCE_NUMBER", self._last_read
            elif checkpoint in (TRIM_HORIZON, LATEST):
                kind = checkpoint
            elif checkpoint == AT_TIMESTAMP:
                kind, timestamp = AT_TIMESTAMP, cfg.start_timestamp or 0.0
            else:
                # AT, not AFTER: the checkpoint may sit inside an aggregate; what was handled is skipped below.
                kind, sequence = "AT_SEQUENCE_NUMBER", checkpoint
            response, iterator = await client.get_shard_iterator(
                cfg.stream, self.lease.shard_id, kind, sequence_number=sequence, timestamp=timestamp
            )
            if iterator is not None:
                return iterator
            _raise_fatal(response.outcome, response.error_type, response.message, cfg.stream, self.lease.shard_id)
            log.warning("GetShardIterator %s: %s %s", self.lease.shard_id, response.error_type, response.message)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, cfg.backoff_max_s)

    async def _read(self) -> None:
        consumer = self.consumer
        client = consumer._client
        assert client is not None
        cfg = consumer.config
        shard_id = self.lease.shard_id
        hash_key_range = await self._hash_key_range()
        iterator = await self._iterator()
        skip = self.lease.checkpoint not in (TRIM_HORIZON, LATEST, AT_TIMESTAMP)
        next_call = 0.0
        delay = cfg.backoff_base_s or 0.1
        empty_reads = 0
        while iterator is not None:
            wait = next_call - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            response = await client.get_records(iterator, cfg.get_records_limit)
            next_call = time.monotonic() + max(_GET_RECORDS_MIN_INTERVAL_S, len(response.body) / _SHARD_BYTES_PER_S)
            if response.outcome is not Outcome.OK:
                if response.error_type == "ExpiredIteratorException":
                    iterator = await self._iterator()
                    continue
                _raise_fatal(response.outcome, response.error_type, response.message, cfg.stream, shard_id)
                log.debug("GetRecords %s: %s %s", shard_id, response.error_type, response.message)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, cfg.backoff_max_s)
                continue
            delay = cfg.backoff_base_s or 0.1
            try:
                page = _core.parse_get_records(
                    response.body,
                    shard_id,
                    hash_key_range=hash_key_range,
                    out_of_range_aggregates=cfg.out_of_range_aggregates,
                )
            except MalformedRecord as e:
                log.warning("GetRecords %s: unreadable response (%s); reading again", shard_id, e)
                await asyncio.sleep(delay)
                continue
            iterator = page.next_shard_iterator
            self.stats.millis_behind_latest = page.millis_behind_latest
            if page.kinesis_records:
                empty_reads = 0
                self._last_read = page.last_sequence_number
                self.stats.records_read += len(page)
                if page.out_of_range_records or page.skipped_out_of_range_records:
                    self._count_out_of_range(page)
                await self._pages.put(self._page(page, skip))
                skip = False
            else:
                empty_reads += 1
                caught_up = not page.millis_behind_latest
                if caught_up and shard_id in consumer._closed_shards and empty_reads >= _EMPTY_READS_TO_END:
                    break
                if caught_up:
                    next_call = max(next_call, time.monotonic() + cfg.idle_poll_ms / 1000)
            if page.child_shards:
                consumer._sync_now.set()
        await self._pages.put(_END)

    async def _hash_key_range(self) -> tuple[int, int] | None:
        """The shard's hash-key range, from the last ListShards; listed again for a shard newer than that (a
        reshard's child whose lease another worker made). None, and no range check, if it is still unknown."""
        consumer = self.consumer
        shard_id = self.lease.shard_id
        found = consumer._hash_ranges.get(shard_id)
        if found is None and consumer._client is not None:
            try:
                shards = await consumer._client.list_all_shards(consumer.config.stream)
            except (StreamNotFound, AuthError):
                raise
            except Exception as e:  # the check is not worth failing the shard over
                log.warning("shard %s: cannot list the shards (%s); its aggregates go unchecked", shard_id, e)
            else:
                consumer._hash_ranges.update((s.shard_id, (s.starting_hash_key, s.ending_hash_key)) for s in shards)
                found = consumer._hash_ranges.get(shard_id)
        if found is None:
            log.warning("shard %s: its hash-key range is unknown; its aggregates go unchecked", shard_id)
        return found

    def _count_out_of_range(self, page: Any) -> None:
        """Counts a page's records of aggregates outside the shard's range; warns once per shard."""
        self.stats.out_of_range_records += page.out_of_range_records
        self.stats.skipped_out_of_range_records += page.skipped_out_of_range_records
        consumer = self.consumer
        shard_id = self.lease.shard_id
        if shard_id in consumer._warned_out_of_range:
            return
        consumer._warned_out_of_range.add(shard_id)
        policy = consumer.config.out_of_range_aggregates
        if policy == "skip":
            what = (
                f"skipped {page.skipped_out_of_range_records} record(s) of KPL aggregates holding records outside "
                "the shard's hash-key range, as the KCL does"
            )
        else:
            what = (
                f"delivered {page.out_of_range_records} record(s) of KPL aggregates holding records outside the "
                "shard's hash-key range (they may repeat records a producer re-sent after a reshard)"
            )
        log.warning(
            "shard %s: %s (out_of_range_aggregates=%r; written before a reshard or by a producer aggregating "
            "across shards); later ones are only counted, in stats and metrics",
            shard_id,
            what,
            policy,
            extra={
                "shard": shard_id,
                "policy": policy,
                "out_of_range_records": page.out_of_range_records,
                "skipped_out_of_range_records": page.skipped_out_of_range_records,
            },
        )

    def _page(self, page: Any, skip: bool) -> _Page:
        """Lanes of a page; after a restart at a checkpoint inside an aggregate, without what was handled."""
        lanes: list[list[Record]] = page.lanes(self.consumer.config.parallelism)
        bad = list(page.malformed)
        if skip:
            seq, sub = self.lease.checkpoint, self.lease.sub_sequence
            lanes = [[r for r in lane if not _done(r, seq, sub)] for lane in lanes]
            bad = [b for b in bad if not _done(b, seq, sub)]
        # The page's last Kinesis record, whatever became of it (an aggregate skipped by out_of_range_aggregates
        # included): the checkpoint passes it once the page is handled.
        return _Page(lanes, bad, page.last_sequence_number, page.last_sub_sequence_number)

    # --- dispatch ----------------------------------------------------------------------------------------

    async def _dispatch(self, reader: asyncio.Task[None]) -> None:
        cfg = self.consumer.config
        wait_s = cfg.max_batch_wait_ms / 1000
        while True:
            # A quiet shard still writes what it handled, once the interval has passed.
            due = None if self._pending is None else max(0.0, self._checkpoint_due() - time.monotonic())
            item = await self._next(reader, due)
            if item is _TIMEOUT:
                await self._write_pending()
                continue
            if item is None:
                await self._write_pending()
                return
            if item is _END:
                await self._end()
                return
            pages: list[_Page] = [item]
            total = item.records
            deadline = time.monotonic() + wait_s
            ended = False
            while total < cfg.batch_size and not self._finishing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                more = await self._next(reader, left)
                if more is None or more is _TIMEOUT:
                    break
                if more is _END:
                    ended = True
                    break
                pages.append(more)
                total += more.records
            await self._handle_pages(pages)
            if ended:
                await self._end()
                return
            if self._finishing:
                await self._write_pending()
                return

    async def _next(self, reader: asyncio.Task[None], timeout: float | None = None) -> Any:
        """The next page, `_END`, None once finishing, or `_TIMEOUT`. A failed reader's error is raised here.

        Never loses a page to a timeout or a cancellation: the queue's getter is cancelled before it returns."""
        if self._finishing and self._pages.empty():
            return None
        if not self._pages.empty():
            return self._pages.get_nowait()
        get = asyncio.ensure_future(self._pages.get())
        try:
            await asyncio.wait({get, reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        if not self._pages.empty():
            return self._pages.get_nowait()
        if not reader.done():
            return _TIMEOUT
        if not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]
        return None

    async def _handle_pages(self, pages: list[_Page]) -> None:
        """Handles pages in rounds: each round calls the handler once per lane (at most `batch_size` records
        each, lanes in parallel), then moves the shard's position to just before the first record not yet handled;
        it is written as the checkpoint every `checkpoint_interval_s` (see `_advance`)."""
        consumer = self.consumer
        n, size = consumer.config.parallelism, consumer.config.batch_size
        lanes = pages[0].lanes if len(pages) == 1 else [[r for p in pages for r in p.lanes[i]] for i in range(n)]
        lanes = [lane for lane in lanes if lane]
        bad = [b for p in pages for b in p.bad]
        if bad:
            await self._dead_letter_malformed(bad)
        rounds = max((len(lane) + size - 1) // size for lane in lanes) if lanes else 0
        for r in range(rounds):
            lo, hi = r * size, (r + 1) * size
            await asyncio.gather(*(self._handle_batch(lane[lo:hi]) for lane in lanes if len(lane) > lo))
            rest = [lane[hi] for lane in lanes if len(lane) > hi]
            if not rest:
                break
            first = min(rest, key=_stream_order)
            # Everything before `first` in the shard is handled; sub-sequence -1: none of its aggregate yet.
            handled = sum(min(len(lane), hi) - lo for lane in lanes if len(lane) > lo)
            await self._advance(first.sequence_number, first.sub_sequence_number - 1, handled)
            if self._finishing:
                await self._write_pending()
                return
        last = pages[-1]
        if last.end_seq is not None:
            handled = sum(max(0, len(lane) - (rounds - 1) * size) for lane in lanes) if rounds else 0
            await self._advance(last.end_seq, last.end_sub, handled)

    async def _handle_batch(self, batch: list[Record]) -> None:
        """Calls the handler until every record of `batch` was handled or dead-lettered, in order: a failing
        part is retried (or bisected) before anything after it is called."""
        consumer = self.consumer
        cfg = consumer.config
        failures: dict[Record, _Failure] = {}
        todo: list[list[Record]] = [batch]  # a stack: the left half of a split on top
        while todo:
            part = todo.pop()
            outcome, failed, error = await self._call(part)
            if outcome == "ok":
                self.stats.records_handled += len(part) - len(failed)
                if not failed:
                    continue
                part = [r for r in part if r in failed]
            elif outcome == "outage":
                if self._finishing:
                    raise _Abandoned  # stopping: the downstream is down, leave the rest to the next owner
                todo.append(part)
                continue
            elif cfg.bisect_on_error and len(part) > 1:
                mid = len(part) // 2
                todo.append(part[mid:])
                todo.append(part[:mid])
                continue
            self.stats.records_failed += len(part)
            give_up: list[Record] = []
            for r in part:
                f = failures.get(r)
                if f is None:
                    f = failures[r] = _Failure()
                f.attempts += 1
                f.error = error.reason(r) if isinstance(error, _ReportedFailure) else error
                too_old = r.approximate_arrival > 0 and time.time() - r.approximate_arrival > cfg.max_record_age_s
                if f.attempts >= cfg.max_attempts or too_old:
                    give_up.append(r)
            if give_up:
                await consumer._dead_letter([self._letter_for(r, failures[r]) for r in give_up])
                self.stats.records_dead_lettered += len(give_up)
                part = [r for r in part if r not in give_up]
            if part:
                if self._finishing:
                    raise _Abandoned  # stopping: no more retries; not checkpointed, so read again later
                attempt = max(failures[r].attempts for r in part)
                backoff = min(cfg.backoff_base_s * 2 ** (attempt - 1), cfg.backoff_max_s)
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                todo.append(part)

    async def _call(self, part: list[Record]) -> tuple[str, set[Record], BaseException | None]:
        """One handler call: ("ok", failed records, None), ("error", all, exception), or ("outage", ...) when the
        downstream breaker is (or just went) open: then nothing counts against the records.

        A breaker of the consumer's own (`ConsumerConfig.breaker`) guards each handler call with a permit, which
        goes back to it however the call ends: a call cancelled (a stop, a lost lease) while it held a half-open
        trial permit gives the trial back, or the breaker would wait for its outcome for good. A breaker passed in
        (`Consumer(..., breaker=downstream_breaker)`) is watched instead: the handler's own calls go through it,
        and a failure while it is not closed is the outage, not the records."""
        consumer = self.consumer
        breaker = consumer._breaker
        permit = None
        if breaker is not None and consumer._owns_breaker:
            permit = await self._permit(breaker)
        before = breaker.state if breaker is not None else None
        started = time.perf_counter()
        try:
            result = await consumer._handle(part)
        except CircuitOpen as e:
            consumer._observe(started, part)
            # A breaker on the handler's path (its Downstream's) refused: the downstream is down, not the records.
            if breaker is not None and permit is not None:
                breaker._release(permit, None)
            await self._pause_for(e.remaining_s)
            return "outage", set(), e
        except Exception as e:
            consumer._observe(started, part)
            if breaker is not None:
                if permit is not None:
                    breaker._release(permit, e)
                if before is not BreakerState.CLOSED or breaker.state is not BreakerState.CLOSED:
                    await self._pause_for(0.05)
                    return "outage", set(), e
            return "error", set(part), e
        except BaseException as e:
            # Cancelled (or interrupted) mid-call: classified as the breaker's guards do, so by default not a
            # failure, and a half-open trial permit is given back.
            if breaker is not None and permit is not None:
                breaker._release(permit, e)
            raise
        consumer._observe(started, part)
        if breaker is not None and permit is not None:
            breaker._release(permit, None)
        self.stats.paused = False
        if result is None:
            return "ok", set(), None
        if not isinstance(result, BatchResult):  # the annotation is a promise the handler may not keep
            error = TypeError(f"handler returned {type(result).__name__}; expected BatchResult or None")  # type: ignore[unreachable]
            return "error", set(part), error
        failed = set(result.failed)
        unknown = failed.difference(part)
        if unknown:
            log.warning("handler reported %d failed record(s) not in its batch; ignored", len(unknown))
            failed -= unknown
        return "ok", failed, _ReportedFailure(result.reasons) if failed else None

    async def _permit(self, breaker: CircuitBreaker) -> Any:
        """Waits (paused) until the breaker lets a call through."""
        while True:
            try:
                permit = breaker._acquire()
            except CircuitOpen as e:
                await self._pause_for(e.remaining_s)
                continue
            self.stats.paused = False
            return permit

    async def _pause_for(self, remaining_s: float) -> None:
        if not self.stats.paused:
            log.warning("shard %s paused: the downstream breaker is open", self.lease.shard_id)
        self.stats.paused = True
        await asyncio.sleep(min(max(remaining_s, 0.01), 1.0) * (0.9 + random.random() / 5))

    def _letter_for(self, record: Record, failure: _Failure) -> DeadLetter:
        error = failure.error
        if isinstance(error, _ReportedFailure):
            return self.consumer._letter(
                record,
                attempts=failure.attempts,
                error=None,
                error_type="HandlerReportedFailure",
                message=str(error),
                first_failure_at=failure.first_at,
            )
        return self.consumer._letter(
            record,
            attempts=failure.attempts,
            error=error,
            error_type=type(error).__name__ if error is not None else "Unknown",
            message=str(error)[:4096] if error is not None else "",
            first_failure_at=failure.first_at,
        )

    async def _dead_letter_malformed(self, bad: list[Any]) -> None:
        now = time.time()
        letters = [
            self.consumer._letter(
                b, attempts=0, error=None, error_type="MalformedRecord", message=b.reason, first_failure_at=now
            )
            for b in bad
        ]
        await self.consumer._dead_letter(letters)
        self.stats.malformed += len(bad)
        self.stats.records_dead_lettered += len(bad)

    def _checkpoint_due(self) -> float:
        """When the pending position must be written, on the monotonic clock."""
        return self._checkpointed_at + self.consumer.config.checkpoint_interval_s

    async def _advance(self, sequence: str, sub_sequence: int, handled: int) -> None:
        """Everything before (sequence, sub_sequence) is handled: written now when `checkpoint_interval_s` has
        passed since the last checkpoint or `checkpoint_max_records` were handled, else kept for later. A
        checkpoint per round cost a DynamoDB write per `batch_size` records (2,000 for 200,000 events)."""
        self._pending = (sequence, sub_sequence)
        self._pending_records += handled
        if (
            self._pending_records >= self.consumer.config.checkpoint_max_records
            or time.monotonic() >= self._checkpoint_due()
        ):
            await self._write_pending()

    async def _write_pending(self) -> None:
        """Writes the position kept by `_advance`, if any (on hand-back and stop too)."""
        if self._pending is not None:
            await self._checkpoint(*self._pending)

    async def _checkpoint(self, sequence: str, sub_sequence: int) -> None:
        coordinator = self.consumer._coordinator
        assert coordinator is not None
        if not await coordinator.checkpoint(self.lease.shard_id, sequence, sub_sequence):
            # Another worker owns the shard now: it reads from our last checkpoint; stop here.
            raise _LeaseLost(self.lease.shard_id)
        self.lease = coordinator.held().get(self.lease.shard_id, self.lease)
        self.stats.checkpoint, self.stats.sub_sequence = sequence, sub_sequence
        self.stats.checkpoints += 1
        self._pending, self._pending_records, self._checkpointed_at = None, 0, time.monotonic()

    async def _end(self) -> None:
        await self._checkpoint(SHARD_END, 0)
        self.stats.ended = True
        log.info("shard %s read to its end", self.lease.shard_id)


class _Abandoned(Exception):
    """Stopping while a batch waits for the downstream or a retry: give it up, uncheckpointed."""


class _LeaseLost(Exception):
    """The lease of the shard being read now belongs to another worker."""


class _ReportedFailure(Exception):
    """Records the handler returned in `BatchResult.failed`, with the reasons it gave."""

    def __init__(
        self,
        reasons: Mapping[Record, BaseException | str],
        message: str = "the handler reported the record failed",
    ) -> None:
        super().__init__(message)
        self.reasons = reasons

    def reason(self, record: Record) -> BaseException:
        """What to dead-letter the record with: the handler's exception, its message, or this."""
        why = self.reasons.get(record)
        if isinstance(why, BaseException):
            return why
        return self if why is None else _ReportedFailure({}, str(why))


def _stream_order(record: Record) -> tuple[int, str, int]:
    """Sequence numbers are decimal strings that grow within a shard: order by length, then text."""
    seq = record.sequence_number
    return (len(seq), seq, record.sub_sequence_number)


def _done(record: Any, seq: str, sub: int) -> bool:
    return bool(record.sequence_number == seq and record.sub_sequence_number <= sub)


def _raise_fatal(outcome: Outcome, error_type: str, message: str, stream: str, shard_id: str) -> None:
    if outcome is Outcome.MISSING:
        raise StreamNotFound(f"stream {stream!r} (shard {shard_id}) not found: {message}")
    if outcome is Outcome.AUTH:
        raise AuthError(f"{error_type}: {message}")
