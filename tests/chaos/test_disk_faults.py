"""Chaos cases 8 and 9 (storage): the disk under the WAL, the spill and the dead-letter queue fills up; segments of
the WAL and the dead-letter queue are damaged.

8. Disk full: a small tmpfs (mounted by the test, which needs root; skipped with the reason otherwise) is
   filled but for a few segments' room. The result must be a typed error and an alert, and nothing silently
   dropped: once room is made, every accepted event is delivered (or dead-lettered).
9. Corrupted segments: bytes of a WAL segment left by a killed producer, and of a dead-letter queue, are
   overwritten. The damage is detected and reported, every frame outside it is replayed or read.

Segments are 1 MiB here instead of 64 MiB (`SmallSegments`), so that a few megabytes fill them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.chaos import Feeder, Outcome, Rig, assert_no_loss, caught_up, event, producer_config, producer_run
from tests.support.faultproxy import ThreadedFaultProxy

from treasure_engine import (
    AlertRule,
    BufferFull,
    DeadLetterQueue,
    LogError,
    Monitor,
    MonitorConfig,
    Producer,
    ProducerConfig,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
SEGMENT = 1 * MiB


class SmallSegments(ProducerConfig, frozen=True, kw_only=True):
    """A ProducerConfig whose WAL and spill segments are 1 MiB (the pipeline's own setting; 64 MiB by default)."""

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {**super().pipeline_kwargs(), "wal_segment_bytes": SEGMENT, "spill_segment_bytes": SEGMENT}


@dataclass
class Disk:
    """A small tmpfs; `fill` leaves only so many bytes free, `release` frees them again."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / "filler"

    def fill(self, leave: int) -> None:
        free = shutil.disk_usage(self.path).free
        with open(self.filler, "ab") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size + max(0, free - leave))

    def release(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Disk]:
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("case 8 mounts a small tmpfs, which needs root (tests/integration/test_wal.py covers a WAL past "
                    "RLIMIT_FSIZE without it)")  # fmt: skip
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"case 8 needs a small tmpfs and this machine refuses one: {mounted.stderr.strip()}")
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def firing(monitor: Monitor) -> list[str]:
    return sorted({a.name for a in monitor.alerts() if a.state.value == "firing"})


# The default rule waits 30 s before it fires; the case only needs to see that it does.
FAST_DLQ_ALERT = AlertRule(
    name="dead_letter_store_failing", expr="dead_letter_pending > 0", for_s=0.5, severity="critical",
    summary="producer {name}: {value:.0f} dead letter(s) cannot be stored",
)  # fmt: skip


class NoAlert(AssertionError):
    """The typed error came, the alert did not."""


@pytest.mark.parametrize(
    "kind",
    [
        "wal",
        "spill",
        "dlq",
    ],
)  # fmt: skip
async def test_case08_disk_full(
    chaos_rig: Callable[..., Rig],
    fault_proxy: ThreadedFaultProxy,
    small_disk: Disk,
    chaos_outcome: Callable[[Outcome], Outcome],
    kind: str,
) -> None:
    rig = chaos_rig(shards=2)
    settings: dict[str, Any] = {
        "wal": {"durability": "wal", "wal_fsync": "never"},
        "spill": {"overflow": "spill", "ring_bytes": 1 * MiB, "max_buffered_bytes": 512 * 1024,
                  "max_request_bytes": 256 * 1024, "max_record_bytes": 64 * 1024},
        "dlq": {"max_attempts": 1},
    }[kind]  # fmt: skip
    rig.producer_dirs.append(small_disk.path / "producer")
    base = producer_config(rig.stream, fault_proxy.endpoint_url, small_disk.path / "producer", **settings)
    config = SmallSegments(**{f: getattr(base, f) for f in base.__struct_fields__})
    monitor = Monitor(MonitorConfig(port=None, evaluate_every_s=0.1, rules=[FAST_DLQ_ALERT]))
    accepted: list[int] = []
    errors: list[BaseException] = []
    async with Producer(config) as producer, monitor:
        monitor.watch_producer(producer, "chaos")
        # Nothing acknowledged, so the WAL keeps every event and the spill fills; for the dead-letter queue every
        # record fails at once (max_attempts=1) and goes there.
        fault_proxy.set(
            **({"fail_fraction": 1.0, "fail_error_code": "InternalFailure"} if kind == "dlq" else {"stall": True})
        )
        small_disk.fill(leave=0 if kind == "dlq" else 3 * SEGMENT)
        i = 0
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:
            try:
                producer.submit(*event(i, 101, pad=400))
                accepted.append(i)
            except (BufferFull, LogError) as e:
                errors.append(e)
            i += 1
            if kind == "dlq" and i >= 2_000:
                break
            if i % 100 == 0:
                await asyncio.sleep(0.001)
        await asyncio.sleep(1.5)  # the monitor's evaluations, the dead-letter store's retries
        alerts = firing(monitor)
        stats = producer.stats()
        small_disk.release()
        fault_proxy.reset_faults()
        released_at = time.monotonic()
        await producer.flush(timeout=60)
        final = producer.stats()
    await caught_up(rig.ledger, accepted, 120, dead=rig.dead)
    recover_s = time.monotonic() - released_at
    letters = sum(1 for _ in DeadLetterQueue(small_disk.path / "producer" / "dlq").entries()) if kind == "dlq" else 0
    error = type(errors[0]).__name__ if errors else "none at submit"
    notes = f"error: {error}; alerts: {', '.join(alerts) or 'none'}"
    if letters:
        notes += f"; {letters:,} dead-letter entries for {final.dead_lettered:,} letters"
    outcome = chaos_outcome(rig.check(f"8 disk full: {kind}", accepted, recover_s=recover_s, notes=notes))
    assert_no_loss(outcome, rig.ledger, accepted)
    if kind == "dlq":
        # The store's LogError is logged and counted; the letters wait in memory (in flight) until it works.
        assert stats.dead_letter_write_failures > 0, stats
        assert stats.dead_letter_pending > 0, stats
        assert final.dead_lettered == len(accepted), final
    else:
        assert errors, "the disk filled up without an error"
        assert isinstance(errors[0], LogError), errors[0]  # a TreasureEngineError and an OSError (ENOSPC)
    if not alerts:
        raise NoAlert(f"no alert fired while {kind} could not be written")


def damage(directory: Path, accepted: list[int], keys: int = 101) -> tuple[list[int], list[int]]:
    """Overwrites four bytes of padding in the frames of the events a quarter, half and three quarters into
    `accepted` (their checksums then fail), in the segments under `directory`. Returns the ids damaged and the
    ids left."""
    n = len(accepted)
    picks = [accepted[n // 4], accepted[n // 2], accepted[3 * n // 4]]
    damaged = []
    for segment in sorted(directory.rglob("*.seg")):
        data = bytearray(segment.read_bytes())
        for i in picks:
            at = data.find(b"k%d:%d:...." % (i % keys, i))
            if at >= 0:
                at = data.index(b":....", at) + 1
                data[at : at + 4] = b"XXXX"
                damaged.append(i)
        segment.write_bytes(data)
    return damaged, [i for i in accepted if i not in damaged]


async def settle(
    rig: Rig, record: Callable[[Outcome], Outcome], case: str, expected: list[int], started: float, notes: str
) -> Outcome:
    """Waits for `expected` to be handled, records the case's figures (recovery from `started`), asserts no loss."""
    await caught_up(rig.ledger, expected, 120)
    outcome = record(rig.check(case, expected, recover_s=time.monotonic() - started, notes=notes))
    assert_no_loss(outcome, rig.ledger, expected)
    return outcome


async def test_case09_corrupted_wal_segments(
    chaos_rig: Callable[..., Rig], fault_proxy: ThreadedFaultProxy, chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    """A WAL producer killed while nothing was acknowledged; three of its frames damaged; the restart replays
    every other event and reports the damage."""
    rig = chaos_rig(shards=2)
    state, log = rig.producer_state(), rig.directory / "producer.log"
    fault_proxy.set(stall=True, fault_targets={"PutRecords"})  # the whole burst stays in the WAL
    killed = producer_run(fault_proxy.endpoint_url, rig.stream, state, log, seconds=30.0, kill_after=1.0)
    fault_proxy.set(stall=False)  # what the proxy held for the dead process is dropped, never forwarded
    damaged, expected = damage(state / "wal", killed.accepted)
    started = time.monotonic()
    restart = producer_run(fault_proxy.endpoint_url, rig.stream, state, log, rate=1.0)
    notes = (
        f"{len(damaged)} frames overwritten by the test: the restart skipped {restart.corrupt} damaged range(s) and "
        f"replayed {restart.recovered:,}"
    )
    await settle(rig, chaos_outcome, "9 corrupted WAL segment", expected, started, notes)
    assert len(damaged) == 3
    assert restart.corrupt >= 1, "the damage went unreported"
    assert restart.recovered >= len(expected)
    assert not set(damaged) & set(rig.ledger.handled), "a damaged frame was delivered"


async def test_case09_corrupted_dead_letter_queue(
    chaos_rig: Callable[..., Rig], fault_proxy: ThreadedFaultProxy, chaos_outcome: Callable[[Outcome], Outcome]
) -> None:
    """A dead-letter queue with three damaged entries: `verify` reports them, reading and redriving skip them,
    every other entry is redriven to the stream and handled."""
    rig = chaos_rig(shards=2)
    fault_proxy.set(
        fail_fraction=1.0, fail_error_code="InternalFailure"
    )  # every record fails its only attempt: all of them are dead-lettered
    config = producer_config(rig.stream, fault_proxy.endpoint_url, rig.producer_state(), max_attempts=1)
    async with Producer(config) as producer:
        feeder = Feeder(producer)
        await feeder.run(2_000.0, count=2_000)
        await producer.flush(timeout=60)
    fault_proxy.reset_faults()
    accepted = feeder.accepted
    dlq = DeadLetterQueue(rig.producer_state() / "dlq")
    damaged, expected = damage(dlq.path, accepted)
    report = dlq.verify()
    started = time.monotonic()
    redrive_state = rig.directory / "redrive"
    rig.producer_dirs.append(redrive_state)
    async with Producer(producer_config(rig.stream, rig.kinesis, redrive_state)) as producer:
        redriven = await dlq.redrive(producer)
        await producer.flush(timeout=60)
    notes = (
        f"{len(damaged)} entries overwritten by the test: verify reported {len(report.corruptions)} damaged "
        f"range(s); {redriven.redriven:,} redriven"
    )
    await settle(rig, chaos_outcome, "9 corrupted dead-letter queue", expected, started, notes)
    assert len(damaged) == 3
    assert report.corruptions, "the damage went unreported"
    assert report.entries == len(accepted) - len(damaged), report
    assert redriven.redriven == len(expected), redriven
