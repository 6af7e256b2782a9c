"""Groups "e2e" and "e2e_consume": 200,000 events into Kinesis and back out, beside the peers a user would pick.

Kinesalite on 127.0.0.1, a fresh 4-shard stream per producer run, 200,000 events of 100 bytes over 1,000
partition keys, the shard limits raised out of the way for every contender. Each run is bench/e2e_child.py in
its own fresh process (see its docstring for what each contender does), so its CPU figures are that
contender's; in each benchmark round every contender runs once, in an order that alternates (reversed every
round), so the shared machine's noise falls on all of them.

"e2e" (producers): treasure_engine, async-kinesis, aiokpl, boto3 + aws-kinesis-agg, and the emulator's ceiling
(pre-aggregated, pre-sealed PutRecords bodies posted by aiohttp). After each run the stream is read back
(GetRecords from TRIM_HORIZON on every shard, KPL aggregates parsed with Amazon's protobuf schema from
aws-kinesis-agg, not our decoder) and every one of the 200,000 payloads must be there.

"e2e_consume" (consumers): one stream filled once by treasure_engine's Producer, then read from TRIM_HORIZON in
every run by treasure_engine's ``Consumer`` (ConsumerConfig defaults, leases in moto's DynamoDB server, a fresh
application and lease table per run, a no-op handler) and by a boto3 GetRecords loop with aws-kinesis-agg's
de-aggregation (one thread per shard); each child checks it handed over all 200,000 distinct payloads.

Targets (checked by bench/run.py, not asserted here): treasure_engine's process CPU per event >= 15x less than
async-kinesis's, its wall <= 1.25x the ceiling's; the Consumer's CPU per event >= 5x less than the boto3 loop's.
The figures are in ``extra_info``; the time pytest-benchmark records is one whole round.

"e2e_sweep" (reported, no target): treasure_engine alone, the same burst with payloads of 16 B to 4 KB (1,000
keys) and with 1 or 100,000 keys (100 B), each point near 200,000 events or 50 MB; events/s and MB/s per point.

``TREASURE_BENCH_E2E_ROUNDS`` (default 3) sets the rounds, e.g. 1 while developing. A contender whose library
is not installed is left out (and reported by run.py as not measured).
"""

from __future__ import annotations

import importlib.util
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
from tests.support.emulators import Kinesalite, MotoServer, create_stream, delete_stream
from tests.support.kinesis_reader import count_stream

CHILD = Path(__file__).resolve().parent / "e2e_child.py"
EVENTS = 200_000
SHARDS = 4
ROUNDS = int(os.environ.get("TREASURE_BENCH_E2E_ROUNDS", "3"))
# peer (as RESULTS.md names it) -> (e2e_child.py --peer, the module it needs)
PRODUCERS = {
    "treasure_engine": ("treasure_engine", "treasure_engine"),
    "async-kinesis (KPL aggregation)": ("async_kinesis", "kinesis"),
    "aiokpl": ("aiokpl", "aiokpl"),
    "boto3 + aws-kinesis-agg (4 threads)": ("boto3_agg", "aws_kinesis_agg"),
    "emulator ceiling (pre-aggregated, aiohttp)": ("ceiling", "aiohttp"),
}
CONSUMERS = {
    "treasure_engine Consumer": ("consumer_treasure_engine", "treasure_engine"),
    "boto3 GetRecords loop + aws-kinesis-agg": ("consumer_boto3", "aws_kinesis_agg"),
}


