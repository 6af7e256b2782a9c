"""Group "at_the_limits": a new user's first burst against a real Kinesis endpoint, at the default settings.

The end-to-end twin of the batcher's component figures (criterion ``batcher/aggregate_4_shards``): the default
``ProducerConfig`` against kinesalite on 127.0.0.1, a fresh 4-shard stream per run, 200,000 events of 100 bytes
over 1,000 partition keys pushed with ``submit_many`` in lists of 1,000, then ``await producer.flush()``, then
``close()``. Each run is bench/limits_child.py in its own fresh process, so its CPU figures are the producer's.

Peers, side by side in each benchmark round (their order alternates from round to round):

- ``default limits``: ``ProducerConfig`` defaults; the shard limits (1,000 records/s and 1 MiB/s per shard)
  bind, so the burst takes about 5 s of wall time;
- ``raised limits``: ``shard_records_per_s=1e6, shard_bytes_per_s=1e9``: nothing binds but the endpoint and
  the producer itself.

After each run the stream is read back (GetRecords from TRIM_HORIZON on every shard, KPL aggregates parsed with
Amazon's protobuf schema from aws-kinesis-agg, not our decoder) and every one of the 200,000 payloads must be
there; the child itself fails unless ``delivered`` equals 200,000 with nothing in flight or dead-lettered.

Targets (from the issue; checked by bench/run.py, not asserted here): the default-limits run's process CPU per
event <= 1.3x the raised-limits run's; the default-limits run sends <= 250 requests; the raised-limits run's
batcher-thread CPU per event <= 2x criterion's batcher cost per event. The time pytest-benchmark records is one
round (both children, their streams, the read-back); the figures are in ``extra_info``.

``TREASURE_BENCH_LIMITS_ROUNDS`` (default 3) sets the rounds, e.g. 1 while developing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.emulators import Kinesalite, create_stream, delete_stream
from tests.support.kinesis_reader import count_stream

CHILD = Path(__file__).resolve().parent / "limits_child.py"
EVENTS = 200_000
SHARDS = 4
ROUNDS = int(os.environ.get("TREASURE_BENCH_LIMITS_ROUNDS", "3"))
PEERS = {"default limits": "default", "raised limits": "raised"}  # peer -> limits_child.py --variant


@pytest.fixture(scope="module")
def kinesalite() -> Iterator[Kinesalite]:
    with Kinesalite() as kinesis:
        yield kinesis


def run_child(endpoint_url: str, stream: str, variant: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(CHILD), "--endpoint", endpoint_url, "--stream", stream, "--variant", variant]
    cmd += ["--events", str(EVENTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        failed = f"{CHILD.name} --variant {variant} failed ({proc.returncode})"
        raise RuntimeError(f"{failed}:\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One peer's figures over its runs: medians, the requests of every run, CPU per event by thread name."""
    requests = [r["stats"]["requests"] for r in runs]
    names = sorted({name for r in runs for name in r["threads"]})
    per_thread = {
        name: median([r["threads"].get(name, {"cpu_s": 0.0})["cpu_s"] / r["events"] * 1e9 for r in runs])
        for name in names
    }
    return {
        "runs": len(runs),
        "events": EVENTS,
        "wall_s_median": median([r["wall_s"] for r in runs]),
        "cpu_per_event_ns_median": median([r["cpu_per_event_ns"] for r in runs]),
        "cpu_per_event_ns_all": [r["cpu_per_event_ns"] for r in runs],
        "batcher_cpu_per_event_ns_median": median([r["batcher_cpu_per_event_ns"] for r in runs]),
        "batcher_cpu_per_event_ns_all": [r["batcher_cpu_per_event_ns"] for r in runs],
        "thread_cpu_per_event_ns_median": dict(sorted(per_thread.items(), key=lambda kv: -kv[1])),
        "requests_all": requests,
        "requests_max": max(requests),
        "requests_median": median([float(x) for x in requests]),
        "records_per_request_median": median([r["stats"]["records_sent"] / r["stats"]["requests"] for r in runs]),
        "events_per_request_median": median([r["stats"]["delivered"] / r["stats"]["requests"] for r in runs]),
        "kinesis_records_median": median([float(r["stats"]["records_sent"]) for r in runs]),
        "throttled_max": max(r["stats"]["throttled"] for r in runs),
        "retried_max": max(r["stats"]["retried"] for r in runs),
        "process_cpu_s_total_median": median([r["process_cpu_s_total"] for r in runs]),
        "read_back": [r["read_back"] for r in runs],
        "run_details": runs,
    }


@pytest.mark.bench
def test_at_the_limits(benchmark: BenchmarkFixture, kinesalite: Kinesalite, child_env: dict[str, str]) -> None:
    benchmark.group = "at_the_limits"
    runs: dict[str, list[dict[str, Any]]] = {peer: [] for peer in PEERS}
    order = list(PEERS)
    streams = iter(range(1_000_000))
    endpoint = kinesalite.endpoint_url

    with tempfile.TemporaryDirectory(prefix="bench-limits-") as state:
        # ProducerConfig's default state_dir (the dead-letter queue) lies under XDG_DATA_HOME: keep it here.
        env = {**child_env, "XDG_DATA_HOME": state}

        def one_round() -> None:
            for peer in order:
                stream = f"limits-{next(streams)}"
                create_stream(endpoint, stream, SHARDS)
                result = run_child(endpoint, stream, PEERS[peer], env)
                result["read_back"] = back = count_stream(endpoint, stream)
                delete_stream(endpoint, stream)
                assert back["distinct_payloads"] == EVENTS, (peer, back)
                s = result["stats"]
                assert (s["delivered"], s["in_flight"], s["dead_lettered"]) == (EVENTS, 0, 0), (peer, s)
                runs[peer].append(result)
            order.reverse()  # alternate which variant runs first

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    benchmark.extra_info.update(
        interleaved=True,
        rounds=ROUNDS,
        events=EVENTS,
        shards=SHARDS,
        peers={peer: summary(results) for peer, results in runs.items()},
    )
