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

"e2e_sweep" (reported, no target): treasure_engine alone, the same burst with payloads of 16 B to 64 KiB (1,000
keys) and with 1 to 1,000,000 keys (100 B), each point at most 200,000 events or about 50 MB; events/s, MB/s
and process CPU per event per point. ``TREASURE_BENCH_SWEEP_ONLY`` keeps the points whose label holds it.

"e2e_consume_steady" (one run, about 35 s): the Consumer at its defaults reading a 4-shard stream that a
default Producer fills at 2,000 events/s, its DynamoDB calls counted by a proxy (bench/counting_proxy.py) in
a window of steady state (``TREASURE_BENCH_STEADY_S``, default 20, rounded up to a whole multiple of the
checkpoint interval and the renewal period). Target: DynamoDB writes per busy shard per second at most
1 / checkpoint_interval_s plus the lease renewals per second (3 / lease_duration_s).

``TREASURE_BENCH_E2E_ROUNDS`` (default 3) sets the rounds, e.g. 1 while developing. A contender whose library
is not installed is left out (and reported by run.py as not measured).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.emulators import Kinesalite, MotoServer, create_stream, delete_stream
from tests.support.kinesis_reader import count_stream

from counting_proxy import READS, CountingProxy
from treasure_engine import ConsumerConfig

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
@pytest.mark.timeout(900)  # several minutes on a loaded 2-core machine; pyproject's 300 s is for tests
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
KiB = 1024
SWEEP = (
    ("size", 16, 1_000, 200_000),
    ("size", 100, 1_000, 200_000),
    ("size", 1_000, 1_000, 50_000),
    ("size", 4 * KiB, 1_000, 12_800),
    ("size", 16 * KiB, 1_000, 3_200),
    ("size", 64 * KiB, 1_000, 800),
    ("keys", 100, 1, 200_000),
    ("keys", 100, 10, 200_000),
    ("keys", 100, 1_000, 200_000),  # the same run as ("size", 100): measured once, shown on both axes
    ("keys", 100, 100_000, 200_000),
    ("keys", 100, 1_000_000, 200_000),  # 200,000 events: every key distinct, each used once
)
SWEEP_ONLY = os.environ.get("TREASURE_BENCH_SWEEP_ONLY")  # e.g. "64 KiB" or "1,000,000 keys": matching points


@pytest.mark.bench
@pytest.mark.timeout(900)  # several minutes on a loaded 2-core machine; pyproject's 300 s is for tests
def test_e2e_sweep(benchmark: BenchmarkFixture, kinesalite: Kinesalite, child_env: dict[str, str]) -> None:
    benchmark.group = "e2e_sweep"
    endpoint = kinesalite.endpoint_url
    streams = iter(range(1_000_000))
    points = {f"{size:,} B, {keys:,} keys": (axis, size, keys, n) for axis, size, keys, n in SWEEP}
    if SWEEP_ONLY:
        points = {label: spec for label, spec in points.items() if SWEEP_ONLY in label}

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


# Group "e2e_consume_steady": the Consumer at its defaults under a steady stream, its DynamoDB calls counted by a
# proxy between it and moto (bench/counting_proxy.py). The target: writes per busy shard per second at most
# 1 / checkpoint_interval_s plus the lease renewals (consumer.py renews every lease_duration_s / 3).
STEADY_RATE = 2_000.0  # events/s over the 4 shards: 500 per shard, within the default shard limits
STEADY_WINDOW_S = float(os.environ.get("TREASURE_BENCH_STEADY_S", "20"))  # at least; see steady_window
STEADY_WARMUP_S = 3.0  # from the first event pushed to the window's start: leases held, reads flowing
STEADY_TAIL_S = 1.0  # pushing goes on this long past the window's end
RENEWALS_PER_LEASE_DURATION = 3  # Consumer._lease_loop: renew_every = lease_duration_s / 3


