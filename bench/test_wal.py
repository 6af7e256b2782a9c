"""Group "submit_durability": what the write-ahead log adds to submit, as a ratio to durability="memory".

Peers, each handing the same pre-built list of 10,000 ``(bytes, str)`` tuples (100-byte payloads, 10,000 keys;
conftest ``submit_events``) to a started ``_core.Pipeline`` per round:

- ``Pipeline.submit (memory)``: ``submit(data, key)`` per event, no WAL (``durability="memory"``), the
  baseline; the same figure as group "submit" measures;
- ``Pipeline.submit (wal, fsync interval 100 ms)``: the same loop into a pipeline with
  ``wal_dir=..., wal_fsync="interval", wal_fsync_interval_ms=100`` (``durability="wal"``'s default): every
  ``submit`` encodes the event into its frame in the WAL's preallocated, mapped segment (the page cache: no
  system call) before it returns; the log's own thread msyncs every 100 ms;
- ``Pipeline.submit_many (memory)`` and ``Pipeline.submit_many (wal, fsync interval 100 ms)``: one call taking
  the whole list;
- ``Pipeline.submit (wal, fsync never)``: ``wal_fsync="never"``, to separate the copies from the msyncs running
  meanwhile.

Each durability gets its own pipeline (conftest ``CannedPipeline``: 64 MiB ring, 4 shards, no shard rate limit,
a background thread completing every request with a canned success), warmed like group "submit"'s; one is
open at a time, so the peers are ordered by durability. The WAL lives in a directory from
``tmp_path_factory``; its cursor advances as requests complete (every 100 ms at most) and whole segments below
it are deleted, so the log stays within a segment or two (allocated 64 MiB each, plus the next one prepared
ahead); the directory is deleted when the pipeline is closed. Each round starts from a drained pipeline
(untimed setup: ``begin_flush()`` and wait). Afterwards every event is checked accepted and delivered, the WAL
checked free of errors and grown by at least the payloads of every event submitted.

``extra_info`` also records the write-family syscalls of the whole process per round and the bytes they wrote
per event (medians; ``/proc/self/io`` read in the untimed setup, so background threads count too, e.g. the
WAL's cursor), the bytes the WAL grew by per event, and the file system holding it.

Targets (issue 16): WAL / memory per event, medians of the same run, at most 4x for submit and 2x for
submit_many; bench/run.py checks them.
"""

from __future__ import annotations

import shutil
import statistics
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from conftest import DATA_BYTES, EVENTS, CannedPipeline, filesystem

ROUNDS = 200
WARMUP_ROUNDS = 5
FSYNC_INTERVAL_MS = 100
# The segment log's format (docs/log-format.md): segment header, frame header and its sync marker.
SEGMENT_HEADER = 16
FRAME_HEADER = 12
FRAME_SYNC = 0x5AFE_C0DE
# Pipeline options per durability (a WAL also gets a fresh wal_dir).
DURABILITY: dict[str, dict[str, object]] = {
    "memory": {},
    "wal-interval": {"wal_fsync": "interval", "wal_fsync_interval_ms": FSYNC_INTERVAL_MS},
    "wal-never": {"wal_fsync": "never"},
}
# peer -> (durability, call), in running order: grouped by durability, so that one pipeline is open at a time.
PEERS: dict[str, tuple[str, str]] = {
    "Pipeline.submit (memory)": ("memory", "submit"),
    "Pipeline.submit_many (memory)": ("memory", "submit_many"),
    "Pipeline.submit (wal, fsync interval 100 ms)": ("wal-interval", "submit"),
    "Pipeline.submit_many (wal, fsync interval 100 ms)": ("wal-interval", "submit_many"),
    "Pipeline.submit (wal, fsync never)": ("wal-never", "submit"),
}


def proc_io() -> tuple[int, int]:
    """Write-family syscalls and the bytes they wrote so far, by every thread of this process."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["syscw"]), int(fields["wchar"])


def wal_end(wal_dir: Path) -> int:
    """The WAL's end position: the last segment's base (its name) plus the frames in it. Segments are allocated to
    their full size up front, zeros after the last frame, so a file's size does not say where its frames end."""
    segments = sorted(wal_dir.glob("*.seg"))
    if not segments:
        return 0
    data = segments[-1].read_bytes()
    at = SEGMENT_HEADER
    while at + FRAME_HEADER <= len(data):
        sync, length = struct.unpack_from("<II", data, at)
        if sync != FRAME_SYNC:
            break
        at += FRAME_HEADER + length
    return int(segments[-1].stem) + at


