"""A producer process for the chaos cases that kill it.

    python -m tests.support.chaos_producer ENDPOINT STREAM STATE_DIR FIRST RATE SECONDS

Runs an ordered `Producer` with ``durability="wal"`` on STATE_DIR and submits events FIRST, FIRST+1, ... (the
checker's events) at RATE per second for SECONDS. Prints ``ready``, then ``+<next id>`` after each tick (every id
below it was accepted: `submit_many` returned), then ``recovered <n> corrupt <m>`` (events replayed from the WAL
an earlier, killed process left; damaged frames it skipped) and ``done`` after a flush. The parent kills it with
SIGKILL somewhere in between.
"""

from __future__ import annotations

import asyncio
import sys

from tests.support.chaos import Feeder

from treasure_engine import Producer, ProducerConfig


def report(next_id: int) -> None:
    sys.stdout.write(f"+{next_id}\n")
    sys.stdout.flush()


async def main(endpoint: str, stream: str, state_dir: str, first: int, rate: float, seconds: float) -> None:
    config = ProducerConfig(
        stream=stream,
        endpoint_url=endpoint,
        region="us-east-1",
        state_dir=state_dir,
        durability="wal",
        wal_fsync="never",  # a process crash is what is tested: the page cache survives it
        ordered=True,
        linger_ms=20.0,
        request_timeout_s=3.0,
        backoff_base_s=0.05,
        backoff_max_s=1.0,
    )
    async with Producer(config) as producer:
        print("ready", flush=True)
        await Feeder(producer, start=first).run(rate, duration_s=seconds, report=report)
        await producer.flush(timeout=60)
        stats = producer.stats_dict()
    print(f"recovered {stats['wal_recovered']} corrupt {stats['wal_errors']}\ndone", flush=True)


if __name__ == "__main__":
    endpoint, stream, state_dir, first, rate, seconds = sys.argv[1:7]
    asyncio.run(main(endpoint, stream, state_dir, int(first), float(rate), float(seconds)))
