"""Runs every benchmark and regenerates bench/RESULTS.md and the README's figures (``make bench`` calls this).

    .venv/bin/python bench/run.py [--skip-cargo] [--strict]
        [--only at_the_limits|e2e|e2e_consume_steady|e2e_sweep|submit|log_append]

1. ``pytest bench -m bench --benchmark-json=bench/.results/pytest-benchmark.json``: the groups "submit",
   "submit_durability", "aggregate", "memory" (the memory child runs inside the "memory" group) and
   "log_append", "breaker" and "breaker_async", "consume" and "consume_plain", "metrics_scrape" and
   "submit_monitored", "at_the_limits", and "e2e", "e2e_consume", "e2e_consume_steady" and "e2e_sweep"
   (bench/test_e2e.py; their children run inside the groups);
2. ``cargo bench -p treasure_core --bench batch -- --noplot``: the pure-Rust batcher on one core (its
   ``thrpt:`` lines are parsed);
3. computes the ratios of the same run, checks them against the targets of the issue (or reports them, where the
   issue asks for a figure without a target), records the machine, and rewrites bench/RESULTS.md (and, when
   matplotlib is importable, bench/results.png, and bench/submit.png, bench/e2e.png and bench/e2e_sweep.png,
   which RESULTS.md embeds). Every target in the table, and every section, names the command that produced it.

``--only GROUP`` runs one group alone, prints its section and targets and writes them to
bench/.results/GROUP.md (its plots beside it), leaving RESULTS.md and the README as they are:
``at_the_limits`` (bench/test_limits.py, and criterion's ``batcher/aggregate_4_shards`` only, which its targets
need); ``e2e`` (the whole of bench/test_e2e.py: groups "e2e", "e2e_consume", "e2e_consume_steady" and
"e2e_sweep"); ``e2e_consume_steady`` and ``e2e_sweep`` (one test of it each); ``submit`` (bench/test_submit.py);
``log_append`` (bench/test_log.py). Knobs for short runs while developing: ``TREASURE_BENCH_E2E_ROUNDS``,
``TREASURE_BENCH_STEADY_S``, ``TREASURE_BENCH_SWEEP_ONLY``, ``TREASURE_BENCH_LOG_ROUNDS``.

Exit status: 0 when everything was measured (a missed target is reported, not an error; ``--strict`` makes
it one), 1 when a benchmark could not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / ".results"
PYTEST_JSON = OUT / "pytest-benchmark.json"
CARGO_LOG = OUT / "cargo-bench.txt"
RESULTS = BENCH / "RESULTS.md"
README = ROOT / "README.md"
README_BEGIN = "<!-- bench:targets:begin (written by `make bench`; do not edit) -->"
README_END = "<!-- bench:targets:end -->"
PLOT = BENCH / "results.png"
MiB = 1024 * 1024

CARGO_CMD = ["cargo", "bench", "-p", "treasure_core", "--bench", "batch", "--", "--noplot"]
CRITERION_BATCHER = "batcher/aggregate_4_shards"

# Targets of the issue.
SUBMIT_MAX_RATIO = 2.0  # submit per event <= 2x SimpleQueue.put
SUBMIT_MANY_MAX_RATIO = 0.5  # submit_many per event <= 0.5x SimpleQueue.put
SUBMIT_MAX_FLOOR_RATIO = 2.5  # submit per event <= 2.5x a no-op PyO3 method of the same signature (the FFI floor)
BATCHER_MIN_EVENTS_PER_S = 5_000_000.0  # one core, pure Rust
BATCHER_MIN_RATIO = 30.0  # x aws-kinesis-agg
RSS_HEADROOM = 64 * MiB  # peak RSS < ring + 64 MiB
LOG_MAX_RAW_RATIO = 1.15  # segment log round <= 1.15x a raw write + fdatasync of as many bytes (paired median)
BREAKER_SYNC_MAX_NS = 150.0  # @breaker overhead over the bare call, sync, per call (median)
BREAKER_ASYNC_MAX_NS = 300.0  # the same for an async def awaited
BREAKER_MIN_RATIO = 10.0  # >= 10x less overhead than the fastest of pybreaker, aiobreaker, circuitbreaker, purgatory
CONSUME_MIN_EVENTS_PER_S = 2_000_000.0  # parse_get_records + lanes(4) on a KPL page, from Python (median)
CONSUME_MIN_RATIO = 10.0  # x json.loads + aws_kinesis_agg.deaggregate_records on the same page (medians)
SCRAPE_MAX_S = 1e-3  # full snapshot + /metrics exposition, 64 shards and 10 breakers (median)
MONITORED_MAX_RATIO = 1.10  # submit while monitored / submit alone (medians): "within noise"
LIMITS_CPU_MAX_RATIO = 1.3  # at_the_limits: process CPU per event, default shard limits / raised (medians)
WAL_SUBMIT_MAX_RATIO = 4.0  # submit with the WAL (fsync interval) per event <= 4x durability="memory" (medians)
WAL_SUBMIT_MANY_MAX_RATIO = 2.0  # the same for submit_many: <= 2x
LIMITS_MAX_REQUESTS = 250  # at_the_limits: PutRecords requests of a default-limits run (every run)
LIMITS_BATCHER_MAX_RATIO = 2.0  # at_the_limits: batcher-thread CPU per event, raised limits / criterion's
E2E_MIN_CPU_RATIO = 15.0  # e2e: async-kinesis's process CPU per event / treasure_engine's (medians)
E2E_MAX_WALL_RATIO = 1.25  # e2e: treasure_engine's wall / the emulator ceiling's (medians)
E2E_CONSUME_MIN_CPU_RATIO = 5.0  # e2e_consume: the boto3 loop's process CPU per event / the Consumer's (medians)
# e2e_consume_steady: DynamoDB writes per busy shard per second <= 1 / checkpoint_interval_s + renewals per second
# per lease; both from ConsumerConfig's defaults, as bench/test_e2e.py records them with the counts.
# group -> (peers as in bench/test_breaker.py, the bare call, ours, ours as a context manager)
BREAKER_PEERS = {
    "breaker": (
        ["bare call", "treasure_engine @breaker", "treasure_engine with", "pybreaker", "circuitbreaker", "purgatory"],
        "bare call",
        "treasure_engine @breaker",
        "treasure_engine with",
    ),
    "breaker_async": (
        ["bare await", "treasure_engine @breaker (async)", "treasure_engine async with", "aiobreaker",
         "circuitbreaker", "purgatory"],
        "bare await",
        "treasure_engine @breaker (async)",
        "treasure_engine async with",
    ),
}  # fmt: skip

PEER_PUT = "queue.SimpleQueue.put"
# Reference only: put() of a tuple built before the loop; no real caller has its events pre-packed like that.
PEER_PUT_PREBUILT = "queue.SimpleQueue.put (pre-built tuple)"
PEER_SUBMIT = "Pipeline.submit"
PEER_SUBMIT_MANY = "Pipeline.submit_many"
# A no-op PyO3 method with Pipeline.submit's signature (rust/py/src/bench_floor.rs): the floor of the call itself.
PEER_FLOOR = "_core._NoopSubmit.submit (FFI floor)"
SUBMIT_PEERS = (PEER_PUT, PEER_SUBMIT, PEER_SUBMIT_MANY, PEER_PUT_PREBUILT, PEER_FLOOR)  # group "submit", in order
SUBMIT_PLOT = "submit.png"
PEER_SEAL = "treasure_engine.seal_offline"
PEER_AGG = "aws_kinesis_agg.RecordAggregator"
PEER_LOG = "SegmentLog (fsync interval 100 ms)"
PEER_LOG_MANY = "SegmentLog.append_many (batches of 500, fsync interval 100 ms)"
PEER_SQLITE = "sqlite3 (WAL, one transaction per 100 ms)"
PEER_SQLITE_MANY = "sqlite3 executemany per interval (WAL, one transaction per 100 ms)"
LOG_PEERS = (PEER_LOG, PEER_LOG_MANY)
PEER_CONSUME = "treasure_engine.parse_get_records + lanes(4)"
PEER_DEAGGREGATE = "json.loads + aws_kinesis_agg.deaggregate_records"
READS_DATA = " (handler reads data)"
# Groups "consume" (a page of 100 KPL aggregates of 100 records; the targets) and "consume_plain" (10,000 plain
# records; reported): (ours, the peer it is compared with), as in bench/test_consume.py.
CONSUME_PAIRS = ((PEER_CONSUME, PEER_DEAGGREGATE), (PEER_CONSUME + READS_DATA, PEER_DEAGGREGATE + READS_DATA))
SQLITE_PEERS = (PEER_SQLITE, PEER_SQLITE_MANY)
# Not a log: the same bytes written to a plain file and fdatasynced, the disk's yardstick in the same round.
PEER_RAW = "raw file: write + fdatasync of as many bytes (disk reference)"
LOG_GROUP_PEERS = (*LOG_PEERS, *SQLITE_PEERS, PEER_RAW)  # group "log_append", in table order
# Groups "metrics_scrape" and "submit_monitored", as in bench/test_metrics.py.
PEER_SCRAPE = "Monitor.metrics_text (snapshot + exposition)"
PEER_SCRAPE_REFERENCE = "prometheus_client.generate_latest (same snapshot)"
PEER_ALONE = "Pipeline.submit"
PEER_MONITORED = "Pipeline.submit (monitored: rules + /metrics every 250 ms)"
PEER_STRESSED = "Pipeline.submit (/metrics every 10 ms, stress)"
PEER_ALONE_AGAIN = "Pipeline.submit (again, after the others)"
PEER_SUBMIT_MEMORY = "Pipeline.submit (memory)"
PEER_SUBMIT_WAL = "Pipeline.submit (wal, fsync interval 100 ms)"
PEER_SUBMIT_WAL_NEVER = "Pipeline.submit (wal, fsync never)"
PEER_SUBMIT_MANY_MEMORY = "Pipeline.submit_many (memory)"
PEER_SUBMIT_MANY_WAL = "Pipeline.submit_many (wal, fsync interval 100 ms)"
# Group "at_the_limits", as in bench/test_limits.py.
LIMITS_GROUP = "at_the_limits"
PEER_DEFAULT_LIMITS = "default limits"
PEER_RAISED_LIMITS = "raised limits"
BATCHER_THREAD = "treasure-batche"  # "treasure-batcher" as the kernel names it (15 characters)
# Groups "e2e" and "e2e_consume", as in bench/test_e2e.py.
E2E_GROUP = "e2e"
E2E_CONSUME_GROUP = "e2e_consume"
PEER_E2E_TE = "treasure_engine"
PEER_E2E_ASYNC_KINESIS = "async-kinesis (KPL aggregation)"
PEER_E2E_AIOKPL = "aiokpl"
PEER_E2E_BOTO3 = "boto3 + aws-kinesis-agg (4 threads)"
PEER_E2E_CEILING = "emulator ceiling (pre-aggregated, aiohttp)"
E2E_PEERS = (PEER_E2E_TE, PEER_E2E_ASYNC_KINESIS, PEER_E2E_AIOKPL, PEER_E2E_BOTO3, PEER_E2E_CEILING)
PEER_E2E_CONSUMER = "treasure_engine Consumer"
PEER_E2E_BOTO3_LOOP = "boto3 GetRecords loop + aws-kinesis-agg"
E2E_CONSUME_PEERS = (PEER_E2E_CONSUMER, PEER_E2E_BOTO3_LOOP)
E2E_PLOT = "e2e.png"
E2E_SWEEP_GROUP = "e2e_sweep"
E2E_SWEEP_PLOT = "e2e_sweep.png"
STEADY_GROUP = "e2e_consume_steady"
# Which file each group's benchmark lives in, for the command shown beside its figures.
GROUP_FILES = {
    "submit": "bench/test_submit.py",
    "submit_durability": "bench/test_wal.py",
    "aggregate": "bench/test_batcher.py",
    "memory": "bench/test_memory.py",
    "log_append": "bench/test_log.py",
    "breaker": "bench/test_breaker.py",
    "breaker_async": "bench/test_breaker.py",
    "consume": "bench/test_consume.py",
    "consume_plain": "bench/test_consume.py",
    "metrics_scrape": "bench/test_metrics.py",
    "submit_monitored": "bench/test_metrics.py",
    LIMITS_GROUP: "bench/test_limits.py",
    E2E_GROUP: "bench/test_e2e.py",
    E2E_CONSUME_GROUP: "bench/test_e2e.py",
    E2E_SWEEP_GROUP: "bench/test_e2e.py",
    STEADY_GROUP: "bench/test_e2e.py",
    "criterion": "rust/core/benches/batch.rs",
}
# Group "submit_durability": each peer with the durability="memory" peer its per-event time is divided by.
DURABILITY_PEERS = {
    PEER_SUBMIT_MEMORY: None,
    PEER_SUBMIT_WAL: PEER_SUBMIT_MEMORY,
    PEER_SUBMIT_WAL_NEVER: PEER_SUBMIT_MEMORY,
    PEER_SUBMIT_MANY_MEMORY: None,
    PEER_SUBMIT_MANY_WAL: PEER_SUBMIT_MANY_MEMORY,
}
# The WAL's cost the issue asks to see (reported, no target): (call, WAL peer, memory peer).
WAL_RATIOS = (
    (PEER_SUBMIT, PEER_SUBMIT_WAL, PEER_SUBMIT_MEMORY, WAL_SUBMIT_MAX_RATIO),
    (PEER_SUBMIT_MANY, PEER_SUBMIT_MANY_WAL, PEER_SUBMIT_MANY_MEMORY, WAL_SUBMIT_MANY_MAX_RATIO),
)


@dataclass
class Check:
    name: str
    measured: str
    target: str
    ok: bool | None  # None: not measured, or `reported`
    reported: bool = False  # a figure the issue asks to see, without a target: never passes or fails
    command: str = ""  # what produced the figure (set from its group by `tag`)


def only_key(group: str) -> str | None:
    """The `--only` choice that runs ``group`` (and prints its figures), if there is one."""
    if group in ONLY_GROUPS:
        return group
    if group in (E2E_GROUP, E2E_CONSUME_GROUP):
        return E2E_GROUP
    return None


def command(group: str) -> str:
    """The command that produced a group's figures: `make bench` always; and the one that runs it alone."""
    if group == "criterion":
        return f"`make bench` (`{' '.join(CARGO_CMD)}`)"
    alone = only_key(group)
    if alone is not None:
        return f"`make bench`, or alone: `.venv/bin/python bench/run.py --only {alone}`"
    return f"`make bench` (its part: `pytest {GROUP_FILES.get(group, 'bench')} -m bench`)"


