"""The dead-letter queue end to end: a failing endpoint fills it, redrive empties it into a healthy stream.

The endpoint is kinesalite behind the fault proxy with ``fail_fraction=1`` and ``InternalFailure`` (throttled records
are not dead-lettered for their attempts): every record is really withheld and reported failed. Ids are counted
in the stream with the reference reader (boto3 + aws-kinesis-agg).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.support.emulators import Kinesalite
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.kinesis_reader import read_all

from treasure_engine import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterQueue,
    Producer,
    ProducerConfig,
    __version__,
)

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"shard_records_per_s": 1e9, "shard_bytes_per_s": 1e9, "linger_ms": 5.0}
N = 2_000


def _events(n: int, start: int = 0) -> list[tuple[bytes, str]]:
    return [(b"%d:event" % i, f"user-{i % 37}") for i in range(start, start + n)]


def _ids(records: list[dict[str, Any]]) -> Counter[int]:
    return Counter(int(r["data"].split(b":", 1)[0]) for r in records)


async def _fill_dlq(endpoint_url: str, stream: str, state_dir: Path, events: list[tuple[bytes, str]]) -> Producer:
    config = ProducerConfig(
        stream=stream,
        endpoint_url=endpoint_url,
        max_attempts=2,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        state_dir=str(state_dir),
        app_name="dlq-test",
        **FAST,
    )
    async with Producer(config) as producer:
        for data, key in events:
            producer.submit(data, key)
        await producer.flush(timeout=60)
    return producer


async def test_failing_endpoint_dead_letters_everything_with_metadata(
    fault_proxy: ThreadedFaultProxy, kinesalite_stream: str, tmp_path: Path
) -> None:
    fault_proxy.set(fail_fraction=1.0, fail_error_code="InternalFailure")
    events = _events(N)
    t0 = time.time()
    producer = await _fill_dlq(fault_proxy.endpoint_url, kinesalite_stream, tmp_path, events)
    t1 = time.time()

    stats = producer.stats()
    assert stats.accepted == N
    assert stats.dead_lettered == N
    assert stats.delivered == 0
    assert stats.in_flight == 0
    assert fault_proxy.snapshot()["records_forwarded"] == 0

    dlq = DeadLetterQueue(tmp_path / "dlq")
    entries = list(dlq.entries())
    assert sorted((e.data, e.partition_key) for e in entries) == sorted(events)
    assert len({e.id for e in entries}) == N
    for e in entries:
        assert e.source == "producer"
        assert e.stream == kinesalite_stream
        assert e.attempts == 2
        assert e.error_type == "MaxAttemptsExceeded"
        assert "InternalFailure" in e.error_message
        assert t0 <= e.first_failure_at <= e.dead_lettered_at <= t1
        assert e.app_name == "dlq-test"
        assert e.engine_version == __version__
        assert e.shard_id is None
        assert e.sequence_number is None
    assert dlq.get(entries[5].id) == entries[5]
    s = dlq.stats()
    assert s.count == N
    assert s.bytes == sum(len(d) for d, _ in events)
    assert s.by_error_type == {"MaxAttemptsExceeded": N}
    assert s.oldest_age_s is not None
    assert s.oldest_age_s < 120
    assert s.rate_per_s > 0
    assert dlq.verify().ok


async def test_redrive_delivers_each_entry_once_and_a_second_run_sends_nothing(
    fault_proxy: ThreadedFaultProxy, kinesalite: Kinesalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    broken = stream_factory(kinesalite.endpoint_url, 2)
    fault_proxy.set(fail_fraction=1.0, fail_error_code="InternalFailure")
    events = _events(N)
    await _fill_dlq(fault_proxy.endpoint_url, broken, tmp_path, events)

    healthy = stream_factory(kinesalite.endpoint_url, 3)
    dlq = DeadLetterQueue(tmp_path / "dlq")
    target = ProducerConfig(stream=healthy, endpoint_url=kinesalite.endpoint_url, state_dir=str(tmp_path / "t"), **FAST)
    seen: list[int] = []
    async with Producer(target) as producer:
        first = await dlq.redrive(producer, batch_size=300, progress=lambda r: seen.append(r.redriven))
        second = await dlq.redrive(producer, batch_size=300)
    assert first.redriven == N
    assert first.failed == 0
    assert seen == sorted(seen)
    assert seen[-1] == N
    assert second.redriven == 0

    ids = _ids(read_all(kinesalite.endpoint_url, healthy))
    assert ids == Counter(range(N)), "each dead letter exactly once in the healthy stream"
    assert dlq.stats().count == 0
    assert dlq.stats().redriven == N
    assert list(dlq.entries()) == []
    assert len(list(dlq.entries(include_redriven=True))) == N


async def test_redrive_filter_rate_and_resume(
    fault_proxy: ThreadedFaultProxy, kinesalite: Kinesalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    broken = stream_factory(kinesalite.endpoint_url, 1)
    fault_proxy.set(fail_fraction=1.0, fail_error_code="InternalFailure")
    await _fill_dlq(fault_proxy.endpoint_url, broken, tmp_path, _events(400))
    dlq = DeadLetterQueue(tmp_path / "dlq")
    handled: list[DeadLetter] = []
    only = DeadLetterFilter(partition_key="user-1*")

    started = time.monotonic()
    report = await dlq.redrive(handled.extend, filter=only, rate=200.0, batch_size=20)
    elapsed = time.monotonic() - started
    expected = [d for d in _events(400) if d[1].startswith("user-1")]
    assert sorted((d.data, d.partition_key) for d in handled) == sorted(expected)
    assert report.redriven == len(expected)
    # ~130 entries at 200/s, sent in batches of 20: the limiter holds back at least the later batches.
    assert elapsed >= (len(expected) - 20) / 200.0 * 0.9
    # The rest is still waiting; an unfiltered run takes exactly those.
    rest: list[DeadLetter] = []
    await dlq.redrive(rest.extend)
    assert len(rest) == 400 - len(expected)
    assert {d.id for d in rest}.isdisjoint({d.id for d in handled})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treasure_engine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
        check=False,
    )


async def test_cli_list_show_stats_verify_redrive_purge(
    fault_proxy: ThreadedFaultProxy, kinesalite: Kinesalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    broken = stream_factory(kinesalite.endpoint_url, 1)
    fault_proxy.set(fail_fraction=1.0, fail_error_code="InternalFailure")
    await _fill_dlq(fault_proxy.endpoint_url, broken, tmp_path, _events(50))
    path = str(tmp_path / "dlq")

    listed = _cli("dlq", "list", path, "--json")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 50
    first_id = int(lines[0].split('"id": ')[1].split(",")[0])
    shown = _cli("dlq", "show", path, str(first_id))
    assert shown.returncode == 0
    assert '"error_type": "MaxAttemptsExceeded"' in shown.stdout
    assert _cli("dlq", "list", path, "--filter", "partition_key=user-3*").stdout.count("\n") == 9
    stats = _cli("dlq", "stats", path)
    assert stats.returncode == 0
    assert stats.stdout.startswith("waiting 50 ")
    assert _cli("dlq", "verify", path).returncode == 0

    healthy = stream_factory(kinesalite.endpoint_url, 1)
    redrive = _cli("dlq", "redrive", path, "--stream", healthy, "--endpoint-url", kinesalite.endpoint_url)
    assert redrive.returncode == 0, redrive.stderr
    assert "redriven 50, failed again 0" in redrive.stdout
    assert _ids(read_all(kinesalite.endpoint_url, healthy)) == Counter(range(50))
    again = _cli("dlq", "redrive", path, "--stream", healthy, "--endpoint-url", kinesalite.endpoint_url)
    assert "redriven 0," in again.stdout

    purged = _cli("dlq", "purge", path, "--before", "0s")
    assert purged.returncode == 0
    assert purged.stdout.startswith("purged 0 entries")
    assert _cli("dlq", "stats", path, "--json").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dlq", "list", "/nonexistent/dlq"], "no dead-letter queue"),
        (["dlq", "show", "{path}", "999999999"], "no entry"),
        (["dlq", "purge", "{path}", "--before", "yesterday-ish"], "not a time"),
        (["dlq", "list", "{path}", "--filter", "colour=blue"], "bad --filter"),
        (["dlq", "redrive", "{path}", "--stream", "s", "--rate", "0"], "--rate must be > 0"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "dlq"
    with DeadLetterQueue(path) as dlq:
        dlq.put(
            [
                DeadLetter(
                    data=b"x",
                    partition_key="k",
                    source="producer",
                    stream="s",
                    attempts=1,
                    error_type="E",
                    error_message="m",
                    first_failure_at=time.time(),
                    dead_lettered_at=time.time(),
                )
            ]
        )
    result = _cli(*[a.format(path=path) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_dead_letter_store_that_fails_keeps_the_letters_and_counts_the_failures(
    fault_proxy: ThreadedFaultProxy, kinesalite_stream: str, tmp_path: Path
) -> None:
    """Dead letters count as dead-lettered only once stored: while the store fails (disk full, read-only), they
    are kept, retried, and the failures are visible in stats for alerting."""
    fault_proxy.set(fail_fraction=1.0, fail_error_code="InternalFailure")
    stored: list[DeadLetter] = []
    seen_at_failure: list[tuple[int, int]] = []
    producer: Producer | None = None

    def flaky_store(batch: list[DeadLetter]) -> None:
        assert producer is not None
        if len(seen_at_failure) < 3:
            s = producer.stats()
            seen_at_failure.append((s.dead_lettered, s.dead_letter_pending))
            raise OSError(28, "No space left on device")
        stored.extend(batch)

    config = ProducerConfig(
        stream=kinesalite_stream,
        endpoint_url=fault_proxy.endpoint_url,
        max_attempts=1,
        state_dir=str(tmp_path),
        **FAST,
    )
    producer = Producer(config, on_dead_letter=flaky_store)
    async with producer:
        for data, key in _events(100):
            producer.submit(data, key)
        await producer.flush(timeout=30)  # returns once every dead letter is stored
        final = producer.stats()
    assert len(seen_at_failure) == 3
    for dead_lettered, pending in seen_at_failure:
        assert dead_lettered == 0, "nothing counts as dead-lettered before it is stored"
        assert pending > 0, "the letters are held while the store fails"
    assert final.dead_letter_write_failures == 3
    assert sorted((d.data, d.partition_key) for d in stored) == sorted(_events(100))
    assert (final.dead_lettered, final.dead_letter_pending, final.in_flight) == (100, 0, 0)