class Durable:
    """One CannedPipeline at a time, built (and warmed) on first use for a durability."""

    def __init__(self, events: list[tuple[bytes, str]], tmp: pytest.TempPathFactory) -> None:
        self.events = events
        self.tmp = tmp
        self.durability: str | None = None
        self.cp: CannedPipeline | None = None
        self.wal_dir: Path | None = None

    def get(self, durability: str) -> CannedPipeline:
        if durability != self.durability or self.cp is None:
            self.close()
            options = dict(DURABILITY[durability])
            self.wal_dir = None
            if durability != "memory":
                self.wal_dir = options["wal_dir"] = self.tmp.mktemp(durability)
            self.durability, self.cp = durability, CannedPipeline(**options)
            self.cp.warm(self.events)
        return self.cp

    def close(self) -> None:
        if self.cp is not None:
            cp, self.cp, self.durability = self.cp, None, None
            cp.close()
        if self.wal_dir is not None:
            shutil.rmtree(self.wal_dir)  # up to two 64 MiB segments: not worth keeping among pytest's temp dirs
            self.wal_dir = None


@pytest.fixture(scope="module")
def durable(submit_events: list[tuple[bytes, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Durable]:
    d = Durable(submit_events, tmp_path_factory)
    try:
        yield d
    finally:
        d.close()


@pytest.mark.bench
@pytest.mark.parametrize("peer", list(PEERS))
def test_submit_durability(
    benchmark: BenchmarkFixture,
    peer: str,
    submit_events: list[tuple[bytes, str]],
    durable: Durable,
) -> None:
    benchmark.group = "submit_durability"
    durability, call = PEERS[peer]
    events = submit_events
    cp = durable.get(durability)
    wal_dir = durable.wal_dir
    pipeline = cp.pipeline
    accepted: list[int] = []
    # /proc/self/io at the end of each setup, and its growth over each round (setup end to next setup start).
    marks: list[tuple[int, int]] = []
    io_rounds: list[tuple[int, int]] = []

    def submit() -> None:
        submit = pipeline.submit
        for data, key in events:
            submit(data, key)

    def submit_many() -> None:
        accepted.append(pipeline.submit_many(events))

    run: Callable[[], None] = {"submit": submit, "submit_many": submit_many}[call]

    def round_io() -> None:
        if marks:
            now = proc_io()
            io_rounds.append((now[0] - marks[-1][0], now[1] - marks[-1][1]))

    def setup() -> None:
        round_io()
        cp.drain()
        marks.append(proc_io())

    before = pipeline.stats()
    wal_before = wal_end(wal_dir) if wal_dir else 0
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    round_io()
    cp.drain()
    after = pipeline.stats()
    wal_grown = wal_end(wal_dir) - wal_before if wal_dir else 0

    submitted = EVENTS * (ROUNDS + WARMUP_ROUNDS)
    # Every event was accepted (the ring never filled) and delivered to the canned endpoint.
    assert after["refused"] == before["refused"]
    assert after["accepted"] - before["accepted"] == submitted
    assert after["delivered"] - before["delivered"] == submitted
    assert all(n == EVENTS for n in accepted)
    assert after["wal_errors"] == 0
    assert after["wal_recovered"] == after["wal_replay_pending"] == 0
    if wal_dir:
        assert wal_grown >= submitted * DATA_BYTES, "the WAL did not grow by the events submitted"

    stats = benchmark.stats.stats
    timed = io_rounds[-ROUNDS:]  # without the warm-up rounds
    benchmark.extra_info.update(
        peer=peer,
        durability="memory" if wal_dir is None else "wal",
        wal_fsync=DURABILITY[durability].get("wal_fsync"),
        wal_fsync_interval_ms=DURABILITY[durability].get("wal_fsync_interval_ms"),
        events_per_round=EVENTS,
        per_event_ns_median=stats.median / EVENTS * 1e9,
        per_event_ns_min=stats.min / EVENTS * 1e9,
        per_event_ns_mean=stats.mean / EVENTS * 1e9,
        write_syscalls_per_round_median=statistics.median(r[0] for r in timed),
        written_bytes_per_event_median=statistics.median(r[1] for r in timed) / EVENTS,
        wal_bytes_per_event=wal_grown / submitted if wal_dir else None,
        wal_disk_bytes=sum(f.stat().st_size for f in wal_dir.glob("*.seg")) if wal_dir else None,
        filesystem=filesystem(wal_dir) if wal_dir else None,
    )