def tag(checks: list[Check], group: str) -> list[Check]:
    """Marks ``checks`` as produced by ``group``'s command (unless already marked)."""
    for c in checks:
        c.command = c.command or command(group)
    return checks


def with_command(section: str, group: str) -> str:
    """``section`` with the command that produced its figures under its heading."""
    heading, sep, rest = section.partition("\n\n")
    return f"{heading}{sep}Command: {command(group)}.\n\n{rest}" if sep else f"{section}\n\nCommand: {command(group)}."


# --- running --------------------------------------------------------------------------------------------


def run_pytest(extra: list[str], paths: tuple[str, ...] = ("bench",), json_path: Path = PYTEST_JSON) -> int:
    cmd = [sys.executable, "-m", "pytest", *paths, "-m", "bench", f"--benchmark-json={json_path}", "-q"]
    cmd += ["--benchmark-columns=min,median,mean,stddev,rounds", *extra]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False, text=True, capture_output=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def run_cargo(timeout: float, filters: tuple[str, ...] = (), log: Path = CARGO_LOG) -> tuple[int, str]:
    """``cargo bench`` of the batcher; ``filters``: only the criterion benches whose ids match."""
    if shutil.which("cargo") is None:
        return 127, "cargo not found"
    cmd = [*CARGO_CMD, *filters]
    print("$", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, check=False, text=True, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\ncargo bench timed out after {timeout:.0f}s"
    out = proc.stdout + proc.stderr
    log.write_text(out)
    sys.stdout.write(proc.stdout)
    return proc.returncode, out


_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3}
_THRPT = re.compile(
    r"thrpt:\s+\[\s*([\d.]+)\s+(K|M|G|Ki|Mi|Gi)?(elem|B)/s\s+([\d.]+)\s+(K|M|G|Ki|Mi|Gi)?(elem|B)/s"
    r"\s+([\d.]+)\s+(K|M|G|Ki|Mi|Gi)?(elem|B)/s\s*\]"
)
_BENCH_ID = re.compile(r"^([A-Za-z0-9_./-]+)(?:\s+time:|\s*$)")


def parse_criterion(output: str) -> dict[str, dict[str, Any]]:
    """``{bench id: {"low", "estimate", "high", "unit"}}`` from criterion's ``thrpt:`` lines (per second)."""
    results: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in output.splitlines():
        m = _BENCH_ID.match(line)
        if m and "/" in m.group(1) and not line.startswith(("Benchmarking", "Gnuplot")):
            current = m.group(1)
        t = _THRPT.search(line)
        if t and current is not None and current not in results:
            values = [float(t.group(i)) * _UNITS[t.group(i + 1) or ""] for i in (1, 4, 7)]
            results[current] = {
                "low": values[0],
                "estimate": values[1],
                "high": values[2],
                "unit": "elem/s" if t.group(3) == "elem" else "B/s",
            }
    return results


# --- machine --------------------------------------------------------------------------------------------


def _cmd(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, check=False, text=True, capture_output=True).stdout.strip()
    except OSError:
        return "unavailable"


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        import treasure_engine

        version = treasure_engine.__version__
    except ImportError:
        version = "not importable"
    commit = _cmd("git", "rev-parse", "--short", "HEAD")
    dirty = " (working tree modified)" if _cmd("git", "status", "--porcelain", "--", "python", "rust") else ""
    return {
        "date (UTC)": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu,
        "cores (usable / online)": f"{usable} / {os.cpu_count()}",
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "rustc": _cmd("rustc", "--version") or "unavailable",
        "treasure_engine": f"{version}, commit {commit}{dirty}",
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


# --- analysis -------------------------------------------------------------------------------------------


def by_peer(data: dict[str, Any], group: str, key: str = "peer") -> dict[str, dict[str, Any]]:
    """The group's benchmarks by peer. A benchmark that measured its peers side by side (``interleaved``,
    one round of each peer per benchmark round) stands for each of them, with that peer's figures."""
    found: dict[str, dict[str, Any]] = {}
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if b.get("group") != group:
            continue
        if e.get("interleaved") and "peers" in e:
            for peer, figures in e["peers"].items():
                found[peer] = {
                    **b,
                    "extra_info": {**figures, key: peer},
                    "stats": {**b["stats"], "rounds": e["rounds"]},
                }
        elif key in e:
            found[e[key]] = b
    return found


def fmt_ns(x: float) -> str:
    return f"{x:,.1f} ns"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:,.2f} M events/s" if x >= 1e6 else f"{x / 1e3:,.0f} k events/s"


def fmt_mib(x: float) -> str:
    return f"{x / MiB:,.1f} MiB"


def fmt_ms(x: float) -> str:
    return f"{x * 1e3:,.1f} ms"


def verdict(c: Check) -> str:
    if c.ok is None:
        return "reported" if c.reported else "not measured"
    return "**pass**" if c.ok else "**FAIL**"


