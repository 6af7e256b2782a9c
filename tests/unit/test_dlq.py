"""DeadLetterQueue over the segment log, without Kinesis: storage, reading, marks, damage, locks, bad input."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treasure_engine import ConfigError, DeadLetter, DeadLetterFilter, DeadLetterQueue
from treasure_engine._core import LogError, LogLocked, LogNotFound
from treasure_engine.dlq._entries import MAX_TRACEBACK, decode, encode


def letter(i: int, **kw: object) -> DeadLetter:
    fields: dict[str, object] = {
        "data": b"payload-%d" % i,
        "partition_key": f"user-{i % 7}",
        "source": "producer",
        "stream": "orders",
        "attempts": 3,
        "error_type": "MaxAttemptsExceeded",
        "error_message": "last error InternalFailure",
        "first_failure_at": 1_700_000_000.0 + i,
        "dead_lettered_at": 1_700_000_010.0 + i,
        "app_name": "unit",
        "engine_version": "0.1.0",
    }
    fields.update(kw)
    return DeadLetter(**fields)  # type: ignore[arg-type]


@given(
    data=st.binary(max_size=300),
    key=st.text(min_size=1, max_size=20),
    ehk=st.none() | st.integers(0, 2**128 - 1).map(str),
    seq=st.none() | st.text(alphabet="0123456789", min_size=1, max_size=56),
    sub=st.none() | st.integers(0, 2**31),
    tb=st.none() | st.text(max_size=50),
)
@settings(max_examples=60, deadline=None)
def test_entry_round_trip(
    data: bytes, key: str, ehk: str | None, seq: str | None, sub: int | None, tb: str | None
) -> None:
    d = letter(
        1,
        data=data,
        partition_key=key,
        explicit_hash_key=ehk,
        sequence_number=seq,
        sub_sequence_number=sub,
        traceback=tb,
        source="consumer",
        shard_id="shardId-000000000001",
    )
    assert decode(42, encode(d)) == msgspec_replace(d, id=42)


def msgspec_replace(d: DeadLetter, **kw: object) -> DeadLetter:
    import msgspec

    return msgspec.structs.replace(d, **kw)


def test_put_read_get_stats_and_filters(tmp_path: Path) -> None:
    with DeadLetterQueue(tmp_path / "dlq") as dlq:
        ids = dlq.put([letter(i) for i in range(50)])
        ids += dlq.put([letter(i, source="consumer", error_type="HandlerError") for i in range(50, 60)])
    assert ids == sorted(ids)
    assert len(set(ids)) == 60
    dlq = DeadLetterQueue(tmp_path / "dlq")
    got = list(dlq.entries())
    assert [d.id for d in got] == ids
    assert [d.data for d in got] == [b"payload-%d" % i for i in range(60)]
    assert dlq.get(ids[7]) == got[7]
    with pytest.raises(KeyError):
        dlq.get(ids[7] + 1)  # inside a frame: not an id
    assert len(list(dlq.entries(since=ids[10]))) == 50
    assert len(list(dlq.entries(filter=DeadLetterFilter(source="consumer")))) == 10
    assert len(list(dlq.entries(filter=DeadLetterFilter(partition_key="user-[12]")))) == 18
    assert len(list(dlq.entries(filter=DeadLetterFilter(before=1_700_000_020.0)))) == 10
    s = dlq.stats()
    assert s.count == 60
    assert s.by_error_type == {"MaxAttemptsExceeded": 50, "HandlerError": 10}
    assert s.bytes == sum(len(b"payload-%d" % i) for i in range(60))
    assert s.rate_per_s == 0.0  # all dead-lettered long ago
    assert s.oldest_age_s is not None
    assert s.oldest_age_s > 86400


def test_files_are_private(tmp_path: Path) -> None:
    with DeadLetterQueue(tmp_path / "dlq") as dlq:
        dlq.put([letter(1)])
    assert stat.S_IMODE((tmp_path / "dlq").stat().st_mode) == 0o700
    for f in (tmp_path / "dlq").glob("*.seg"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_traceback_is_bounded(tmp_path: Path) -> None:
    with DeadLetterQueue(tmp_path / "dlq") as dlq:
        dlq.put([letter(1, traceback="x" * (MAX_TRACEBACK * 3))])
    (d,) = DeadLetterQueue(tmp_path / "dlq").entries()
    assert d.traceback is not None
    assert len(d.traceback) <= MAX_TRACEBACK + 1


async def test_redrive_to_a_handler_marks_and_resumes(tmp_path: Path) -> None:
    with DeadLetterQueue(tmp_path / "dlq") as dlq:
        dlq.put([letter(i) for i in range(100)])
    dlq = DeadLetterQueue(tmp_path / "dlq")
    calls = 0

    def flaky(batch: list[DeadLetter]) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("downstream down")

    with pytest.raises(RuntimeError):
        await dlq.redrive(flaky, batch_size=10)
    assert dlq.stats().count == 80  # two batches marked, the third not
    got: list[DeadLetter] = []
    report = await dlq.redrive(got.extend, batch_size=10)
    assert [d.data for d in got] == [b"payload-%d" % i for i in range(20, 100)]
    assert report.redriven == 80
    assert (await dlq.redrive(got.extend)).redriven == 0
    assert dlq.stats().redriven == 100


async def test_redrive_rejects_bad_arguments(tmp_path: Path) -> None:
    with DeadLetterQueue(tmp_path / "dlq") as dlq:
        dlq.put([letter(1)])
    with pytest.raises(ConfigError, match="rate"):
        await DeadLetterQueue(tmp_path / "dlq").redrive(print, rate=0)
    with pytest.raises(ConfigError, match="batch_size"):
        await DeadLetterQueue(tmp_path / "dlq").redrive(print, batch_size=0)


def test_purge_hides_old_entries_and_deletes_whole_segments(tmp_path: Path) -> None:
    path = tmp_path / "dlq"
    with DeadLetterQueue(path, segment_bytes=4096) as dlq:
        dlq.put([letter(i, data=b"x" * 200) for i in range(100)])
    segments_before = len(list(path.glob("*.seg")))
    assert segments_before > 3
    dlq = DeadLetterQueue(path)
    assert dlq.purge(before=1_700_000_010.0 + 60) == 60
    left = list(dlq.entries())
    assert [d.data for d in left] == [b"x" * 200] * 40
    assert min(d.dead_lettered_at for d in left) >= 1_700_000_070.0
    assert len(list(path.glob("*.seg"))) < segments_before
    assert dlq.stats().count == 40


def test_damage_is_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "dlq"
    with DeadLetterQueue(path) as dlq:
        ids = dlq.put([letter(i) for i in range(20)])
    (seg,) = path.glob("*.seg")
    raw = bytearray(seg.read_bytes())
    base = int(seg.stem)
    hit = ids[5] - base + 20  # inside entry 5
    raw[hit] ^= 0xFF
    seg.write_bytes(bytes(raw) + b"garbage appended by a bad disk")
    dlq = DeadLetterQueue(path)
    got = [d.data for d in dlq.entries()]
    assert got == [b"payload-%d" % i for i in range(20) if i != 5]
    report = dlq.verify()
    assert not report.ok
    assert report.entries == 19
    assert len(report.corruptions) >= 1
    assert dlq.stats().corrupted_frames >= 1


def test_missing_queue_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(LogNotFound):
        list(DeadLetterQueue(tmp_path / "nope").entries())
    with pytest.raises(LogNotFound):
        DeadLetterQueue(tmp_path / "nope").stats()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_refuses_writes_with_a_typed_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LogError):
            DeadLetterQueue(ro / "dlq").put([letter(1)])
    finally:
        ro.chmod(0o700)


def test_unwritable_location_is_a_typed_error_and_nothing_is_acknowledged(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"x")
    with pytest.raises(LogError) as e:
        DeadLetterQueue(blocker / "dlq").put([letter(1)])
    assert isinstance(e.value, OSError)
    assert "not-a-directory" in str(e.value)


def test_second_writer_is_refused_and_claim_takes_the_next_slot(tmp_path: Path) -> None:
    path = tmp_path / "dlq"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from treasure_engine import DeadLetterQueue as Q; q = Q(sys.argv[1]); "
            "q.put([]); print('held', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LogLocked, match=str(holder.pid)):
            DeadLetterQueue(path).put([letter(1)])
        claimed = DeadLetterQueue.claim(path)
        try:
            assert claimed.path == tmp_path / "dlq-1"
            claimed.put([letter(2)])
        finally:
            claimed.close()
        # Reading never needs the lock.
        assert list(DeadLetterQueue(path).entries()) == []
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    t = time.monotonic()
    DeadLetterQueue(path).put([letter(3)])  # the lock died with its holder
    assert time.monotonic() - t < 5
