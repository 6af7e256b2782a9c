"""Child process of bench/test_limits.py: one burst through a real Producer, with its CPU per thread.

    python bench/limits_child.py --endpoint URL --stream NAME --variant default|raised [--events N]

Starts a ``Producer`` with the default ``ProducerConfig`` (``--variant raised``: shard limits raised to
``shard_records_per_s=1e6, shard_bytes_per_s=1e9``) against ``--endpoint`` (kinesalite, a fresh stream), then
times one burst as a new user writes it: ``submit_many`` over lists of 1,000 events (100-byte payloads,
keys from 1,000), then ``await producer.flush()``; then closes the producer. The events are built before the
producer starts, so the measured window (first ``submit_many`` to the end of ``flush``) holds only the
producer's work.

Measured over that window: wall time, the process's CPU (``getrusage(RUSAGE_SELF)``, user + sys) and each
thread's CPU, from ``/proc/self/task/<tid>/schedstat`` (nanoseconds on CPU) and ``.../stat`` (utime + stime,
fields 14 and 15, clock ticks: 10 ms each, too coarse for a burst of a few hundred milliseconds, recorded as a
cross-check), grouped by thread name (``comm``; the Rust batcher thread is "treasure-batcher", cut by the
kernel to 15 characters). A thread that ends inside the window is missing from the per-thread figures (the
process figure has it). Also the producer's own counters (requests, Kinesis records sent, delivered, ...).

The run fails (exit 1) unless every event was accepted and delivered, nothing is in flight and nothing was
dead-lettered: a run that lost events is a failure, not a figure. Prints one JSON object on the last line of
stdout. Imports nothing but treasure_engine and the stdlib.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from treasure_engine import Producer, ProducerConfig

CHUNK = 1_000
KEYS = 1_000
DATA_BYTES = 100
RAISED = {"shard_records_per_s": 1e6, "shard_bytes_per_s": 1e9}
BATCHER_COMM = "treasure-batcher"[:15]  # the kernel keeps 15 characters of a thread's name
MAIN = "main (asyncio loop)"
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def process_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def threads() -> dict[int, tuple[str, float, float]]:
    """``{tid: (name, seconds on CPU from schedstat, seconds from stat's utime + stime)}`` of every thread now.
    The main thread is named ``MAIN``, other Python threads by their ``threading`` name (Python 3.11 leaves their
    comm as the interpreter's name), the others by their comm."""
    out: dict[int, tuple[str, float, float]] = {}
    main = threading.main_thread().native_id
    python = {t.native_id: f"{t.name} (Python thread)" for t in threading.enumerate()}
    for task in Path("/proc/self/task").iterdir():
        try:
            tid = int(task.name)
            comm = (task / "comm").read_text().strip()
            # Fields after "(comm)", which may hold spaces: state is field 3, utime 14, stime 15.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended while we looked
        out[tid] = (MAIN if tid == main else python.get(tid, comm), ns / 1e9, ticks * TICK_S)
    return out


def thread_deltas(before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]]) -> Any:
    """CPU seconds per thread name over the window (threads that started inside it count from zero)."""
    by_name: dict[str, dict[str, float]] = {}
    for tid, (name, ns_s, tick_s) in after.items():
        _, ns0, tick0 = before.get(tid, (name, 0.0, 0.0))
        d = by_name.setdefault(name, {"threads": 0, "cpu_s": 0.0, "cpu_s_ticks": 0.0})
        d["threads"] += 1
        d["cpu_s"] += ns_s - ns0
        d["cpu_s_ticks"] += tick_s - tick0
    return dict(sorted(by_name.items(), key=lambda kv: -kv[1]["cpu_s"]))


def make_chunks(events: int) -> list[list[tuple[bytes, str]]]:
    """``events`` distinct 100-byte payloads (their index, zero-padded) with keys from 1,000, in lists of 1,000."""
    all_events = [(f"{i:0>{DATA_BYTES}}".encode(), f"key-{(i * 7919) % KEYS}") for i in range(events)]
    return [all_events[i : i + CHUNK] for i in range(0, events, CHUNK)]


def freeze_harness() -> None:
    """Takes what the harness built so far (the events) out of the garbage collector's sight: no contender's
    collections in the measured window traverse them. A young generation holding the chunk lists cost one
    collection in treasure_engine's window 3 ms (200,000 references visited), which is the harness's, not the
    library's."""
    gc.collect()
    gc.freeze()


async def burst(args: argparse.Namespace) -> dict[str, Any]:
    chunks = make_chunks(args.events)
    freeze_harness()
    raised = RAISED if args.variant == "raised" else {}
    config = ProducerConfig(stream=args.stream, endpoint_url=args.endpoint, region="us-east-1", **raised)
    producer = Producer(config)
    t_start = time.perf_counter()
    await producer.start()
    start_s = time.perf_counter() - t_start

    threads0, cpu0, t0 = threads(), process_cpu_s(), time.perf_counter()
    accepted = 0
    for chunk in chunks:
        accepted += producer.submit_many(chunk)
    submitted_s = time.perf_counter() - t0
    await producer.flush()
    wall_s = time.perf_counter() - t0
    cpu_s, threads1 = process_cpu_s() - cpu0, threads()

    stats = producer.stats_dict()
    t1 = time.perf_counter()
    await producer.close()
    close_s = time.perf_counter() - t1
    final = producer.stats_dict()

    per_thread = thread_deltas(threads0, threads1)
    batcher = per_thread.get(BATCHER_COMM, {"cpu_s": float("nan"), "cpu_s_ticks": float("nan")})
    n = args.events
    return {
        "variant": args.variant,
        "config": {"shard_records_per_s": config.shard_records_per_s, "shard_bytes_per_s": config.shard_bytes_per_s},
        "events": n,
        "accepted": accepted,
        "start_s": start_s,
        "submit_s": submitted_s,
        "wall_s": wall_s,
        "close_s": close_s,
        "cpu_s": cpu_s,
        "cpu_per_event_ns": cpu_s / n * 1e9,
        "batcher_cpu_s": batcher["cpu_s"],
        "batcher_cpu_per_event_ns": batcher["cpu_s"] / n * 1e9,
        "batcher_cpu_s_ticks": batcher["cpu_s_ticks"],
        "threads": per_thread,
        "stats": stats,
        "after_close": {k: final.get(k, 0) for k in ("accepted", "delivered", "dead_lettered", "in_flight")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--variant", choices=("default", "raised"), required=True)
    ap.add_argument("--events", type=int, default=200_000)
    args = ap.parse_args()

    out = asyncio.run(burst(args))
    # The whole process: interpreter start-up, imports, building the events, start, burst, close.
    out["process_cpu_s_total"] = process_cpu_s()
    print(json.dumps(out))
    s, n = out["stats"], args.events
    lost = []
    if out["accepted"] != n:
        lost.append(f"accepted {out['accepted']} of {n}")
    if s["delivered"] != n or s["in_flight"] != 0 or s["dead_lettered"] != 0:
        lost.append(f"after flush: delivered {s['delivered']}, in flight {s['in_flight']}, dead {s['dead_lettered']}")
    if lost:
        print(f"events lost: {'; '.join(lost)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