def steady_window(periods: list[float], at_least: float) -> float:
    """The shortest whole multiple of every period (their least common multiple) that is >= ``at_least``.

    A process whose events come at least ``p`` apart puts at most ``k`` of them in any half-open window of
    length ``k * p``, whatever its phase: counting over such a window measures the rate without the one event
    too many that a window of any other length may catch at its edge. Falls back to ``at_least`` when the
    periods have no common multiple under 120 s (the check then counts that edge against the target)."""
    fractions = [Fraction(p).limit_denominator(1000) for p in periods]
    num = math.lcm(*(f.numerator for f in fractions))
    den = math.gcd(*(f.denominator for f in fractions))
    lcm = num / den
    if lcm > 120:
        return at_least
    return lcm * math.ceil(at_least / lcm - 1e-9)


def readline(proc: subprocess.Popen[str], key: str) -> dict[str, Any]:
    """The child's next JSON line on stdout, which must hold ``key``."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        got: dict[str, Any] = json.loads(line)
    except ValueError:
        got = {}
    if key not in got:
        proc.kill()
        raise RuntimeError(f"{CHILD.name}: expected a line with {key!r}, got {line!r} (exit {proc.wait()})")
    return got


@pytest.mark.bench
def test_e2e_consume_steady(benchmark: BenchmarkFixture, kinesalite: Kinesalite, child_env: dict[str, str]) -> None:
    benchmark.group = "e2e_consume_steady"
    endpoint = kinesalite.endpoint_url
    defaults = ConsumerConfig(stream="defaults", application="defaults")
    checkpoint_s = defaults.checkpoint_interval_s
    renew_s = defaults.lease_duration_s / RENEWALS_PER_LEASE_DURATION
    window_s = steady_window([checkpoint_s, renew_s], STEADY_WINDOW_S)
    seconds = STEADY_WARMUP_S + window_s + STEADY_TAIL_S
    events = int(STEADY_RATE * seconds)
    stream = "e2e-consume-steady"
    figures: dict[str, Any] = {}

    def one_run() -> None:
        with (
            tempfile.TemporaryDirectory(prefix="bench-e2e-") as state,
            tempfile.TemporaryFile("w+") as consumer_err,
            tempfile.TemporaryFile("w+") as producer_err,
            MotoServer() as moto,
            CountingProxy(moto.endpoint_url) as proxy,
        ):
            env = {**child_env, "XDG_DATA_HOME": state}
            create_stream(endpoint, stream, SHARDS)
            base = [sys.executable, str(CHILD), "--endpoint", endpoint, "--stream", stream]
            common = ["--events", str(events), "--rate", str(STEADY_RATE), "--seconds", str(seconds)]
            consumer = subprocess.Popen(
                [*base, "--peer", "consumer_steady", "--dynamodb", proxy.endpoint_url, "--shards", str(SHARDS),
                 *common],
                env=env, stdout=subprocess.PIPE, stderr=consumer_err, text=True,
            )  # fmt: skip
            producer = None
            try:
                readline(consumer, "ready")
                producer = subprocess.Popen(
                    [*base, "--peer", "producer_steady", *common],
                    env=env, stdout=subprocess.PIPE, stderr=producer_err, text=True,
                )  # fmt: skip
                t_push = readline(producer, "pushing")["pushing"]
                produced = readline(producer, "events")
                consumed = readline(consumer, "events")
                exits = (producer.wait(30), consumer.wait(60))
            except BaseException:
                for proc, err in ((consumer, consumer_err), (producer, producer_err)):
                    if proc is not None:
                        proc.kill()
                        proc.wait()
                        err.seek(0)
                        sys.stderr.write(err.read()[-5000:])
                raise
            finally:
                delete_stream(endpoint, stream)
                for proc in (consumer, producer):
                    if proc is not None and proc.stdout is not None:
                        proc.stdout.close()
            calls = proxy.calls()
        assert exits == (0, 0), exits
        assert consumed["distinct_payloads"] == events, consumed
        t0 = t_push + STEADY_WARMUP_S
        t1 = t0 + window_s
        figures.update(
            steady_figures(calls, consumed["calls"], t0, t1),
            produced={k: produced[k] for k in ("sent", "pushed_s", "requests", "wall_s")},
            consumer={k: consumed[k] for k in ("wall_s", "cpu_s", "cpu_per_event_ns", "distinct_payloads")},
            consumer_checkpoints=consumed["checkpoints"],
        )

    benchmark.pedantic(one_run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        peer="treasure_engine Consumer (defaults)",
        shards=SHARDS,
        rate_events_per_s=STEADY_RATE,
        events=events,
        pushed_s=seconds,
        warmup_s=STEADY_WARMUP_S,
        window_s=window_s,
        checkpoint_interval_s=checkpoint_s,
        lease_duration_s=defaults.lease_duration_s,
        renew_every_s=renew_s,
        batch_size=defaults.batch_size,
        target_writes_per_shard_per_s=1 / checkpoint_s + 1 / renew_s,
        **figures,
    )


def steady_figures(calls: list[Any], handled: dict[str, list[list[float]]], t0: float, t1: float) -> dict[str, Any]:
    """DynamoDB calls in the half-open window [t0, t1) by operation, kind and shard; the busy shards (a handler
    call within the window's first and last 2 s); writes per busy shard per second."""
    window = t1 - t0
    inside = [c for c in calls if t0 <= c.t < t1]
    busy = sorted(
        shard
        for shard, batches in handled.items()
        if any(t0 <= t < t0 + 2 for t, _ in batches) and any(t1 - 2 <= t < t1 for t, _ in batches)
    )
    ops: dict[str, int] = {}
    kinds: dict[str, int] = {}
    per_shard: dict[str, dict[str, int]] = {}
    unattributed = 0
    for c in inside:
        ops[c.op] = ops.get(c.op, 0) + 1
        if c.write:
            kind = c.kind or c.op
            kinds[kind] = kinds.get(kind, 0) + 1
            if c.shard is None:
                unattributed += 1
            else:
                shard = per_shard.setdefault(c.shard, {})
                shard[kind] = shard.get(kind, 0) + 1
    # The shortest gap between a shard's consecutive writes of one kind, as they reached the proxy: the Consumer
    # keeps its periods on its own clock, so a gap below the period (by more than a request's delivery jitter)
    # would be a write too many, whatever the window's phase.
    times: dict[tuple[str, str], list[float]] = {}
    for c in inside:
        if c.write and c.shard is not None:
            times.setdefault((c.kind or c.op, c.shard), []).append(c.t)
    shortest: dict[str, float] = {}
    for (kind, _), ts in times.items():
        gaps = [b - a for a, b in itertools.pairwise(sorted(ts))]
        if gaps:
            shortest[kind] = min(shortest.get(kind, math.inf), min(gaps))
    writes = sum(1 for c in inside if c.write)
    reads = sum(1 for c in inside if c.op in READS)
    busiest = max((sum(k.values()) for s, k in per_shard.items() if s in busy), default=0)
    n = max(len(busy), 1)
    return {
        "busy_shards": busy,
        "records_in_window": {s: sum(r for t, r in b if t0 <= t < t1) for s, b in handled.items()},
        "calls_in_window": ops,
        "writes_in_window": writes,
        "reads_in_window": reads,
        "writes_by_kind": kinds,
        "writes_by_shard": per_shard,
        "writes_unattributed": unattributed,
        "shortest_gap_s_by_kind": shortest,
        # The whole run's calls answered with an error (a DescribeTable before the new table exists is one).
        "errors_by_op": {
            op: sum(1 for c in calls if c.op == op and c.status >= 400)
            for op in {c.op for c in calls if c.status >= 400}
        },
        "writes_per_busy_shard_per_s": writes / n / window,
        # The busiest shard, plus an equal share of any write naming no shard: what the target is checked on.
        "writes_per_shard_per_s_worst": (busiest + unattributed / n) / window,
        "reads_per_busy_shard_per_s": reads / n / window,
        "checkpoints_per_shard_per_s": kinds.get("checkpoint", 0) / n / window,
        "renewals_per_lease_per_s": kinds.get("renew", 0) / n / window,
        "calls_total": len(calls),
    }