def installed(peers: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {peer: arg for peer, (arg, module) in peers.items() if importlib.util.find_spec(module) is not None}


@pytest.fixture(scope="module")
def kinesalite() -> Iterator[Kinesalite]:
    with Kinesalite() as kinesis:
        yield kinesis


def run_child(peer: str, endpoint: str, stream: str, env: dict[str, str], *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, str(CHILD), "--peer", peer, "--endpoint", endpoint, "--stream", stream]
    cmd += ["--events", str(EVENTS), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{CHILD.name} --peer {peer} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's figures over its runs (medians, and every run's)."""
    return {
        "runs": len(runs),
        "events": EVENTS,
        "wall_s_median": median([r["wall_s"] for r in runs]),
        "wall_s_all": [r["wall_s"] for r in runs],
        "events_per_s_median": median([r["events_per_s"] for r in runs]),
        "cpu_per_event_ns_median": median([r["cpu_per_event_ns"] for r in runs]),
        "cpu_per_event_ns_all": [r["cpu_per_event_ns"] for r in runs],
        "requests_all": [r.get("requests") for r in runs],
        "process_cpu_s_total_median": median([r["process_cpu_s_total"] for r in runs]),
        "checked": [r.get("read_back") or {"distinct_payloads": r.get("distinct_payloads")} for r in runs],
        "run_details": runs,
    }


def rounds(benchmark: BenchmarkFixture, peers: dict[str, Any], run_one: Any) -> dict[str, list[dict[str, Any]]]:
    """Every peer once per round, the order reversed each round."""
    runs: dict[str, list[dict[str, Any]]] = {peer: [] for peer in peers}
    order = list(peers)

    def one_round() -> None:
        for peer in order:
            runs[peer].append(run_one(peer, peers[peer]))
        order.reverse()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    return runs


@pytest.mark.bench
def test_e2e_produce(benchmark: BenchmarkFixture, kinesalite: Kinesalite, child_env: dict[str, str]) -> None:
    benchmark.group = "e2e"
    endpoint = kinesalite.endpoint_url
    streams = iter(range(1_000_000))
    peers = installed(PRODUCERS)

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as state:
        env = {**child_env, "XDG_DATA_HOME": state}  # the Producer's dead-letter queue stays here

        def run_one(peer: str, arg: str) -> dict[str, Any]:
            stream = f"e2e-{arg.replace('_', '-')}-{next(streams)}"
            create_stream(endpoint, stream, SHARDS)
            result = run_child(arg, endpoint, stream, env)
            result["read_back"] = back = count_stream(endpoint, stream)
            delete_stream(endpoint, stream)
            assert back["distinct_payloads"] == EVENTS, (peer, back)
            return result

        runs = rounds(benchmark, peers, run_one)

    benchmark.extra_info.update(
        interleaved=True,
        rounds=ROUNDS,
        events=EVENTS,
        shards=SHARDS,
        missing=sorted(set(PRODUCERS) - set(peers)),
        peers={peer: summary(results) for peer, results in runs.items()},
    )


@pytest.mark.bench
def test_e2e_consume(benchmark: BenchmarkFixture, kinesalite: Kinesalite, child_env: dict[str, str]) -> None:
    benchmark.group = "e2e_consume"
    endpoint = kinesalite.endpoint_url
    peers = installed(CONSUMERS)
    stream = "e2e-consume"

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as state, MotoServer() as moto:
        env = {**child_env, "XDG_DATA_HOME": state}
        create_stream(endpoint, stream, SHARDS)
        run_child("treasure_engine", endpoint, stream, env)  # fill it once
        back = count_stream(endpoint, stream)
        assert back["distinct_payloads"] == EVENTS, back

        def run_one(peer: str, arg: str) -> dict[str, Any]:
            result = run_child(arg, endpoint, stream, env, "--dynamodb", moto.endpoint_url)
            assert result["distinct_payloads"] == EVENTS, (peer, result)
            return result

        try:
            runs = rounds(benchmark, peers, run_one)
        finally:
            delete_stream(endpoint, stream)

    benchmark.extra_info.update(
        interleaved=True,
        rounds=ROUNDS,
        events=EVENTS,
        shards=SHARDS,
        stream_read_back=back,
        missing=sorted(set(CONSUMERS) - set(peers)),
        peers={peer: summary(results) for peer, results in runs.items()},
    )


# Group "e2e_sweep" (reported, no target): treasure_engine alone, the same burst with other event sizes and key
# counts, each point as many events as keep it near 50 MB or 200,000 events. (axis, bytes, keys, events)
SWEEP = (
    ("size", 16, 1_000, 200_000),
    ("size", 100, 1_000, 200_000),
    ("size", 1_000, 1_000, 50_000),
    ("size", 4_000, 1_000, 12_500),
    ("keys", 100, 1, 200_000),
    ("keys", 100, 100_000, 200_000),
)


@pytest.mark.bench
def test_e2e_sweep(benchmark: BenchmarkFixture, kinesalite: Kinesalite, child_env: dict[str, str]) -> None:
    benchmark.group = "e2e_sweep"
    endpoint = kinesalite.endpoint_url
    streams = iter(range(1_000_000))
    points = {f"{size:,} B, {keys:,} keys": (axis, size, keys, n) for axis, size, keys, n in SWEEP}

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as state:
        env = {**child_env, "XDG_DATA_HOME": state}

        def run_one(point: str, spec: tuple[str, int, int, int]) -> dict[str, Any]:
            _, size, keys, n = spec
            stream = f"e2e-sweep-{next(streams)}"
            create_stream(endpoint, stream, SHARDS)
            cmd = [sys.executable, str(CHILD), "--peer", "treasure_engine", "--endpoint", endpoint, "--stream", stream]
            cmd += ["--events", str(n), "--data-bytes", str(size), "--keys", str(keys)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{point} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
            result["read_back"] = back = count_stream(endpoint, stream)
            delete_stream(endpoint, stream)
            assert back["distinct_payloads"] == n, (point, back)
            return result

        runs = rounds(benchmark, points, run_one)

    peers = {}
    for point, results in runs.items():
        axis, size, keys, n = points[point]
        figures = summary(results)
        figures.update(axis=axis, data_bytes=size, keys=keys, events=n)
        figures["mb_per_s_median"] = median([n * size / r["wall_s"] / 1e6 for r in results])
        peers[point] = figures
    benchmark.extra_info.update(interleaved=True, rounds=ROUNDS, shards=SHARDS, peers=peers)
