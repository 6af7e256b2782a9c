"""The consumer: shard leases shared across processes, ordered parallel dispatch, poison isolation.

One `Consumer` per process. Its lease loop (see `leases.LeaseCoordinator`) decides which shards this worker
reads; each owned shard gets a `ShardWorker` (`_worker.py`) with two tasks:

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
import functools
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self

from treasure_engine import _core
from treasure_engine._core import ConfigError, Record
from treasure_engine._metrics_slot import MetricsSlot
from treasure_engine._state import state_dir_of
from treasure_engine.breaker import BreakerState, CircuitBreaker
from treasure_engine.config import ConsumerConfig
from treasure_engine.consumer._context import ShardContext
from treasure_engine.consumer._coordinator import LeaseCoordinator
from treasure_engine.consumer._leases import AT_TIMESTAMP, LATEST, TRIM_HORIZON, Lease, LeaseTable
from treasure_engine.consumer._types import Handler, ShardStats
from treasure_engine.consumer._worker import ShardWorker
from treasure_engine.dlq import DeadLetter, DeadLetterQueue, format_traceback
from treasure_engine.errors import AuthError, StreamNotFound
from treasure_engine.kinesis import KinesisClient, ShardInfo

if TYPE_CHECKING:
    from treasure_engine.monitoring import ConsumerMetrics  # noqa: F401 - named in the MetricsSlot base, a string

log = logging.getLogger("treasure_engine.consumer")


_OPEN_STATES = (BreakerState.OPEN, BreakerState.FORCED_OPEN)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Consumer(MetricsSlot["ConsumerMetrics"]):
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
        self._breaker = breaker if breaker is not None else _breaker_of(config)
        self._clock = clock
        self._app_name = config.app_name or config.application
        self._table: LeaseTable | None = None
        self._dlq: DeadLetterQueue | None = None
        self._workers: dict[str, ShardWorker] = {}
        self._stats: dict[str, ShardStats] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # The client, the coordinator and the shard map's facts live in the context the shard workers share.
        self._shared = ShardContext(
            config=config,
            handle=handle,
            observe=self._observe,
            letter=self._letter,
            dead_letter=self._dead_letter,
            breaker=self._breaker,
            owns_breaker=breaker is None,
        )
        self._rebalance_now = asyncio.Event()
        self._stopping = False
        self._started = False
        self._stopped = asyncio.Event()
        self._failure: BaseException | None = None
        self._stop_task: asyncio.Task[None] | None = None

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
        state_dir = state_dir_of(cfg.state_dir, self._app_name)
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
        self._shared.client = client
        self._table = table
        self._shared.coordinator = LeaseCoordinator(
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
        if self._shared.coordinator is None:
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
            await self._shared.coordinator.release_all()
        except Exception:
            log.exception("stop: could not hand the leases back; other workers take them when they expire")
        for s in self._stats.values():
            s.owned = False
        if self._dlq is not None:
            self._dlq.close()
        if self._table is not None:
            await self._table.close()
        if self._shared.client is not None:
            await self._shared.client.close()
        self._stopped.set()
        log.info("consumer %s stopped", self.worker_id, extra={"stats": self.stats()})

    async def wait(self) -> None:
        """Returns when the consumer has stopped; raises what stopped it if it failed on its own."""
        await self._stopped.wait()
        if self._failure is not None:
            raise self._failure

    @property
    def running(self) -> bool:
        """True from `start()` until `stop()` begins."""
        return self._started and not self._stopping

    def shard_stats(self) -> list[ShardStats]:
        """The live statistics of each shard seen (not copies, unlike `stats()`): for frequent readers such as a
        `Monitor`'s scrape (copying costs about 10 µs a shard)."""
        return list(self._stats.values())

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per shard this worker has held: owned, checkpoint, millis_behind_latest, records read, handled,
        failed, dead-lettered, malformed, out of range, skipped out of range, paused, ended."""
        return {shard: s.as_dict() for shard, s in sorted(self._stats.items())}

    def _observe(self, started: float, batch: list[Record]) -> None:
        """Records one handler call's latency and size while a Monitor watches."""
        metrics = self.attached_metrics
        if metrics is not None:
            metrics.handled(started, len(batch))

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
        self._shared.closed_shards = {s.shard_id for s in shards if s.closed}
        self._shared.hash_ranges.update((s.shard_id, (s.starting_hash_key, s.ending_hash_key)) for s in shards)
        children = [(s.shard_id, s.parents) for s in shards if any(p in listed for p in s.parents)]
        roots = [(s.shard_id, s.parents) for s in shards if not any(p in listed for p in s.parents)]
        start = {"TRIM_HORIZON": TRIM_HORIZON, "LATEST": LATEST, "AT_TIMESTAMP": AT_TIMESTAMP}[self.config.start_at]
        if roots:
            await table.sync_shards(roots, start)
        if children:
            await table.sync_shards(children, TRIM_HORIZON)

    async def _shard_sync_loop(self) -> None:
        assert self._shared.client is not None
        assert self._table is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shared.sync_now.wait(), self.config.shard_sync_s)
            self._shared.sync_now.clear()
            try:
                await self._sync_leases(self._table, await self._shared.client.list_all_shards(self.config.stream))
                self._rebalance_now.set()
            except (StreamNotFound, AuthError) as e:
                log.error("shard sync: %s", e)  # noqa: TRY400 - a config problem, not a bug: no traceback
            except Exception:
                log.exception("shard sync failed; retrying in %.0f s", self.config.shard_sync_s)

    async def _lease_loop(self) -> None:
        coordinator = self._shared.coordinator
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
        worker = ShardWorker(self._shared, lease, stats)
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

    def _worker_done(self, shard_id: str, worker: ShardWorker, _task: object = None) -> None:
        if self._workers.get(shard_id) is worker:
            del self._workers[shard_id]
        worker.stats.owned = self._shared.coordinator is not None and shard_id in self._shared.coordinator.held()
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
            if self._shared.coordinator is not None:
                lease = self._shared.coordinator.held().get(shard_id)
                if lease is not None:
                    task = asyncio.create_task(self._give_back(lease))
                    self._tasks.append(task)
        if worker.stats.ended:
            # The children may start now: re-list the shards and rebalance at once.
            self._shared.sync_now.set()

    async def _give_back(self, lease: Lease) -> None:
        assert self._shared.coordinator is not None
        with contextlib.suppress(Exception):
            await self._shared.coordinator.release(lease.shard_id)
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
