"""The chaos harness's checker: events with (key, sequence) ids go in through the engine's `Producer`, come out
through the engine's `Consumer` in one or more processes, and the checker counts what was lost, duplicated and
reordered per key, and how long the system took to catch up after a fault.

Events: ``k<key>:<id>[:poison]:<padding>``, with ``id`` counting up in submission order (so per key too); the
key is the partition key. Consumers (``tests.support.chaos_consumer``, or the scripted downstream they call)
append every handled batch to a file of their own as one write: a header line ``@<monotonic ns> <shard id>
<n>`` and the ``n`` records' data, one a line. A batch cut short by a kill has fewer than ``n`` complete lines
and does not count (it was not checkpointed either, so its next owner handles it again). CLOCK_MONOTONIC is
the same in every process of the machine, so the headers order batches across processes; a key lives in one
lane of one shard, so its records are in one file between two handovers.

What the checker reports (`Outcome`):

- events: unique ids the producer accepted (``submit`` returned);
- delivered: unique accepted ids handled at least once; dead-lettered: the others found in dead-letter queues;
- lost: accepted ids neither handled nor dead-lettered (``events == delivered + dead_lettered + lost``);
- duplicates: handlings beyond the first, of every id;
- reordered per key: ids whose first handling came after the first handling of a later id of the same key;
- time to recover: from the end of the (last) fault until everything accepted before it was handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3

from treasure_engine import DeadLetterQueue, ProducerConfig, Record

ROOT = Path(__file__).resolve().parents[2]
FULL = os.environ.get("TREASURE_CHAOS") == "full"
POISON = b":poison"


def short_or_full(short: float, full: float) -> float:
    """The case's figure: `full` under ``TREASURE_CHAOS=full`` (`make chaos`), else `short` (CI)."""
    return full if FULL else short


# --- events ------------------------------------------------------------------------------------------------


def event(i: int, keys: int, *, pad: int = 0, poison_every: int = 0) -> tuple[bytes, str]:
    """Event `i` as (data, partition key); every `poison_every`-th one carries the poison mark."""
    key = f"k{i % keys}"
    poison = POISON if poison_every and i % poison_every == poison_every - 1 else b""
    return (b"%s:%d%s:%s" % (key.encode(), i, poison, b"." * pad), key)


