"""One owned shard: a reader task fetching pages within the shard's limits, and the dispatch of its
batches to the handler in lanes, with retries, bisection of poison records and checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from treasure_engine import _core
from treasure_engine._core import CircuitOpen, MalformedRecord, Record
from treasure_engine.breaker import BreakerState, CircuitBreaker
from treasure_engine.consumer._context import ShardContext
from treasure_engine.consumer._leases import AT_TIMESTAMP, LATEST, SHARD_END, TRIM_HORIZON, Lease
from treasure_engine.consumer._types import BatchResult, ShardStats
from treasure_engine.dlq import DeadLetter
from treasure_engine.errors import AuthError, StreamNotFound
from treasure_engine.kinesis import Outcome

log = logging.getLogger("treasure_engine.consumer")


_GET_RECORDS_MIN_INTERVAL_S = 0.2
"""Kinesis allows 5 GetRecords calls per second per shard."""


_SHARD_BYTES_PER_S = 2 * 1024 * 1024
"""... and 2 MiB per second per shard."""


_EMPTY_READS_TO_END = 3
"""Empty, caught-up reads of a shard ListShards reports closed before it counts as ended. Kinesis and kinesalite
end a closed shard with a null NextShardIterator; some emulators (moto) never do."""


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


class _Failure:
    """Attempts and first failure time of one record, while its batch is retried."""

    __slots__ = ("attempts", "error", "first_at")

    def __init__(self) -> None:
        self.attempts = 0
        self.first_at = time.time()
        self.error: BaseException | None = None


@dataclass(eq=False)
class ShardWorker:
    shared: ShardContext
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
        shared = self.shared
        client = shared.client
        assert client is not None
        cfg = shared.config
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
        shared = self.shared
        client = shared.client
        assert client is not None
        cfg = shared.config
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
            self.stats.read_at = time.time()
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
                if caught_up and shard_id in shared.closed_shards and empty_reads >= _EMPTY_READS_TO_END:
                    break
                if caught_up:
                    next_call = max(next_call, time.monotonic() + cfg.idle_poll_ms / 1000)
            if page.child_shards:
                shared.sync_now.set()
        await self._pages.put(_END)

    async def _hash_key_range(self) -> tuple[int, int] | None:
        """The shard's hash-key range, from the last ListShards; listed again for a shard newer than that (a
        reshard's child whose lease another worker made). None, and no range check, if it is still unknown."""
        shared = self.shared
        shard_id = self.lease.shard_id
        found = shared.hash_ranges.get(shard_id)
        if found is None and shared.client is not None:
            try:
                shards = await shared.client.list_all_shards(shared.config.stream)
            except (StreamNotFound, AuthError):
                raise
            except Exception as e:  # the check is not worth failing the shard over
                log.warning("shard %s: cannot list the shards (%s); its aggregates go unchecked", shard_id, e)
            else:
                shared.hash_ranges.update((s.shard_id, (s.starting_hash_key, s.ending_hash_key)) for s in shards)
                found = shared.hash_ranges.get(shard_id)
        if found is None:
            log.warning("shard %s: its hash-key range is unknown; its aggregates go unchecked", shard_id)
        return found

    def _count_out_of_range(self, page: Any) -> None:
        """Counts a page's records of aggregates outside the shard's range; warns once per shard."""
        self.stats.out_of_range_records += page.out_of_range_records
        self.stats.skipped_out_of_range_records += page.skipped_out_of_range_records
        shared = self.shared
        shard_id = self.lease.shard_id
        if shard_id in shared.warned_out_of_range:
            return
        shared.warned_out_of_range.add(shard_id)
        policy = shared.config.out_of_range_aggregates
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
        lanes: list[list[Record]] = page.lanes(self.shared.config.parallelism)
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
        cfg = self.shared.config
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
        shared = self.shared
        n, size = shared.config.parallelism, shared.config.batch_size
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
        shared = self.shared
        cfg = shared.config
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
                await shared.dead_letter([self._letter_for(r, failures[r]) for r in give_up])
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
        shared = self.shared
        breaker = shared.breaker
        permit = None
        if breaker is not None and shared.owns_breaker:
            permit = await self._permit(breaker)
        before = breaker.state if breaker is not None else None
        started = time.perf_counter()
        try:
            result = await shared.handle(part)
        except CircuitOpen as e:
            shared.observe(started, part)
            # A breaker on the handler's path (its Downstream's) refused: the downstream is down, not the records.
            if breaker is not None and permit is not None:
                breaker.release(permit, None)
            await self._pause_for(e.remaining_s)
            return "outage", set(), e
        except Exception as e:
            shared.observe(started, part)
            if breaker is not None:
                if permit is not None:
                    breaker.release(permit, e)
                if before is not BreakerState.CLOSED or breaker.state is not BreakerState.CLOSED:
                    await self._pause_for(0.05)
                    return "outage", set(), e
            return "error", set(part), e
        except BaseException as e:
            # Cancelled (or interrupted) mid-call: classified as the breaker's guards do, so by default not a
            # failure, and a half-open trial permit is given back.
            if breaker is not None and permit is not None:
                breaker.release(permit, e)
            raise
        shared.observe(started, part)
        if breaker is not None and permit is not None:
            breaker.release(permit, None)
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
                permit = breaker.acquire()
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
            return self.shared.letter(
                record,
                attempts=failure.attempts,
                error=None,
                error_type="HandlerReportedFailure",
                message=str(error),
                first_failure_at=failure.first_at,
            )
        return self.shared.letter(
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
            self.shared.letter(
                b, attempts=0, error=None, error_type="MalformedRecord", message=b.reason, first_failure_at=now
            )
            for b in bad
        ]
        await self.shared.dead_letter(letters)
        self.stats.malformed += len(bad)
        self.stats.records_dead_lettered += len(bad)

    def _checkpoint_due(self) -> float:
        """When the pending position must be written, on the monotonic clock."""
        return self._checkpointed_at + self.shared.config.checkpoint_interval_s

    async def _advance(self, sequence: str, sub_sequence: int, handled: int) -> None:
        """Everything before (sequence, sub_sequence) is handled: written now when `checkpoint_interval_s` has
        passed since the last checkpoint or `checkpoint_max_records` were handled, else kept for later. A
        checkpoint per round cost a DynamoDB write per `batch_size` records (2,000 for 200,000 events)."""
        self._pending = (sequence, sub_sequence)
        self._pending_records += handled
        if (
            self._pending_records >= self.shared.config.checkpoint_max_records
            or time.monotonic() >= self._checkpoint_due()
        ):
            await self._write_pending()

    async def _write_pending(self) -> None:
        """Writes the position kept by `_advance`, if any (on hand-back and stop too)."""
        if self._pending is not None:
            await self._checkpoint(*self._pending)

    async def _checkpoint(self, sequence: str, sub_sequence: int) -> None:
        coordinator = self.shared.coordinator
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
