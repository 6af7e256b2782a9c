"""Group "memory": peak RSS of a producer whose endpoint has stalled (the ring must bound it).

Each case runs bench/memory_child.py in its own process, so the peak RSS (``ru_maxrss``) is the producer's
and not this test runner's. The endpoint is kinesalite (4 shards) behind the tests' fault proxy on 127.0.0.1,
which holds every PutRecords unanswered.

Cases:

- ``baseline``: the child imports treasure_engine, starts the same producer and closes it;
- ``stalled-10M``: the child also offers 10,000,000 100-byte events with ``submit_many`` as fast as it can
  (refusals expected once the 64 MiB ring is full, and counted), tops the ring up after a settle, then reads
  its peak RSS.

Target (from the issue; checked by bench/run.py, not asserted here): peak RSS < ring size + 64 MiB.
The time the benchmark records is the child's whole run; the figures are in ``extra_info``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.emulators import Kinesalite, create_stream
from tests.support.faultproxy import ThreadedFaultProxy

from conftest import RING_BYTES, STREAM, MiB

CHILD = Path(__file__).resolve().parent / "memory_child.py"
EVENTS = 10_000_000
CASES = ["baseline", "stalled-10M"]


@pytest.fixture(scope="module")
def stalled_endpoint() -> Iterator[ThreadedFaultProxy]:
    """A real Kinesis (kinesalite, 4 shards) behind the tests' fault proxy, which answers everything but holds
    every PutRecords unanswered: the producer starts for real and then cannot deliver."""
    with Kinesalite() as kinesis:
        create_stream(kinesis.endpoint_url, STREAM, 4)
        with ThreadedFaultProxy(kinesis.endpoint_url) as proxy:
            proxy.set(stall="before", fault_targets={"PutRecords"})
            yield proxy


def run_child(endpoint_url: str, env: dict[str, str], *, baseline: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(CHILD), "--endpoint", endpoint_url, "--stream", STREAM]
    cmd += ["--ring-mib", str(RING_BYTES // MiB), "--events", str(EVENTS)]
    if baseline:
        cmd.append("--baseline")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{CHILD.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES)
def test_memory(
    benchmark: BenchmarkFixture, case: str, stalled_endpoint: ThreadedFaultProxy, child_env: dict[str, str]
) -> None:
    benchmark.group = "memory"
    results: list[dict[str, Any]] = []

    def run() -> None:
        results.append(run_child(stalled_endpoint.endpoint_url, child_env, baseline=case == "baseline"))

    benchmark.pedantic(run, rounds=1, iterations=1)
    (result,) = results
    if case != "baseline":
        assert result["offered"] == EVENTS
        assert result["accepted"] > 0
        assert result["refused"] > 0, "the ring never filled: the endpoint did not stall"
        # Closing with the endpoint stalled dead-letters what could not be delivered: nothing is lost.
        closed = result["after_close"]
        assert closed["in_flight"] == 0, closed
        assert closed["accepted"] == closed["delivered"] + closed["dead_lettered"], closed
    benchmark.extra_info.update(case=case, target_rss=RING_BYTES + 64 * MiB, **result)