def analyse(data: dict[str, Any], criterion: dict[str, dict[str, Any]]) -> tuple[list[Check], list[str]]:
    checks: list[Check] = []
    sections: list[str] = []

    submit_checks, submit_section = analyse_submit(data)
    checks += tag(submit_checks, "submit")
    sections.append(with_command(submit_section, "submit"))

    durability_checks, durability_section = analyse_durability(data)
    checks += tag(durability_checks, "submit_durability")
    sections.append(with_command(durability_section, "submit_durability"))

    # aggregate
    first_aggregate_check = len(checks)
    agg = by_peer(data, "aggregate")
    rust = criterion.get(CRITERION_BATCHER)
    agg_peer = agg.get(PEER_AGG)
    agg_rate = agg_peer["extra_info"]["events_per_s_median"] if agg_peer else None
    rows = ["| what | events/s (median) | events/s (best round) | ratio to aws-kinesis-agg (median) |",
            "|---|---:|---:|---:|"]  # fmt: skip
    for peer in (PEER_SEAL, PEER_AGG):
        b = agg.get(peer)
        if b is None:
            rows.append(f"| `{peer}` (Python) | not measured | | |")
            continue
        rate, best = b["extra_info"]["events_per_s_median"], b["extra_info"]["events_per_s_max"]
        ratio = f"{rate / agg_rate:.1f}x" if agg_rate else "-"
        rows.append(f"| `{peer}` (from Python) | {fmt_rate(rate)} | {fmt_rate(best)} | {ratio} |")
    if rust is not None:
        ratio = f"{rust['estimate'] / agg_rate:.1f}x" if agg_rate else "-"
        rows.append(
            f"| criterion `{CRITERION_BATCHER}` (pure Rust, one core) | {fmt_rate(rust['estimate'])} "
            f"| [{fmt_rate(rust['low'])} .. {fmt_rate(rust['high'])}] (95% CI) | {ratio} |"
        )
    else:
        rows.append(f"| criterion `{CRITERION_BATCHER}` (pure Rust, one core) | not measured | | |")
    section = (
        "## aggregate: routing + KPL aggregation + request sealing, no network\n\n"
        "100-byte events, 10,000 keys, 4 shards, 51,200-byte aggregates. aws-kinesis-agg aggregates only "
        "(no routing, no request bodies).\n\n" + "\n".join(rows)
    )
    sections.append(with_command(with_command(section, "criterion"), "aggregate"))
    if rust is None:
        checks.append(Check("batcher, one core (criterion)", "-", ">= 5,000,000 events/s", None))
        checks.append(Check("batcher (criterion) vs aws-kinesis-agg", "-", f">= {BATCHER_MIN_RATIO:.0f}x", None))
    else:
        checks.append(
            Check(
                "batcher, one core (criterion, estimate)",
                fmt_rate(rust["estimate"]),
                f">= {fmt_rate(BATCHER_MIN_EVENTS_PER_S)}",
                rust["estimate"] >= BATCHER_MIN_EVENTS_PER_S,
            )
        )
        if agg_rate:
            ratio = rust["estimate"] / agg_rate
            checks.append(
                Check(
                    "batcher (criterion) vs aws-kinesis-agg (Python, median)",
                    f"{ratio:.1f}x",
                    f">= {BATCHER_MIN_RATIO:.0f}x",
                    ratio >= BATCHER_MIN_RATIO,
                )
            )
        else:
            checks.append(Check("batcher (criterion) vs aws-kinesis-agg", "-", f">= {BATCHER_MIN_RATIO:.0f}x", None))
    tag(checks[first_aggregate_check : first_aggregate_check + 1], "criterion")
    tag(checks[first_aggregate_check + 1 :], "aggregate")
    other = {k: v for k, v in criterion.items() if k != CRITERION_BATCHER}
    if other:
        rows = ["| criterion bench | throughput (estimate) | 95% CI |", "|---|---:|---:|"]
        for name, r in other.items():
            if r["unit"] == "elem/s":
                rows.append(f"| `{name}` | {fmt_rate(r['estimate'])} | {fmt_rate(r['low'])} .. {fmt_rate(r['high'])} |")
            else:
                rows.append(
                    f"| `{name}` | {r['estimate'] / 1024**3:,.2f} GiB/s "
                    f"| {r['low'] / 1024**3:,.2f} .. {r['high'] / 1024**3:,.2f} GiB/s |"
                )
        sections.append(
            with_command("### Other criterion figures of `--bench batch`\n\n" + "\n".join(rows), "criterion")
        )

    # memory
    first_memory_check = len(checks)
    mem = by_peer(data, "memory", key="case")
    base, stalled = mem.get("baseline"), mem.get("stalled-10M")
    rows = ["| case | peak RSS (VmHWM) | RSS before close | peak incl. close | accepted / offered | "
            "ring used | batcher buffered |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for case, b in (("baseline", base), ("stalled-10M", stalled)):
        if b is None:
            rows.append(f"| {case} | not measured | | | | | |")
            continue
        e = b["extra_info"]
        rows.append(
            f"| {case} | {fmt_mib(e['peak_rss'])} | {fmt_mib(e['rss_before_close'])} "
            f"| {fmt_mib(e['peak_rss_incl_close'])} | {e['accepted']:,} / {e['offered']:,} "
            f"| {fmt_mib(e['ring_bytes_used'])} | {fmt_mib(e['buffered_bytes'])} |"
        )
    notes = ""
    if stalled is not None:
        e = stalled["extra_info"]
        after = e.get("after_close", {})
        notes = (
            f"\n\nStalled run: {e['refused']:,} of {e['offered']:,} events refused (ring full), "
            f"{e['submit_s']:.2f} s to offer them; close(timeout=0.5) took {e['close_s']:.2f} s and "
            f"dead-lettered {e['dead_lettered']:,} events; after close: accepted {after.get('accepted', 0):,}, "
            f"delivered {after.get('delivered', 0):,}, dead-lettered {after.get('dead_lettered', 0):,}, "
            f"in flight {after.get('in_flight', 0):,}. `ru_maxrss` of the child: {fmt_mib(e['ru_maxrss'])} "
            "(Linux carries it over exec from the forked parent, hence VmHWM)."
        )
    sections.append(
        with_command(
            "## memory: a producer whose endpoint has stalled\n\n"
            "ring_bytes = 64 MiB, overflow='reject', 10,000,000 100-byte events offered with `submit_many`; the "
            "endpoint (kinesalite behind the tests' fault proxy) answers ListShards and never answers PutRecords. "
            "Each case is a child process.\n\n" + "\n".join(rows) + notes,
            "memory",
        )
    )
    if stalled is None:
        checks.append(Check("peak RSS, stalled endpoint", "-", "< ring + 64 MiB", None))
    else:
        e = stalled["extra_info"]
        limit = e["ring_bytes"] + RSS_HEADROOM
        checks.append(
            Check(
                "peak RSS, stalled endpoint (whole process)",
                fmt_mib(e["peak_rss"]),
                f"< ring + 64 MiB = {fmt_mib(limit)}",
                e["peak_rss"] < limit,
            )
        )
        if base is not None:
            growth = e["peak_rss"] - base["extra_info"]["peak_rss"]
            checks.append(
                Check(
                    "peak RSS growth over the baseline producer",
                    f"{fmt_mib(growth)} (baseline {fmt_mib(base['extra_info']['peak_rss'])})",
                    f"< ring + 64 MiB = {fmt_mib(limit)}",
                    growth < limit,
                )
            )

    tag(checks[first_memory_check:], "memory")

    log_checks, log_section = analyse_log(data)
    checks += tag(log_checks, "log_append")
    sections.append(with_command(log_section, "log_append"))

    for group, kind, max_ns in (
        ("breaker", "sync", BREAKER_SYNC_MAX_NS),
        ("breaker_async", "async", BREAKER_ASYNC_MAX_NS),
    ):
        breaker_checks, breaker_section = analyse_breaker(data, group, kind, max_ns)
        checks += tag(breaker_checks, group)
        sections.append(with_command(breaker_section, group))

    consume_checks, consume_section = analyse_consume(data)
    checks += tag(consume_checks, "consume")
    sections.append(with_command(consume_section, "consume"))

    metrics_checks, metrics_section = analyse_metrics(data)
    checks += tag(metrics_checks, "metrics_scrape")
    sections.append(with_command(metrics_section, "metrics_scrape"))

    limits_checks, limits_section = analyse_limits(data, criterion)
    checks += tag(limits_checks, LIMITS_GROUP)
    sections.append(with_command(limits_section, LIMITS_GROUP))

    e2e_checks, e2e_section = analyse_e2e(data, criterion)
    checks += e2e_checks
    sections.append(e2e_section)
    return checks, sections


def analyse_submit(data: dict[str, Any], plot_dir: Path = BENCH) -> tuple[list[Check], str]:
    """Group "submit": per-event cost of the hand-off against SimpleQueue.put and against the FFI floor (a no-op
    PyO3 method of the same signature), each ratio taken round by round, then the median; and its plot."""
    sub = by_peer(data, "submit")
    rows = ["| peer | per event, median | per event, min | ratio to put (median) | ratio to put (min) "
            "| ratio to put (paired rounds, median) | ratio to the FFI floor (paired rounds, median) | rounds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    put = sub.get(PEER_PUT)
    for peer in SUBMIT_PEERS:
        b = sub.get(peer)
        if b is None:
            rows.append(f"| `{peer}` | not measured | | | | | | |")
            continue
        med, mn = b["extra_info"]["per_event_ns_median"], b["extra_info"]["per_event_ns_min"]
        r_med = med / put["extra_info"]["per_event_ns_median"] if put else float("nan")
        r_min = mn / put["extra_info"]["per_event_ns_min"] if put else float("nan")
        paired = b["extra_info"].get("ratio_to_put_paired_median")
        floor = b["extra_info"].get("ratio_to_floor_paired_median")
        rows.append(
            f"| `{peer}` | {fmt_ns(med)} | {fmt_ns(mn)} | {r_med:.2f}x | {r_min:.2f}x "
            f"| {'-' if paired is None else f'{paired:.2f}x'} | {'-' if floor is None else f'{floor:.2f}x'} "
            f"| {b['stats']['rounds']} |"
        )
    section = (
        "## submit: per-event cost on the calling thread\n\n"
        "Every benchmark round runs one round of each peer (10,000 events), in a rotating order, each from a "
        "drained pipeline; the targets use the ratios taken round by round, then the median. The FFI floor, "
        f"`{PEER_FLOOR}`, is a PyO3 method with `Pipeline.submit`'s signature that does nothing with its "
        "arguments (rust/py/src/bench_floor.rs): what any call from Python into Rust with these arguments costs, "
        "so `submit` over it is the cost of the work inside `submit`.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + plot_submit(sub, plot_dir / SUBMIT_PLOT)
    )
    checks: list[Check] = []
    for peer, limit in ((PEER_SUBMIT, SUBMIT_MAX_RATIO), (PEER_SUBMIT_MANY, SUBMIT_MANY_MAX_RATIO)):
        b = sub.get(peer)
        if b is None or put is None:
            checks.append(Check(f"`{peer}` per event vs `{PEER_PUT}`", "-", f"<= {limit}x", None))
            continue
        paired = b["extra_info"].get("ratio_to_put_paired_median")
        ratio = paired or b["extra_info"]["per_event_ns_median"] / put["extra_info"]["per_event_ns_median"]
        checks.append(
            Check(
                f"`{peer}` per event vs `{PEER_PUT}` ({'median of paired rounds' if paired else 'medians'})",
                f"{ratio:.2f}x ({fmt_ns(b['extra_info']['per_event_ns_median'])} vs "
                f"{fmt_ns(put['extra_info']['per_event_ns_median'])})",
                f"<= {limit}x",
                ratio <= limit,
            )
        )
    b, floor_b = sub.get(PEER_SUBMIT), sub.get(PEER_FLOOR)
    name = f"`{PEER_SUBMIT}` per event vs the FFI floor, `{PEER_FLOOR}` (median of paired rounds)"
    target = f"<= {SUBMIT_MAX_FLOOR_RATIO}x"
    if b is None or floor_b is None or b["extra_info"].get("ratio_to_floor_paired_median") is None:
        checks.append(Check(name, "-", target, None))
    else:
        ratio = b["extra_info"]["ratio_to_floor_paired_median"]
        measured = (
            f"{ratio:.2f}x ({fmt_ns(b['extra_info']['per_event_ns_median'])} vs "
            f"{fmt_ns(floor_b['extra_info']['per_event_ns_median'])})"
        )
        checks.append(Check(name, measured, target, ratio <= SUBMIT_MAX_FLOOR_RATIO))
    return checks, section


def plot_submit(sub: dict[str, dict[str, Any]], path: Path) -> str:
    """Per-event cost of submit and its peers (medians), with the FFI floor and put marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot: skipped (matplotlib is not installed)."
    names = [p for p in SUBMIT_PEERS if p in sub]
    if not names:
        return "Plot: none (nothing measured)."
    values = [sub[p]["extra_info"]["per_event_ns_median"] for p in names]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    colors = ["tab:green" if p.startswith("Pipeline") else "tab:gray" for p in names]
    bars = ax.bar([p.replace(" (", "\n(") for p in names], values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values], fontsize=8)
    # The submit targets as lines: the floor and put, each times its allowed ratio.
    for peer, limit, label in ((PEER_FLOOR, SUBMIT_MAX_FLOOR_RATIO, "FFI floor"), (PEER_PUT, SUBMIT_MAX_RATIO, "put")):
        if peer in sub:
            y = sub[peer]["extra_info"]["per_event_ns_median"] * limit
            ax.axhline(y, linestyle=":", color="tab:red", linewidth=0.8)
            ax.annotate(f"submit's target: {limit}x {label}", (len(names) - 0.5, y), fontsize=7, color="tab:red",
                        ha="right", va="bottom")  # fmt: skip
    ax.set_ylabel("ns per event (median of rounds)")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(
        "submit against its peers: 10,000 events per round, peers interleaved (bench/run.py --only submit)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![submit per event against its peers]({path.name})"


def analyse_durability(data: dict[str, Any]) -> tuple[list[Check], str]:
    """Group "submit_durability": the WAL's cost on submit, per event, as a ratio to durability="memory"."""
    dur = by_peer(data, "submit_durability")
    rows = ["| peer | per event, median | per event, min | WAL / memory (median) | WAL / memory (min) | "
            "write syscalls per round (median) | WAL bytes per event | rounds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for peer, base_peer in DURABILITY_PEERS.items():
        b = dur.get(peer)
        if b is None:
            rows.append(f"| `{peer}` | not measured | | | | | | |")
            continue
        e = b["extra_info"]
        base = dur.get(base_peer) if base_peer else None
        r_med = f"{e['per_event_ns_median'] / base['extra_info']['per_event_ns_median']:.2f}x" if base else "-"
        r_min = f"{e['per_event_ns_min'] / base['extra_info']['per_event_ns_min']:.2f}x" if base else "-"
        wal_bytes = f"{e['wal_bytes_per_event']:,.1f} B" if e.get("wal_bytes_per_event") else "-"
        rows.append(
            f"| `{peer}` | {fmt_ns(e['per_event_ns_median'])} | {fmt_ns(e['per_event_ns_min'])} | {r_med} | {r_min} "
            f"| {e['write_syscalls_per_round_median']:,.0f} | {wal_bytes} | {b['stats']['rounds']} |"
        )
    notes = ""
    wals = [b["extra_info"] for b in dur.values() if b["extra_info"].get("wal_disk_bytes") is not None]
    if wals:
        notes = (
            f"\n\n{wals[0]['events_per_round']:,} events per round into a started pipeline (64 MiB ring, 4 shards, "
            f"requests completed by a thread), WAL on {wals[0]['filesystem']}; its segments on disk after a peer's "
            f"last round: at most {fmt_mib(max(e['wal_disk_bytes'] for e in wals))} (allocated 64 MiB at a time, "
            "whole segments deleted once acknowledged; the next segment, prepared ahead, not counted). Write "
            "syscalls: those of the whole process during a round (`/proc/self/io`), background threads included."
        )
    never, interval = dur.get(PEER_SUBMIT_WAL_NEVER), dur.get(PEER_SUBMIT_WAL)
    if never is not None and interval is not None:
        diff = interval["extra_info"]["per_event_ns_median"] - never["extra_info"]["per_event_ns_median"]
        notes += (
            f" `fsync interval 100 ms` minus `fsync never`, per event (medians): {diff:,.1f} ns, what the "
            "background msyncs cost `submit` (within the noise when small)."
        )
    section = (
        "## submit_durability: the WAL's cost on submit\n\n"
        "The same 10,000 events per round, `submit` per event or one `submit_many`, without a WAL "
        '(`durability="memory"`) and with one (`wal_dir`: every event is encoded into its frame in the WAL\'s '
        "mapped, preallocated segment, the page cache, before `submit` returns; no system call).\n\n"
        + "\n".join(rows)
        + notes
    )
    checks: list[Check] = []
    for call, wal_peer, memory_peer, limit in WAL_RATIOS:
        name = f'`{call}` with a WAL (fsync interval 100 ms) vs durability="memory", per event (medians)'
        w, m = dur.get(wal_peer), dur.get(memory_peer)
        if w is None or m is None:
            checks.append(Check(name, "-", f"<= {limit}x", None))
            continue
        w_ns, m_ns = w["extra_info"]["per_event_ns_median"], m["extra_info"]["per_event_ns_median"]
        measured = f"{w_ns / m_ns:.2f}x ({fmt_ns(w_ns)} vs {fmt_ns(m_ns)})"
        checks.append(Check(name, measured, f"<= {limit}x", w_ns / m_ns <= limit))
    return checks, section


def analyse_log(data: dict[str, Any]) -> tuple[list[Check], str]:
    """Group "log_append": the segment log against the faster SQLite peer, every peer a round per benchmark round
    (side by side), the ratio taken round by round, then the median; the raw-file peer measures the disk."""
    logs = by_peer(data, "log_append")
    group_info = next(
        (b.get("extra_info", {}) for b in data.get("benchmarks", []) if b.get("group") == "log_append"), {}
    )
    strongest = group_info.get("faster_sqlite_peer")
    rows = ["| peer | round, median | round, min | throughput (median) | loop / finish / close (medians) | "
            "transactions per round | on disk | this / raw file (paired rounds, median) "
            "| faster SQLite peer / this (paired rounds, median) | rounds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for peer in LOG_GROUP_PEERS:
        b = logs.get(peer)
        if b is None:
            rows.append(f"| `{peer}` | not measured | | | | | | | | |")
            continue
        e = b["extra_info"]
        txns = "/".join(str(t) for t in e["transactions_per_round"]) if e.get("transactions_per_round") else "-"
        over_raw = "-" if e.get("this_over_raw_paired_median") is None else f"{e['this_over_raw_paired_median']:.2f}x"
        rows.append(
            f"| `{peer}` | {fmt_ms(e['round_s_median'])} | {fmt_ms(e['round_s_min'])} "
            f"| {fmt_rate(e['entries_per_s_median'])} "
            f"| {fmt_ms(e['loop_s_median'])} / {fmt_ms(e['finish_s_median'])} / {fmt_ms(e['close_s_median'])} "
            f"| {txns} | {fmt_mib(e['disk_bytes'])} "
            f"| {over_raw} "
            f"| {e['faster_sqlite_over_this_paired_median']:.2f}x "
            f"| {b['stats']['rounds']} |"
        )
    notes = ""
    if group_info:
        notes = (
            f"\n\n{group_info['entries']:,} entries ({fmt_mib(group_info['payload_bytes'])} of payload) per round, "
            f"into a fresh directory on {group_info['filesystem']}; every round ends durable (fsynced) and closed. One "
            "benchmark round runs a round of every peer, in a rotating order, so that all meet the same state of "
            "the disk. Loop: the appends or inserts (the executemany peer only collects there, and inserts once "
            "per transaction; the raw-file peer writes its 256 KiB chunks); finish: `commit()` + `sync()`, "
            "SQLite's last transaction (not fsynced with `synchronous=NORMAL`), or the raw file's `fdatasync`; "
            "close: for SQLite, the checkpoint that makes the data durable. SQLite "
            f"{group_info['sqlite_version']}: `{'; '.join(group_info['sqlite_pragmas'])}`."
        )
    raw = logs.get(PEER_RAW)
    if raw is not None:
        notes += (
            f" The raw-file peer is not a log: it writes as many bytes as the segment log's file and fdatasyncs "
            f"them, so the faster SQLite peer's round over its round "
            f"({raw['extra_info']['faster_sqlite_over_this_paired_median']:.2f}x here) is about the most any "
            "store that writes each byte once could reach against SQLite on this disk in this run."
        )
    section = (
        "## log_append: durable appends, segment log vs SQLite (WAL)\n\n"
        "Dead-letter entries of 200-400 bytes, the same list for each peer; fsync interval / transaction "
        "interval 100 ms.\n\n" + "\n".join(rows) + notes
    )
    log = logs.get(PEER_LOG)
    checks: list[Check] = []
    # The target: the log against the disk, measured in the same rounds.
    name = (
        f"segment log vs the disk: `{PEER_LOG}` round / a raw write + fdatasync of as many bytes "
        "(median of paired rounds)"
    )
    target = f"<= {LOG_MAX_RAW_RATIO}x"
    over_raw = None if log is None else log["extra_info"].get("this_over_raw_paired_median")
    if log is None or raw is None or over_raw is None:
        checks.append(Check(name, "-", target, None))
    else:
        measured = (
            f"{over_raw:.2f}x ({fmt_ms(log['extra_info']['round_s_median'])} vs "
            f"{fmt_ms(raw['extra_info']['round_s_median'])} median rounds)"
        )
        checks.append(Check(name, measured, target, over_raw <= LOG_MAX_RAW_RATIO))
    # Reported: the SQLite ratio (the earlier target), and how far the disk itself would let any log go.
    name = f"segment log append vs SQLite WAL (`{PEER_LOG}` vs the faster SQLite peer, median of paired rounds)"
    if log is None or strongest is None:
        checks.append(Check(name, "-", "none (reported)", None, reported=True))
        return checks, section
    e = log["extra_info"]
    ratio = e["faster_sqlite_over_this_paired_median"]
    checks.append(
        Check(
            name,
            f"{ratio:.1f}x ({fmt_ms(e['round_s_median'])} vs {fmt_ms(logs[strongest]['extra_info']['round_s_median'])}"
            f" median rounds, `{strongest}`)",
            "none (reported)",
            None,
            reported=True,
        )
    )
    if raw is not None:
        r = raw["extra_info"]
        checks.append(
            Check(
                "the disk's own bound in the same run: the faster SQLite peer over a raw write + fdatasync of "
                "as many bytes (median of paired rounds)",
                f"{r['faster_sqlite_over_this_paired_median']:.1f}x (raw file {fmt_ms(r['round_s_median'])}, "
                f"segment log {fmt_ms(e['round_s_median'])} median rounds)",
                "none (reported)",
                None,
                reported=True,
            )
        )
    return checks, section


def analyse_breaker(data: dict[str, Any], group: str, kind: str, max_ns: float) -> tuple[list[Check], str]:
    """Groups "breaker" / "breaker_async": per-call overhead over the bare call of the same round (every peer
    runs a round per benchmark round, side by side), medians over rounds."""
    peers, bare_name, ours_name, ours_with = BREAKER_PEERS[group]
    measured = by_peer(data, group)
    found = {peer: b["extra_info"] for peer, b in measured.items()}
    rounds = next((b["stats"]["rounds"] for b in measured.values()), 0)

    def overhead(peer: str) -> float | None:
        e = found.get(peer)
        return None if e is None else e.get("overhead_ns_paired_median")

    rows = ["| peer | per call, median | per call, min | overhead over the bare call (paired, median) | rounds |",
            "|---|---:|---:|---:|---:|"]  # fmt: skip
    for peer in peers:
        e = found.get(peer)
        if e is None:
            rows.append(f"| `{peer}` | not measured | | | |")
            continue
        o = overhead(peer)
        rows.append(
            f"| `{peer}` | {fmt_ns(e['per_call_ns_median'])} | {fmt_ns(e['per_call_ns_min'])} "
            f"| {'-' if o is None or peer == bare_name else fmt_ns(o)} | {rounds} |"
        )
    section = (
        f"## {group}: a guarded successful call ({kind}), treasure_engine vs the Python breakers\n\n"
        "10,000 calls of a trivial function per peer and round; every benchmark round runs one round of each "
        "peer, in a rotating order, so all meet the same noise. Overhead: per-call time minus the bare call's "
        "in the same round, median over rounds.\n\n" + "\n".join(rows)
    )
    ours = overhead(ours_name)
    libraries = [p for p in peers if p not in (bare_name, ours_name, ours_with)]
    peer_overheads = {p: o for p in libraries if (o := overhead(p)) is not None}
    name = f"`{ours_name}` overhead ({kind}, median of paired rounds)"
    if ours is None:
        checks = [Check(name, "-", f"<= {max_ns:.0f} ns", None)]
    else:
        checks = [Check(name, fmt_ns(ours), f"<= {max_ns:.0f} ns", ours <= max_ns)]
    name = f"`{ours_name}` overhead vs the fastest Python breaker ({kind})"
    if ours is None or not peer_overheads:
        checks.append(Check(name, "-", f">= {BREAKER_MIN_RATIO:.0f}x less", None))
    else:
        fastest = min(peer_overheads, key=peer_overheads.__getitem__)
        ratio = peer_overheads[fastest] / max(ours, 1.0)
        checks.append(
            Check(
                name,
                f"{ratio:.1f}x less ({fmt_ns(ours)} vs {fmt_ns(peer_overheads[fastest])}, `{fastest}`)",
                f">= {BREAKER_MIN_RATIO:.0f}x less",
                ratio >= BREAKER_MIN_RATIO,
            )
        )
    return checks, section


def analyse_consume(data: dict[str, Any]) -> tuple[list[Check], str]:
    """Groups "consume" and "consume_plain": user records/s out of one GetRecords page, ours against
    json.loads + aws-kinesis-agg, medians of the same run."""
    rows = ["| page | peer | events/s (median) | events/s (best round) | ours / peer (medians) | rounds |",
            "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    rates: dict[tuple[str, str], float] = {}
    notes = []
    for group, page in (("consume", "100 KPL aggregates x 100"), ("consume_plain", "10,000 plain records")):
        found = by_peer(data, group)
        for ours, peer in CONSUME_PAIRS:
            for name in (ours, peer):
                b = found.get(name)
                if b is None:
                    rows.append(f"| {page} | `{name}` | not measured | | | |")
                    continue
                e = b["extra_info"]
                rates[group, name] = e["events_per_s_median"]
                ratio = "-"
                if name == ours and found.get(peer) is not None:
                    ratio = f"{e['events_per_s_median'] / found[peer]['extra_info']['events_per_s_median']:.1f}x"
                rows.append(
                    f"| {page} | `{name}` | {fmt_rate(e['events_per_s_median'])} | {fmt_rate(e['events_per_s_max'])} "
                    f"| {ratio} | {b['stats']['rounds']} |"
                )
        first = next(iter(found.values()), None)
        if first is not None:
            e = first["extra_info"]
            notes.append(f"{page}: {e['kinesis_records']:,} Kinesis records, {e['body_bytes'] / 1e6:,.2f} MB of JSON")
    section = (
        "## consume: user records out of one GetRecords response, no network\n\n"
        "10,000 user records of about 100 bytes of JSON per page, keys from 1,000. Ours: `parse_get_records`, "
        "`lanes(4)`, a no-op handler per lane. Peer: `json.loads`, the records put in the Lambda shape, "
        "aws-kinesis-agg's `deaggregate_records`, the handler once (no lanes). The handler reads no payload, "
        "except in the rows marked so.\n\n" + "\n".join(rows) + ("\n\n" + "; ".join(notes) + "." if notes else "")
    )
    ours_rate = rates.get(("consume", PEER_CONSUME))
    peer_rate = rates.get(("consume", PEER_DEAGGREGATE))
    name = f"`{PEER_CONSUME}`, KPL page, from Python (median)"
    if ours_rate is None:
        checks = [Check(name, "-", f">= {fmt_rate(CONSUME_MIN_EVENTS_PER_S)}", None)]
    else:
        checks = [
            Check(name, fmt_rate(ours_rate), f">= {fmt_rate(CONSUME_MIN_EVENTS_PER_S)}",
                  ours_rate >= CONSUME_MIN_EVENTS_PER_S)
        ]  # fmt: skip
    name = f"`{PEER_CONSUME}` vs `{PEER_DEAGGREGATE}`, KPL page (medians)"
    if ours_rate is None or peer_rate is None:
        checks.append(Check(name, "-", f">= {CONSUME_MIN_RATIO:.0f}x", None))
    else:
        times = ours_rate / peer_rate
        checks.append(
            Check(name, f"{times:.1f}x ({fmt_rate(ours_rate)} vs {fmt_rate(peer_rate)})",
                  f">= {CONSUME_MIN_RATIO:.0f}x", times >= CONSUME_MIN_RATIO)
        )  # fmt: skip
    ours_plain = rates.get(("consume_plain", PEER_CONSUME))
    peer_plain = rates.get(("consume_plain", PEER_DEAGGREGATE))
    name = f"`{PEER_CONSUME}` vs `{PEER_DEAGGREGATE}`, page of plain records (medians)"
    if ours_plain is None or peer_plain is None:
        checks.append(Check(name, "-", "none (reported)", None, reported=True))
    else:
        measured = f"{ours_plain / peer_plain:.1f}x ({fmt_rate(ours_plain)} vs {fmt_rate(peer_plain)})"
        checks.append(Check(name, measured, "none (reported)", None, reported=True))
    return checks, section


def analyse_metrics(data: dict[str, Any]) -> tuple[list[Check], str]:
    """Groups "metrics_scrape" (snapshot + exposition against prometheus_client on the same snapshot) and
    "submit_monitored" (submit while the monitor evaluates and renders /metrics, against submit alone)."""

    def fmt_us(x: float) -> str:
        return f"{x * 1e6:,.0f} µs"

    scrape = by_peer(data, "metrics_scrape")
    rows = ["| peer | per scrape, median | per scrape, min | series | lines | body | rounds |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for peer in (PEER_SCRAPE, PEER_SCRAPE_REFERENCE):
        b = scrape.get(peer)
        if b is None:
            rows.append(f"| `{peer}` | not measured | | | | | |")
            continue
        e = b["extra_info"]
        rows.append(
            f"| `{peer}` | {fmt_us(b['stats']['median'])} | {fmt_us(b['stats']['min'])} | {e['series']:,} "
            f"| {e['lines']:,} | {e['body_bytes'] / 1024:,.1f} KiB | {b['stats']['rounds']} |"
        )
    ours, reference = scrape.get(PEER_SCRAPE), scrape.get(PEER_SCRAPE_REFERENCE)
    note = ""
    if ours is not None:
        e = ours["extra_info"]
        note = f"\n\n{e['shards']} shards, {e['breakers']} breakers, one producer and one dead-letter queue watched."
        if reference is not None:
            times = reference["stats"]["median"] / ours["stats"]["median"]
            note += f" prometheus_client / ours (medians): {times:.1f}x."
    submit = by_peer(data, "submit_monitored")
    alone = submit.get(PEER_ALONE)
    base = alone["extra_info"]["per_event_ns_median"] if alone else None
    rows2 = ["| peer | per event, median | per event, min | ratio to submit alone (median) | scrapes | rounds |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for peer in (PEER_ALONE, PEER_MONITORED, PEER_STRESSED, PEER_ALONE_AGAIN):
        b = submit.get(peer)
        if b is None:
            rows2.append(f"| `{peer}` | not measured | | | | |")
            continue
        e = b["extra_info"]
        ratio = f"{e['per_event_ns_median'] / base:.2f}x" if base else "-"
        rows2.append(
            f"| `{peer}` | {fmt_ns(e['per_event_ns_median'])} | {fmt_ns(e['per_event_ns_min'])} | {ratio} "
            f"| {e['scrapes']:,} | {b['stats']['rounds']} |"
        )
    section = (
        "## metrics_scrape, submit_monitored: what the monitor costs\n\n"
        "One full snapshot plus its Prometheus text exposition (the /metrics body, no HTTP):\n\n"
        + "\n".join(rows)
        + note
        + "\n\n`Pipeline.submit` per event alone, and while a thread evaluates the rules and renders /metrics "
        "(the completer records each request into the registry meanwhile); the baseline runs again last, to show "
        "the run-to-run spread:\n\n" + "\n".join(rows2)
    )
    checks: list[Check] = []
    name = "full snapshot + /metrics exposition, 64 shards and 10 breakers (median)"
    if ours is None:
        checks.append(Check(name, "-", f"< {fmt_us(SCRAPE_MAX_S)}", None))
    else:
        median = ours["stats"]["median"]
        measured = f"{fmt_us(median)}"
        if reference is not None:
            measured += f" (prometheus_client.generate_latest: {fmt_us(reference['stats']['median'])})"
        checks.append(Check(name, measured, f"< {fmt_us(SCRAPE_MAX_S)}", median < SCRAPE_MAX_S))
    name = f"`{PEER_MONITORED}` vs `{PEER_ALONE}`, per event (medians)"
    monitored, again = submit.get(PEER_MONITORED), submit.get(PEER_ALONE_AGAIN)
    if monitored is None or base is None:
        checks.append(Check(name, "-", f"<= {MONITORED_MAX_RATIO:.2f}x (within noise)", None))
    else:
        ratio = monitored["extra_info"]["per_event_ns_median"] / base
        spread = 1.0
        if again is not None:
            a = again["extra_info"]["per_event_ns_median"] / base
            spread = max(a, 1 / a)
        limit = max(MONITORED_MAX_RATIO, spread)
        checks.append(
            Check(
                name,
                f"{ratio:.2f}x ({fmt_ns(monitored['extra_info']['per_event_ns_median'])} vs {fmt_ns(base)}; "
                f"the baseline's own spread: {spread:.2f}x)",
                f"<= {MONITORED_MAX_RATIO:.2f}x, or the baseline's spread if larger (within noise)",
                ratio <= limit,
            )
        )
    return checks, section


def analyse_limits(data: dict[str, Any], criterion: dict[str, dict[str, Any]]) -> tuple[list[Check], str]:
    """Group "at_the_limits": one burst of 200,000 events through a real producer (default config, kinesalite),
    default shard limits against raised ones: process and per-thread CPU per event, requests sent."""
    found = by_peer(data, LIMITS_GROUP)
    rust = criterion.get(CRITERION_BATCHER)
    rust_ns = 1e9 / rust["estimate"] if rust else None

    def fmt_all(values: list[float], fmt: Any) -> str:
        return ", ".join(fmt(v) for v in values)

    rows = ["| variant | wall (median) | process CPU per event (median; each run) | batcher thread per event "
            "(median; each run) | main thread (asyncio loop) per event | requests (each run) | Kinesis records "
            "per request | events per request | read back: user records / distinct payloads | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    notes: list[str] = []
    for peer in (PEER_DEFAULT_LIMITS, PEER_RAISED_LIMITS):
        b = found.get(peer)
        if b is None:
            rows.append(f"| {peer} | not measured | | | | | | | | |")
            continue
        e = b["extra_info"]
        threads = e["thread_cpu_per_event_ns_median"]
        back = e["read_back"]
        users = "; ".join(f"{r['user_records']:,} / {r['distinct_payloads']:,}" for r in back)
        rows.append(
            f"| {peer} | {e['wall_s_median']:,.2f} s | {fmt_ns(e['cpu_per_event_ns_median'])} "
            f"({fmt_all(e['cpu_per_event_ns_all'], fmt_ns)}) | {fmt_ns(e['batcher_cpu_per_event_ns_median'])} "
            f"({fmt_all(e['batcher_cpu_per_event_ns_all'], fmt_ns)}) "
            f"| {fmt_ns(threads.get('main (asyncio loop)', float('nan')))} "
            f"| {', '.join(f'{r:,}' for r in e['requests_all'])} | {e['records_per_request_median']:,.1f} "
            f"| {e['events_per_request_median']:,.0f} | {users} | {e['runs']} |"
        )
        others = {k: v for k, v in threads.items() if k not in (BATCHER_THREAD, "main (asyncio loop)")}
        other = ", ".join(f"{name} {fmt_ns(ns)}" for name, ns in others.items()) or "none"
        notes.append(
            f"{peer}: other threads per event (medians): {other}; throttled {e['throttled_max']:,}, retried "
            f"{e['retried_max']:,} (most in a run); whole process incl. start-up, imports and close: "
            f"{e['process_cpu_s_total_median']:,.2f} s CPU (median)."
        )
    default, raised = found.get(PEER_DEFAULT_LIMITS), found.get(PEER_RAISED_LIMITS)
    if rust_ns is not None:
        notes.append(f"Criterion `{CRITERION_BATCHER}` (pure Rust, one core): {fmt_ns(rust_ns)} per event.")
    section = (
        "## at_the_limits: a new user's burst against Kinesis, at the default shard limits\n\n"
        "The default `ProducerConfig` against kinesalite (127.0.0.1), a fresh 4-shard stream per run: 200,000 "
        "events of 100 bytes, keys from 1,000, `submit_many` in lists of 1,000, then `await flush()`. Default "
        "limits: 1,000 records/s and 1 MiB/s per shard (they bind); raised: `shard_records_per_s=1e6, "
        "shard_bytes_per_s=1e9`. Each run is a fresh child process, the variants alternating; CPU over the "
        "first `submit_many` to the end of `flush` (`getrusage` for the process, `/proc/self/task/*/schedstat` "
        "per thread). Every payload is read back from the stream.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes)
    )

    checks: list[Check] = []
    name = "at_the_limits: process CPU per event, default shard limits vs raised (medians)"
    target = f"<= {LIMITS_CPU_MAX_RATIO}x"
    if default is None or raised is None:
        checks.append(Check(name, "-", target, None))
    else:
        d_ns = default["extra_info"]["cpu_per_event_ns_median"]
        r_ns = raised["extra_info"]["cpu_per_event_ns_median"]
        ratio = d_ns / r_ns
        checks.append(
            Check(name, f"{ratio:.2f}x ({fmt_ns(d_ns)} vs {fmt_ns(r_ns)})", target, ratio <= LIMITS_CPU_MAX_RATIO)
        )
    name = "at_the_limits: PutRecords requests of a default-limits run (200,000 events; the most of any run)"
    target = f"<= {LIMITS_MAX_REQUESTS}"
    if default is None:
        checks.append(Check(name, "-", target, None))
    else:
        e = default["extra_info"]
        most = e["requests_max"]
        checks.append(
            Check(name, f"{most:,} ({e['records_per_request_median']:,.1f} Kinesis records per request, median)",
                  target, most <= LIMITS_MAX_REQUESTS)
        )  # fmt: skip
    name = f"at_the_limits: batcher-thread CPU per event, raised limits (median) vs criterion `{CRITERION_BATCHER}`"
    target = f"<= {LIMITS_BATCHER_MAX_RATIO:.0f}x"
    b_ns = raised["extra_info"]["batcher_cpu_per_event_ns_median"] if raised else math.nan
    if rust_ns is None or math.isnan(b_ns):  # NaN: no thread named treasure-batcher was seen
        checks.append(Check(name, "-", target, None))
    else:
        ratio = b_ns / rust_ns
        checks.append(
            Check(
                name, f"{ratio:.1f}x ({fmt_ns(b_ns)} vs {fmt_ns(rust_ns)})", target, ratio <= LIMITS_BATCHER_MAX_RATIO
            )
        )
    return checks, section


def analyse_e2e(
    data: dict[str, Any], criterion: dict[str, dict[str, Any]], plot_dir: Path = BENCH
) -> tuple[list[Check], str]:
    """Groups "e2e" and "e2e_consume": 200,000 events into kinesalite and back out, each contender in its own
    child process beside its peers: wall, events/s, process CPU per event; and the plot ``plot_dir/e2e.png``."""
    del criterion  # no criterion figure is needed
    produce, consume = by_peer(data, E2E_GROUP), by_peer(data, E2E_CONSUME_GROUP)
    steady_checks, steady_section = analyse_steady(data)

    def table(found: dict[str, dict[str, Any]], peers: tuple[str, ...], ref: str, ref_name: str) -> list[str]:
        rows = [f"| contender | wall (median) | events/s (median) | process CPU per event (median; each run) "
                f"| CPU per event vs {ref_name} | requests (each run) | checked: distinct events (each run) | runs |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        ref_ns = found[ref]["extra_info"]["cpu_per_event_ns_median"] if ref in found else math.nan
        for peer in peers:
            b = found.get(peer)
            if b is None:
                rows.append(f"| {peer} | not measured (not installed, or the group did not run) | | | | | | |")
                continue
            e = b["extra_info"]
            cpu = e["cpu_per_event_ns_median"]
            each = ", ".join(fmt_ns(v) for v in e["cpu_per_event_ns_all"])
            reqs = ", ".join("-" if r is None else f"{r:,}" for r in e["requests_all"])
            checked = ", ".join(f"{c['distinct_payloads']:,}" for c in e["checked"])
            rows.append(
                f"| {peer} | {e['wall_s_median']:,.2f} s | {fmt_rate(e['events_per_s_median'])} | {fmt_ns(cpu)} "
                f"({each}) | {cpu / ref_ns:.2f}x | {reqs} | {checked} | {e['runs']} |"
            )
        return rows

    section = (
        "## e2e: 200,000 events into Kinesis, beside the producers a user would pick\n\n"
        f"Command: {command(E2E_GROUP)}.\n\n"
        "Kinesalite (127.0.0.1), a fresh 4-shard stream per run, 200,000 events of 100 bytes over 1,000 keys (built "
        "before the clock and `gc.freeze()`d), the shard limits raised for every contender. Each run is a fresh child "
        "process (bench/e2e_child.py), the contenders alternating; wall and process CPU (`getrusage`, user + sys) from "
        "the first event handed over to the last acknowledged. Every run's stream is read back with aws-kinesis-agg's "
        "protobuf and must hold the 200,000 distinct events. treasure_engine: `Producer` (`shard_records_per_s=1e6, "
        "shard_bytes_per_s=1e9`), `submit_many` by 1,000, `flush`. async-kinesis: "
        "`Producer(processor=KPLStringProcessor())`, its throttles raised, `put` per event, `flush` (its KPL processor "
        "takes no partition keys). aiokpl: `put_record` per event, `flush`, every outcome awaited, its rate limits "
        "raised. boto3: one aws-kinesis-agg `RecordAggregator`, PutRecords of up to 500 records / 5 MiB on 4 threads. "
        "Ceiling: the events aggregated per shard and sealed into PutRecords bodies of 10 aggregates (about 500 KB, "
        "kinesalite's fastest shape here) before the clock; the clock times only aiohttp posting them, 4 in flight.\n\n"
        + "\n".join(table(produce, E2E_PEERS, PEER_E2E_TE, "treasure_engine"))
        + "\n\n## e2e_consume: the same events read back, beside a boto3 loop\n\n"
        f"Command: {command(E2E_CONSUME_GROUP)}.\n\n"
        "One stream filled once by treasure_engine's producer, read from TRIM_HORIZON in every run: the "
        "`Consumer` (ConsumerConfig defaults, leases in moto's DynamoDB server, a fresh lease table per run, a "
        "no-op async handler) against a boto3 GetRecords loop (one thread per shard, Limit 10,000) with "
        "aws-kinesis-agg's `iter_deaggregate_records` to a no-op handler. Wall and process CPU from the "
        "consumer's start (client creation and, for the Consumer, its lease table included) to the last event "
        "handed to the handler; each run checks all 200,000 distinct events were handed over.\n\n"
        + "\n".join(table(consume, E2E_CONSUME_PEERS, PEER_E2E_CONSUMER, "the Consumer"))
        + "\n\n"
        + plot_e2e(produce, consume, plot_dir / E2E_PLOT)
        + "\n\n"
        + "\n\n"
        + steady_section
        + "\n\n"
        + with_command(sweep_section(by_peer(data, E2E_SWEEP_GROUP), plot_dir / E2E_SWEEP_PLOT), E2E_SWEEP_GROUP)
    )

    checks: list[Check] = []
    te, ak, ceiling = produce.get(PEER_E2E_TE), produce.get(PEER_E2E_ASYNC_KINESIS), produce.get(PEER_E2E_CEILING)
    name = "e2e: producer process CPU per event, async-kinesis / treasure_engine (medians, same run)"
    target = f">= {E2E_MIN_CPU_RATIO:.0f}x"
    if te is None or ak is None:
        checks.append(Check(name, "-", target, None))
    else:
        t_ns, a_ns = te["extra_info"]["cpu_per_event_ns_median"], ak["extra_info"]["cpu_per_event_ns_median"]
        ratio = a_ns / t_ns
        measured = f"{ratio:.1f}x ({fmt_ns(a_ns)} vs {fmt_ns(t_ns)})"
        checks.append(Check(name, measured, target, ratio >= E2E_MIN_CPU_RATIO))
    name = "e2e: treasure_engine wall / the emulator's ceiling (medians, same run)"
    target = f"<= {E2E_MAX_WALL_RATIO}x"
    if te is None or ceiling is None:
        checks.append(Check(name, "-", target, None))
    else:
        t_s, c_s = te["extra_info"]["wall_s_median"], ceiling["extra_info"]["wall_s_median"]
        ratio = t_s / c_s
        checks.append(Check(name, f"{ratio:.2f}x ({t_s:.2f} s vs {c_s:.2f} s)", target, ratio <= E2E_MAX_WALL_RATIO))
    ours, loop = consume.get(PEER_E2E_CONSUMER), consume.get(PEER_E2E_BOTO3_LOOP)
    name = "e2e_consume: process CPU per event, boto3 GetRecords loop / Consumer (medians, same run)"
    target = f">= {E2E_CONSUME_MIN_CPU_RATIO:.0f}x"
    if ours is None or loop is None:
        checks.append(Check(name, "-", target, None))
    else:
        o_ns, l_ns = ours["extra_info"]["cpu_per_event_ns_median"], loop["extra_info"]["cpu_per_event_ns_median"]
        ratio = l_ns / o_ns
        checks.append(
            Check(name, f"{ratio:.1f}x ({fmt_ns(l_ns)} vs {fmt_ns(o_ns)})", target, ratio >= E2E_CONSUME_MIN_CPU_RATIO)
        )
    tag(checks[:2], E2E_GROUP)
    tag(checks[2:], E2E_CONSUME_GROUP)
    return checks + steady_checks, section


def analyse_steady(data: dict[str, Any]) -> tuple[list[Check], str]:
    """Group "e2e_consume_steady": the Consumer at its defaults under a steady stream; its DynamoDB calls, counted
    by a proxy, per busy shard per second in a window of steady state, against 1 / checkpoint_interval_s plus the
    lease renewals per second."""
    b = next((b for b in data.get("benchmarks", []) if b.get("group") == STEADY_GROUP), None)
    name = (
        "e2e_consume_steady: DynamoDB writes per busy shard per second, Consumer at its defaults, steady "
        "2,000 events/s over 4 shards (counted by a proxy; the busiest shard)"
    )
    heading = "## e2e_consume_steady: the Consumer's DynamoDB calls in steady state, at its defaults\n\n"
    if b is None:
        check = Check(name, "-", "<= 1 / checkpoint_interval_s + renewals/s per lease", None)
        return tag([check], STEADY_GROUP), with_command(heading + "Not measured.", STEADY_GROUP)
    e = b["extra_info"]
    limit = e["target_writes_per_shard_per_s"]
    worst, mean = e["writes_per_shard_per_s_worst"], e["writes_per_busy_shard_per_s"]
    target = (
        f"<= 1/{e['checkpoint_interval_s']:g} s + 1/{e['renew_every_s']:.2f} s (renewals, lease_duration_s / 3) "
        f"= {limit:.2f}"
    )
    measured = (
        f"{worst:.2f} (mean over {len(e['busy_shards'])} busy shards {mean:.2f}: checkpoints "
        f"{e['checkpoints_per_shard_per_s']:.2f} + renewals {e['renewals_per_lease_per_s']:.2f}; reads "
        f"{e['reads_per_busy_shard_per_s']:.2f}/s)"
    )
    check = Check(name, measured, target, bool(e["busy_shards"]) and worst <= limit + 1e-9)
    rows = ["| shard | records handled in the window | writes (by kind) | writes per second |", "|---|---:|---|---:|"]
    for shard in sorted(set(e["records_in_window"]) | set(e["writes_by_shard"])):
        kinds = e["writes_by_shard"].get(shard, {})
        n = sum(kinds.values())
        busy = "" if shard in e["busy_shards"] else " (not busy)"
        rows.append(
            f"| {shard}{busy} | {e['records_in_window'].get(shard, 0):,} "
            f"| {n} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or '-'}) "
            f"| {n / e['window_s']:.2f} |"
        )
    calls = ", ".join(f"{op} {n}" for op, n in sorted(e["calls_in_window"].items())) or "none"
    gaps = ", ".join(f"{kind} {gap:.3f} s" for kind, gap in sorted(e.get("shortest_gap_s_by_kind", {}).items()))
    errors = ", ".join(f"{op} {n}" for op, n in sorted(e["errors_by_op"].items())) or "none"
    c = e["consumer"]
    section = (
        heading + "A default `Producer` pushes 2,000 events/s (100-byte payloads, 1,000 keys; `submit_many` of the "
        "events due every 10 ms) into a fresh 4-shard kinesalite stream, while a `Consumer` at its defaults reads "
        "it with a no-op handler, its leases in moto's DynamoDB server behind a counting HTTP proxy "
        "(bench/counting_proxy.py: every request forwarded unchanged and counted by `X-Amz-Target`, and by the "
        "shard its body names; writes are PutItem, UpdateItem, DeleteItem). ConsumerConfig defaults: "
        f"`checkpoint_interval_s={e['checkpoint_interval_s']:g}`, `lease_duration_s={e['lease_duration_s']:g}` "
        f"(the Consumer renews every lease_duration_s / 3 = {e['renew_every_s']:.2f} s), "
        f"`batch_size={e['batch_size']}`. The Consumer holds all 4 leases before the first event is pushed; "
        f"the counts cover [{e['warmup_s']:g} s, {e['warmup_s'] + e['window_s']:g} s) after it "
        f"({e['window_s']:g} s: a whole multiple of both periods, so a window of any phase holds at most "
        "window / period of each if the Consumer keeps to them), and pushing goes on past the window's end; a "
        "shard is busy when its handler ran in the window's first and last 2 s. "
        f"Calls in the window: {calls}; writes naming no shard: {e['writes_unattributed']}; the shortest gap "
        f"between a shard's consecutive writes of one kind, as they reached the proxy: {gaps or '-'} (the "
        "Consumer keeps its periods on its own clock; a request's delivery jitter moves these by milliseconds). "
        f"The whole run ({e['events']:,} events, {e['pushed_s']:g} s of pushing): {e['calls_total']:,} "
        f"DynamoDB calls, answered with an error: {errors} (a DescribeTable of the new table before it exists "
        f"is one); all {c['distinct_payloads']:,} events handed to the handler, process CPU "
        f"{c['cpu_s']:.2f} s ({fmt_ns(c['cpu_per_event_ns'])} per event, start-up and idle waits included).\n\n"
        + "\n".join(rows)
    )
    return tag([check], STEADY_GROUP), with_command(section, STEADY_GROUP)


def sweep_section(found: dict[str, dict[str, Any]], path: Path) -> str:
    """Group "e2e_sweep" (reported): treasure_engine's burst by event size and by key count, and its plot."""
    rows = ["| point | events | distinct keys used | wall (median) | events/s (median) | MB/s of payload (median) "
            "| process CPU per event (median) | process CPU per KiB of payload (median) | requests (each run) "
            "| runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    points = sorted(found.items(), key=lambda kv: (kv[1]["extra_info"]["keys"] != 1_000, kv[1]["extra_info"]["keys"],
                                                   kv[1]["extra_info"]["data_bytes"]))  # fmt: skip
    for point, b in points:
        e = b["extra_info"]
        reqs = ", ".join(f"{r:,}" for r in e["requests_all"])
        cpu = e["cpu_per_event_ns_median"]
        per_s = e["events_per_s_median"]
        rate = fmt_rate(per_s) if per_s >= 10_000 else f"{per_s:,.0f} events/s"
        rows.append(
            f"| {point} | {e['events']:,} | {min(e['keys'], e['events']):,} | {e['wall_s_median']:,.2f} s "
            f"| {rate} | {e['mb_per_s_median']:,.1f} | {fmt_ns(cpu)} "
            f"| {fmt_ns(cpu / (e['data_bytes'] / 1024))} | {reqs} | {e['runs']} |"
        )
    if not found:
        rows.append("| not measured | | | | | | | | | |")
    return (
        "## e2e_sweep: treasure_engine's burst by event size and key count (reported)\n\n"
        "The `e2e` burst through treasure_engine alone (kinesalite, 4 shards, shard limits raised, `submit_many` "
        "by 1,000, `flush`), with payloads of 16 B to 64 KiB over 1,000 keys, and 100-byte payloads over 1 to "
        "1,000,000 keys (event i has key (i * 7919) % keys; the 1,000,000-key point has 200,000 events, so every "
        "key is distinct and used once). Each point holds at most 200,000 events or about 50 MB (800 events of "
        "64 KiB), every run read back; wall and process CPU (`getrusage`) from the first `submit_many` to the end of "
        "`flush`.\n\n" + "\n".join(rows) + "\n\n" + plot_sweep(found, path)
    )


def plot_sweep(found: dict[str, dict[str, Any]], path: Path) -> str:
    """Throughput and process CPU per event, by event size and by key count (medians)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot: skipped (matplotlib is not installed)."
    if not found:
        return "Plot: none (nothing measured)."
    points = [b["extra_info"] for b in found.values()]
    by_size = sorted((p for p in points if p["keys"] == 1_000), key=lambda p: p["data_bytes"])
    by_keys = sorted((p for p in points if p["data_bytes"] == 100), key=lambda p: p["keys"])
    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(12, 7.5))
    x = [p["data_bytes"] for p in by_size]
    ax1.plot(x, [p["events_per_s_median"] / 1e3 for p in by_size], "o-", color="tab:green", label="k events/s")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("payload bytes (1,000 keys)")
    ax1.set_ylabel("k events/s (median)")
    twin = ax1.twinx()
    twin.plot(x, [p["mb_per_s_median"] for p in by_size], "s--", color="tab:blue", label="MB/s of payload")
    twin.set_ylabel("MB/s of payload (median)")
    ax1.set_title("throughput by event size", fontsize=10)
    lines = ax1.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax1.legend(lines, [str(line.get_label()) for line in lines], fontsize=8, loc="center left")
    ax3.plot(x, [p["cpu_per_event_ns_median"] / 1e3 for p in by_size], "o-", color="tab:red")
    ax3.set_xscale("log", base=2)
    ax3.set_yscale("log")
    ax3.set_xlabel("payload bytes (1,000 keys)")
    ax3.set_ylabel("process CPU per event, µs (median, log)")
    ax3.set_title("CPU per event by event size", fontsize=10)
    k = [p["keys"] for p in by_keys]
    ax2.plot(k, [p["events_per_s_median"] / 1e3 for p in by_keys], "o-", color="tab:green")
    ax2.set_xscale("log")
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("distinct partition keys (100-byte payloads, 200,000 events)")
    ax2.set_ylabel("k events/s (median)")
    ax2.set_title("throughput by key count", fontsize=10)
    ax4.plot(k, [p["cpu_per_event_ns_median"] / 1e3 for p in by_keys], "o-", color="tab:red")
    ax4.set_xscale("log")
    ax4.set_ylim(bottom=0)
    ax4.set_xlabel("distinct partition keys (100-byte payloads, 200,000 events)")
    ax4.set_ylabel("process CPU per event, µs (median)")
    ax4.set_title("CPU per event by key count", fontsize=10)
    fig.suptitle(
        "treasure_engine end to end into kinesalite (group e2e_sweep; bench/run.py --only e2e_sweep)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![treasure_engine throughput and CPU per event by event size and key count]({path.name})"


def plot_e2e(produce: dict[str, dict[str, Any]], consume: dict[str, dict[str, Any]], path: Path) -> str:
    """Process CPU per event end to end, producers and consumers against their peers (medians)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot: skipped (matplotlib is not installed)."
    if not produce and not consume:
        return "Plot: none (nothing measured)."
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [5, 2]})
    for ax, found, peers, title, log in (
        (axes[0], produce, E2E_PEERS, "producers: 200,000 events into kinesalite", True),
        (axes[1], consume, E2E_CONSUME_PEERS, "consumers: the same events read back", False),
    ):
        names = [p for p in peers if p in found]
        values = [found[p]["extra_info"]["cpu_per_event_ns_median"] / 1e3 for p in names]
        labels = [n.replace(" (", "\n(").replace(" + ", "\n+ ") for n in names]
        colors = ["tab:green" if n.startswith("treasure_engine") else "tab:gray" for n in names]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:,.2f}" for v in values], fontsize=8)
        if log:  # the producers span three orders of magnitude
            ax.set_yscale("log")
        ax.set_ylabel(f"process CPU per event, µs (median{', log scale' if log else ''})")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("End to end: process CPU per event (groups e2e and e2e_consume; bench/run.py --only e2e)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![process CPU per event end to end]({path.name})"


def plot(data: dict[str, Any]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plots: skipped (matplotlib is not installed)."
    sub = by_peer(data, "submit")
    agg = by_peer(data, "aggregate")
    logs = by_peer(data, "log_append")
    dur = by_peer(data, "submit_durability")
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(21, 4))
    names = [p for p in (PEER_PUT, PEER_SUBMIT, PEER_SUBMIT_MANY, PEER_FLOOR) if p in sub]
    ax1.bar(names, [sub[p]["extra_info"]["per_event_ns_median"] for p in names])
    ax1.set_ylabel("ns per event (median)")
    ax1.set_title("submit")
    names = [p for p in (PEER_SEAL, PEER_AGG) if p in agg]
    ax2.bar(names, [agg[p]["extra_info"]["events_per_s_median"] / 1e6 for p in names])
    ax2.set_ylabel("M events/s (median)")
    ax2.set_title("aggregate")
    names = [p for p in LOG_GROUP_PEERS if p in logs]
    ax3.bar(names, [logs[p]["extra_info"]["round_s_median"] * 1e3 for p in names])
    ax3.set_ylabel("ms per round (median)")
    ax3.set_title("log_append")
    names = [p for p in DURABILITY_PEERS if p in dur]
    ax4.bar(names, [dur[p]["extra_info"]["per_event_ns_median"] for p in names])
    ax4.set_ylabel("ns per event (median)")
    ax4.set_title("submit_durability")
    for ax in (ax1, ax2, ax3, ax4):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Component groups at a glance (make bench: submit, aggregate, log_append, submit_durability)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)
    return (
        "## The component groups at a glance\n\nCommand: `make bench` (groups submit, aggregate, log_append and "
        f"submit_durability, as in their sections above).\n\n![the component groups at a glance]({PLOT.name})"
    )


def targets_table(checks: list[Check]) -> list[str]:
    """The targets table, as RESULTS.md and the README both show it."""
    return [
        "| target | measured | required | verdict | command |",
        "|---|---|---|---|---|",
        *[f"| {c.name} | {c.measured} | {c.target} | {verdict(c)} | {c.command or '`make bench`'} |" for c in checks],
    ]


def write_readme(info: dict[str, str], checks: list[Check]) -> None:
    """Replaces the README's figures with this run's, so that no figure there is typed by hand."""
    text = README.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"README.md lacks the markers {README_BEGIN!r} ... {README_END!r}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = [
        README_BEGIN,
        f"From `make bench` on {info.get('date (UTC)', '?')} UTC ({info.get('cpu', '?')}, "
        f"{info.get('cores (usable / online)', '?')} cores); details in [bench/RESULTS.md](bench/RESULTS.md).",
        "",
        *targets_table(checks),
        README_END,
    ]
    README.write_text(head + "\n".join(block) + tail)


def write_results(
    info: dict[str, str], checks: list[Check], sections: list[str], problems: list[str], plot_line: str
) -> None:
    lines = [
        "# Benchmark results",
        "",
        "<!-- Generated by `make bench` (bench/run.py) from a fresh run. Do not edit by hand: rerun it. -->",
        "",
        "Generated by `make bench` (bench/run.py); never edited by hand. Ratios compare peers measured in the "
        "same run on the same machine; absolute figures depend on the machine and its load (this one is "
        "shared). See bench/README.md for what each benchmark measures.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        "## Targets",
        "",
        *targets_table(checks),
        "",
    ]
    if problems:
        lines += ["## Problems during the run", "", *[f"- {p}" for p in problems], ""]
    for s in sections:
        lines += [s, ""]
    lines += [plot_line, ""]
    lines += [
        "Raw data of this run: `bench/.results/pytest-benchmark.json`, `bench/.results/cargo-bench.txt` "
        "(not committed).",
        "",
    ]
    RESULTS.write_text("\n".join(lines))


def _alone(group: str, analyse_group: Any) -> Any:
    """``analyse_group(data, criterion)`` as `--only` runs it: its checks and section marked with its command."""

    def run(data: dict[str, Any], criterion: dict[str, dict[str, Any]]) -> tuple[list[Check], str]:
        checks, section = analyse_group(data, criterion)
        return tag(checks, group), with_command(section, group)

    return run


# Groups `--only` can run alone: (their pytest file or test, the criterion benches they need, their analysis).
# Their plots go to bench/.results/, beside bench/.results/<group>.md.
ONLY_GROUPS: dict[str, tuple[str, tuple[str, ...], Any]] = {
    LIMITS_GROUP: ("bench/test_limits.py", (CRITERION_BATCHER,), _alone(LIMITS_GROUP, analyse_limits)),
    # The whole of bench/test_e2e.py: groups e2e, e2e_consume, e2e_consume_steady and e2e_sweep (already marked).
    E2E_GROUP: ("bench/test_e2e.py", (), lambda data, criterion: analyse_e2e(data, criterion, OUT)),
    STEADY_GROUP: ("bench/test_e2e.py::test_e2e_consume_steady", (), lambda data, criterion: analyse_steady(data)),
    E2E_SWEEP_GROUP: (
        "bench/test_e2e.py::test_e2e_sweep",
        (),
        _alone(
            E2E_SWEEP_GROUP,
            lambda data, criterion: ([], sweep_section(by_peer(data, E2E_SWEEP_GROUP), OUT / E2E_SWEEP_PLOT)),
        ),
    ),
    "submit": ("bench/test_submit.py", (), _alone("submit", lambda data, criterion: analyse_submit(data, OUT))),
    "log_append": ("bench/test_log.py", (), _alone("log_append", lambda data, criterion: analyse_log(data))),
}


def write_only(group: str, info: dict[str, str], checks: list[Check], section: str, problems: list[str]) -> Path:
    """One group's figures, for `--only`: bench/.results/<group>.md (RESULTS.md holds whole runs only)."""
    lines = [
        f"# {group} (bench/run.py --only {group}; not RESULTS.md)",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        *targets_table(checks),
        "",
        *[f"- problem: {p}" for p in problems],
        "",
        section,
        "",
    ]
    path = OUT / f"{group}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the benchmarks and regenerate bench/RESULTS.md.")
    ap.add_argument("--skip-cargo", action="store_true", help="skip the criterion bench")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--cargo-timeout", type=float, default=420.0)
    ap.add_argument(
        "--only",
        choices=sorted(ONLY_GROUPS),
        help="run one group (and the criterion benches its targets need), print its targets and write them to "
        "bench/.results/<group>.md; RESULTS.md and the README are left as they are",
    )
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    args = ap.parse_args()

    OUT.mkdir(exist_ok=True)
    started = time.monotonic()
    info = machine()
    load_before = loadavg()
    problems: list[str] = []

    paths: tuple[str, ...] = ("bench",)
    filters: tuple[str, ...] = ()
    json_path, cargo_log = PYTEST_JSON, CARGO_LOG
    if args.only:
        path, needs, _ = ONLY_GROUPS[args.only]
        paths, filters = (path,), needs
        json_path, cargo_log = OUT / f"{args.only}.json", OUT / f"{args.only}-cargo.txt"
    json_path.unlink(missing_ok=True)
    rc = run_pytest(args.pytest_args, paths, json_path)
    if rc != 0:
        problems.append(f"`pytest {' '.join(paths)} -m bench` exited with status {rc}: see its output.")
    data: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}

    criterion: dict[str, dict[str, Any]] = {}
    if args.only and not ONLY_GROUPS[args.only][1]:
        pass  # this group's targets need no criterion figure
    elif args.skip_cargo:
        problems.append("the criterion bench was skipped (--skip-cargo).")
    else:
        crc, cout = run_cargo(args.cargo_timeout, filters, cargo_log)
        criterion = parse_criterion(cout)
        if crc != 0:
            tail = "; ".join(line.strip() for line in cout.strip().splitlines()[-3:])
            problems.append(f"`{' '.join([*CARGO_CMD, *filters])}` exited with status {crc}: {tail}")
        elif CRITERION_BATCHER not in criterion:
            problems.append(f"no `thrpt:` line for {CRITERION_BATCHER} in the cargo bench output.")

    info["load average (1/5/15 min) before / after"] = f"{load_before} / {loadavg()}"
    info["run time"] = f"{time.monotonic() - started:.0f} s"
    if args.only:
        checks, section = ONLY_GROUPS[args.only][2](data, criterion)
        written = write_only(args.only, info, checks, section, problems)
        print(f"\n{section}\n\nwrote {written.relative_to(ROOT)} (RESULTS.md and the README are unchanged)")
    else:
        checks, sections = analyse(data, criterion)
        write_results(info, checks, sections, problems, plot(data))
        write_readme(info, checks)
        print(f"\nwrote {RESULTS.relative_to(ROOT)} and the figures in {README.relative_to(ROOT)}")
    for c in checks:
        print(f"  {verdict(c).strip('*'):>12}  {c.name}: {c.measured} (target {c.target})")
    if problems:
        print("problems:\n  " + "\n  ".join(problems))
        return 1
    if args.strict and any(c.ok is False for c in checks):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
