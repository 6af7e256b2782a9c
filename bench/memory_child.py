"""Child process of bench/test_memory.py: peak RSS of a real Producer whose endpoint has stalled.

    python bench/memory_child.py --endpoint URL --stream NAME [--events N] [--ring-mib 64] [--baseline]

Starts a ``Producer`` (through ``Producer.background``: its event loop in a thread, submits from this one)
with ``ring_bytes=64 MiB, overflow="reject"`` against ``--endpoint``, which answers ListShards and never
answers PutRecords. Then offers ``--events`` 100-byte events with ``submit_many`` as fast as it can, over and
over the same chunk of 10,000 tuples (building 10 million tuples would measure the list, not the producer);
refusals are expected once the ring is full and are counted. After a short settle and a last top-up of the
ring, it reads its peak RSS (``VmHWM``; ``ru_maxrss`` too, see
``peak_rss_bytes``), closes the producer (everything undelivered is dead-lettered) and
reads it again. With ``--baseline`` it only starts and closes the producer.

Prints one JSON object on the last line of stdout. Imports nothing but treasure_engine and the stdlib, so its
RSS is the producer's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from treasure_engine import DeadLetter, Producer, ProducerConfig
from treasure_engine._core import kpl_decode, kpl_is_aggregated

MiB = 1024 * 1024
CHUNK = 10_000


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # "VmHWM:  123 kB"
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's own peak RSS.

    Linux carries ``ru_maxrss`` over ``execve`` from the forked copy of the parent, so a child of a large
    process (pytest) reports the parent's RSS; ``VmHWM`` belongs to the current address space only.
    """
    return _status_bytes("VmHWM")


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--ring-mib", type=int, default=64)
    ap.add_argument("--settle-s", type=float, default=2.0)
    ap.add_argument("--baseline", action="store_true")
    args = ap.parse_args()

    dead = [0]
    # Dead letters whose data is a KPL aggregate (several events in one), and the events inside them.
    dead_aggregates = [0, 0]

    def on_dead_letter(batch: list[DeadLetter]) -> None:
        dead[0] += len(batch)
        for letter in batch:
            if kpl_is_aggregated(letter.data):
                dead_aggregates[0] += 1
                dead_aggregates[1] += len(kpl_decode(letter.data))

    ring_bytes = args.ring_mib * MiB
    config = ProducerConfig(
        stream=args.stream,
        endpoint_url=args.endpoint,
        region="us-east-1",
        ring_bytes=ring_bytes,
        overflow="reject",
    )
    out: dict[str, object] = {"mode": "baseline" if args.baseline else "stalled", "ring_bytes": ring_bytes}
    started = time.perf_counter()
    producer = Producer.background(config, on_dead_letter=on_dead_letter)
    out["rss_after_start"] = current_rss_bytes()

    offered = accepted = 0
    if not args.baseline:
        chunk = [(f"{i:0>100}".encode(), f"key-{(i * 7919) % 10_000}") for i in range(CHUNK)]
        t0 = time.perf_counter()
        while offered < args.events:
            part = chunk if args.events - offered >= CHUNK else chunk[: args.events - offered]
            accepted += producer.submit_many(part)
            offered += len(part)
        out["submit_s"] = time.perf_counter() - t0
        # Let the batcher take what it may from the ring (its buffer, the in-flight requests), then fill the
        # ring again: the worst case the endpoint's stall can cause.
        time.sleep(args.settle_s)
        topped_up = 0
        while (n := producer.submit_many(chunk)) > 0:
            topped_up += n
        out["topped_up"] = topped_up
        time.sleep(0.2)
    stats = producer.producer.stats_dict()
    out.update(
        offered=offered,
        accepted=accepted,  # of the `offered` events (the top-up is counted apart)
        refused=offered - accepted,
        pipeline_refused=stats.get("refused", 0),
        ring_bytes_used=stats.get("ring_bytes_used", 0),
        buffered_bytes=stats.get("buffered_bytes", 0),
        in_flight=stats.get("in_flight", 0),
        peak_rss=peak_rss_bytes(),
        ru_maxrss=ru_maxrss_bytes(),
        rss_before_close=current_rss_bytes(),
    )
    t0 = time.perf_counter()
    producer.close(timeout=0.5)
    final = producer.producer.stats_dict()
    out.update(
        close_s=time.perf_counter() - t0,
        dead_lettered=dead[0],
        dead_aggregated_letters=dead_aggregates[0],
        dead_events_in_aggregates=dead_aggregates[1],
        after_close={k: final.get(k, 0) for k in ("accepted", "delivered", "dead_lettered", "in_flight")},
        peak_rss_incl_close=peak_rss_bytes(),
        total_s=time.perf_counter() - started,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