def parse(data: bytes) -> tuple[bytes, int] | None:
    """(key, id) of an event's data; None for anything else."""
    parts = data.split(b":", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def frame(records: Sequence[Record]) -> bytes:
    """One handled batch as the checker reads it (see the module doc)."""
    shard = records[0].shard_id if records else "-"
    head = b"@%d %s %d\n" % (time.monotonic_ns(), shard.encode(), len(records))
    return head + b"".join(r.data + b"\n" for r in records)


class Feeder:
    """Submits events ``start, start+1, ...`` to a producer at a steady rate; `accepted` lists the ids for which
    ``submit_many`` returned (refused ones are offered again on the next tick, so ids stay in order)."""

    def __init__(self, producer: Any, *, keys: int = 101, pad: int = 40, poison_every: int = 0, start: int = 0):
        self.producer = producer
        self.keys, self.pad, self.poison_every = keys, pad, poison_every
        self.next = start
        self.accepted: list[int] = []
        self.refused_ticks = 0

    async def run(
        self,
        rate: float,
        *,
        duration_s: float | None = None,
        count: int | None = None,
        report: Callable[[int], None] | None = None,
    ) -> None:
        """Submits for `duration_s` or `count` events; `report(next id)` after each tick."""
        tick = 0.02
        per_tick = max(1, round(rate * tick))
        started, base = time.monotonic(), len(self.accepted)
        end = self.next + count if count is not None else None
        while True:
            if duration_s is not None and time.monotonic() - started >= duration_s:
                return
            n = per_tick if end is None else min(per_tick, end - self.next)
            if n <= 0:
                return
            batch = [
                event(i, self.keys, pad=self.pad, poison_every=self.poison_every)
                for i in range(self.next, self.next + n)
            ]
            done = self.producer.submit_many(batch)
            self.accepted.extend(range(self.next, self.next + done))
            self.next += done
            if done < n:
                self.refused_ticks += 1
            if report is not None:
                report(self.next)
            # Paced against the clock: a slow tick does not lower the rate.
            ahead = started + (len(self.accepted) - base) / rate - time.monotonic()
            await asyncio.sleep(max(ahead, 0.001))


# --- what was handled --------------------------------------------------------------------------------------


@dataclass
class Batch:
    t_ns: int
    source: int
    shard: str
    items: list[tuple[bytes, int]]


class Ledger:
    """Reads the handled-batch files of a case incrementally (only whole batches; see the module doc)."""

    def __init__(self, directory: Path, pattern: str = "*.out") -> None:
        self.directory, self.pattern = directory, pattern
        self._offsets: dict[Path, int] = {}
        self.batches: list[Batch] = []
        self.handled: Counter[int] = Counter()

    def poll(self) -> Ledger:
        for path in sorted(self.directory.glob(self.pattern)):
            source = list(self._offsets).index(path) if path in self._offsets else len(self._offsets)
            offset = self._offsets.setdefault(path, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            self._offsets[path] = offset + self._consume(chunk, source)
        return self

    def _consume(self, chunk: bytes, source: int) -> int:
        """Parses whole batches from `chunk`; returns the bytes used."""
        used = 0
        while True:
            head_end = chunk.find(b"\n", used)
            if head_end < 0 or not chunk.startswith(b"@", used):
                return used
            t_ns, shard, n = chunk[used + 1 : head_end].split(b" ")
            pos, lines = head_end + 1, []
            for _ in range(int(n)):
                end = chunk.find(b"\n", pos)
                if end < 0:
                    return used  # a batch still being written, or cut by a kill
                lines.append(chunk[pos:end])
                pos = end + 1
            items = [p for p in map(parse, lines) if p is not None]
            self.batches.append(Batch(int(t_ns), source, shard.decode(), items))
            self.handled.update(i for _, i in items)
            used = pos

    def reordered(self) -> int:
        """Ids first handled after a later id of the same key was (see the module doc)."""
        first: set[int] = set()
        last: dict[bytes, int] = {}
        count = 0
        for batch in sorted(self.batches, key=lambda b: b.t_ns):
            for key, i in batch.items:
                if i in first:
                    continue
                first.add(i)
                if i < last.get(key, -1):
                    count += 1
                last[key] = max(i, last.get(key, -1))
        return count

    def duplicate_batches_by_shard(self) -> Counter[str]:
        """Per shard, the handled batches holding at least one id handled before."""
        seen: set[int] = set()
        out: Counter[str] = Counter()
        for batch in sorted(self.batches, key=lambda b: b.t_ns):
            ids = [i for _, i in batch.items]
            if any(i in seen for i in ids):
                out[batch.shard] += 1
            seen.update(ids)
        return out


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, every: float = 0.1) -> float:
    """Polls `predicate`; returns the seconds it took, or raises AssertionError after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


async def caught_up(
    ledger: Ledger, ids: Iterable[int], timeout: float, *, dead: Callable[[], set[int]] | None = None
) -> float:
    """Seconds until every id in `ids` was handled (or dead-lettered, when `dead` reads the queues)."""
    want = set(ids)

    def done() -> bool:
        missing = want - set(ledger.poll().handled)
        return not missing or (dead is not None and not missing - dead())

    return await wait_until(done, timeout, f"{len(want)} ids handled")


def dead_lettered(state_dirs: Iterable[Path]) -> set[int]:
    """Event ids in the dead-letter queues under `state_dirs` (``<dir>/dlq``)."""
    ids: set[int] = set()
    for d in state_dirs:
        if (d / "dlq").exists():
            ids.update(p[1] for p in (parse(e.data) for e in DeadLetterQueue(d / "dlq").entries()) if p)
    return ids


# --- the outcome -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One case's figures; `check` computes them, the chaos conftest prints them as the table."""

    case: str
    events: int
    delivered: int
    dead_lettered: int
    lost: int
    duplicates: int
    reordered: int
    ordered: bool
    recover_s: float | None
    wall_s: float = 0.0
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        recover = "-" if self.recover_s is None else f"{self.recover_s:.1f} s"
        return (
            f"[chaos] {self.case}: events={self.events} delivered={self.delivered} "
            f"dead_lettered={self.dead_lettered} lost={self.lost} duplicates={self.duplicates} "
            f"reordered={self.reordered}{'' if self.ordered else ' (unordered mode)'} recover={recover} "
            f"{self.notes}"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check(
    case: str,
    accepted: Iterable[int],
    ledger: Ledger,
    dead: Iterable[int] = (),
    *,
    ordered: bool,
    recover_s: float | None,
    notes: str = "",
    **extra: Any,
) -> Outcome:
    """The figures of a case (see the module doc); prints them. Lost and (in ordered mode) reordered are asserted
    by the caller through `assert_no_loss`, so that the figures are printed even when they fail."""
    want = set(accepted)
    handled = set(ledger.poll().handled)
    dead_ids = set(dead) - handled
    outcome = Outcome(
        case=case,
        events=len(want),
        delivered=len(want & handled),
        dead_lettered=len(want & dead_ids),
        lost=len(want - handled - dead_ids),
        duplicates=sum(c - 1 for c in ledger.handled.values()),
        reordered=ledger.reordered(),
        ordered=ordered,
        recover_s=recover_s,
        notes=notes,
        extra=extra,
    )
    print("\n" + outcome.line(), flush=True)
    return outcome


class Reordered(AssertionError):
    """Events of a key handled out of order in ordered mode (apart from plain assertion failures, for xfail)."""


def assert_no_loss(outcome: Outcome, ledger: Ledger | None = None, accepted: Iterable[int] = ()) -> None:
    """Lost = 0, and reordered = 0 in ordered mode (`Reordered`)."""
    missing = sorted(set(accepted) - set(ledger.handled)) if ledger is not None else []
    assert outcome.lost == 0, f"{outcome.case}: {outcome.lost} event(s) lost, e.g. {missing[:10]}"
    if outcome.ordered and outcome.reordered:
        raise Reordered(f"{outcome.case}: {outcome.reordered} event(s) reordered within their key")


# --- processes ---------------------------------------------------------------------------------------------


def kill(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
    """Sends `sig` and waits; a process still there after `timeout` (a SIGTERM it ignored) gets SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"pid {proc.pid} ignored signal {sig} for {timeout} s") from None


def python_child(args: Sequence[str], log: Path, **kw: Any) -> subprocess.Popen[str]:
    """``python -m <args>`` in the repository root, stdout piped, stderr to `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    with open(log, "a") as err:
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env, **kw
        )


@dataclass
class ProducerRun:
    """What a ``tests.support.chaos_producer`` process reported: the ids it accepted; at a clean end, the events it
    replayed from the WAL and the damaged frames it skipped."""

    accepted: list[int]
    recovered: int = 0
    corrupt: int = 0


def producer_run(
    endpoint: str,
    stream: str,
    state_dir: Path,
    log: Path,
    *,
    first: int = 0,
    rate: float = 2_000.0,
    seconds: float = 0.0,
    kill_after: float | None = None,
) -> ProducerRun:
    """Runs the WAL producer child on `state_dir`: to its end, or SIGKILLed `kill_after` seconds after it started
    submitting (ids it printed before the kill landed count as accepted)."""
    args = [endpoint, stream, str(state_dir), str(first), str(rate), str(seconds)]
    child = python_child(["tests.support.chaos_producer", *args], log)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", log.read_text()
    if kill_after is None:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0, log.read_text()
        upto = max([first, *(int(x[1:]) for x in out.split() if x.startswith("+"))])
        m = re.search(r"recovered (\d+) corrupt (\d+)", out)
        assert m is not None, out
        return ProducerRun(list(range(first, upto)), int(m[1]), int(m[2]))
    deadline = time.monotonic() + kill_after
    upto = first
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        assert line.startswith("+"), f"the producer ended early: {line!r}\n{log.read_text()}"
        upto = int(line[1:])
    assert kill(child) == -signal.SIGKILL
    upto = max([upto, *(int(x[1:]) for x in child.stdout.read().split() if x.startswith("+"))])
    child.stdout.close()
    return ProducerRun(list(range(first, upto)))


class ConsumerGroup:
    """Consumer processes (``tests.support.chaos_consumer``) of one application: start, kill, restart.

    Worker ``i``'s incarnation ``g`` writes ``<dir>/w<i>-<g>.out`` and keeps its dead-letter queue in
    ``<dir>/w<i>-<g>/dlq``; its worker id in the lease table is ``w<i>-<g>``.
    """

    def __init__(self, directory: Path, config: dict[str, Any], *, downstream: str | None = None, poison: bool = False):
        self.directory = directory
        self.config = config
        self.args = (["--downstream", downstream] if downstream else []) + (["--poison"] if poison else [])
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.generation: Counter[int] = Counter()
        self.state_dirs: list[Path] = []
        directory.mkdir(parents=True, exist_ok=True)

    def worker_id(self, i: int) -> str:
        return f"w{i}-{self.generation[i]}"

    def start(self, i: int) -> subprocess.Popen[str]:
        self.generation[i] += 1
        wid = self.worker_id(i)
        state = self.directory / wid
        self.state_dirs.append(state)
        config = {**self.config, "worker_id": wid, "state_dir": str(state)}
        out = self.directory / f"{wid}.out"
        proc = python_child(
            ["tests.support.chaos_consumer", json.dumps(config), str(out), *self.args], self.directory / f"{wid}.log"
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            kill(proc)
            raise AssertionError(
                f"consumer {wid} did not start: {line!r}\n{(self.directory / f'{wid}.log').read_text()}"
            )
        self.procs[i] = proc
        return proc

    def start_all(self, n: int) -> None:
        for i in range(n):
            self.start(i)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> int:
        proc = self.procs.pop(i)
        code = kill(proc, sig)
        assert proc.stdout is not None
        proc.stdout.close()
        return code

    def stop(self) -> None:
        """SIGTERM to every live worker (a graceful stop: final checkpoints, leases handed back)."""
        for i in list(self.procs):
            self.kill(i, signal.SIGTERM)

    def __enter__(self) -> ConsumerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        for i in list(self.procs):
            with contextlib.suppress(AssertionError):
                self.kill(i, signal.SIGTERM)

    def dead(self) -> set[int]:
        return dead_lettered(self.state_dirs)


def lease_owners(dynamodb: str, table: str) -> Counter[str]:
    """Leases held per worker id in an application's lease table."""
    client = boto3.client(
        "dynamodb", endpoint_url=dynamodb, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    items = client.scan(TableName=table, ConsistentRead=True)["Items"]
    return Counter(item["owner"]["S"] for item in items if "owner" in item)


def consumer_settings(stream: str, kinesis: str, dynamodb: str, application: str, **kw: Any) -> dict[str, Any]:
    """A chaos consumer's config (ConsumerConfig fields as data): quick polls, leases and shard syncs."""
    return {
        "stream": stream,
        "application": application,
        "region": "us-east-1",
        "endpoint_url": kinesis,
        "dynamodb_endpoint_url": dynamodb,
        "idle_poll_ms": 100.0,
        "max_batch_wait_ms": 50.0,
        "lease_duration_s": 3.0,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.5,
        "shard_sync_s": 1.0,
        **kw,
    }


# --- a case's setting --------------------------------------------------------------------------------------


@dataclass
class Rig:
    """What a case runs on: a stream on kinesalite, a lease table's endpoint, consumer processes writing their
    handled batches into `directory`, and the ledger that reads them."""

    stream: str
    kinesis: str
    dynamodb: str
    application: str
    directory: Path
    group: ConsumerGroup
    ledger: Ledger
    producer_dirs: list[Path] = field(default_factory=list)
    """Producers' state directories besides `producer_state()`, whose dead-letter queues count."""

    def producer_state(self) -> Path:
        return self.directory / "producer"

    def dead(self) -> set[int]:
        """Ids in the consumers' dead-letter queues and in the producers' (`producer_state()`, `producer_dirs`)."""
        return self.group.dead() | dead_lettered([self.producer_state(), *self.producer_dirs])

    def check(
        self, case: str, accepted: Iterable[int], *, recover_s: float | None, notes: str, ordered: bool = True
    ) -> Outcome:
        """`check` on what this rig's consumers handled and its dead-letter queues hold."""
        return check(case, accepted, self.ledger, self.dead(), ordered=ordered, recover_s=recover_s, notes=notes)


def producer_config(stream: str, endpoint: str, state_dir: Path, **kw: Any) -> ProducerConfig:
    """A chaos producer: ordered, the default shard limits (the "full rate" of the cases), short timeouts and
    backoff so that faults and recoveries fit a short case."""
    settings: dict[str, Any] = {
        "region": "us-east-1",
        "ordered": True,
        "linger_ms": 20.0,
        "request_timeout_s": 3.0,
        "backoff_base_s": 0.05,
        "backoff_max_s": 1.0,
        "state_dir": str(state_dir),
        **kw,
    }
    return ProducerConfig(stream=stream, endpoint_url=endpoint, **settings)
