"""A producer process for the WAL crash test: submits ids and prints each one once `submit` has returned.

    python -m tests.support.wal_child ENDPOINT STREAM STATE_DIR FIRST COUNT

Prints ``ready`` once started, then one id per line as ``submit`` returns, then ``recovered N`` (events replayed
from what an earlier, killed process left) and ``done`` after a flush. The parent kills it with SIGKILL somewhere
in between.
"""

from __future__ import annotations

import asyncio
import sys

from treasure_engine import Producer, ProducerConfig


async def main(endpoint: str, stream: str, state_dir: str, first: int, count: int) -> None:
    config = ProducerConfig(
        stream=stream,
        endpoint_url=endpoint,
        state_dir=state_dir,
        durability="wal",
        wal_fsync="never",  # a process crash is what is tested: the page cache survives it
        shard_records_per_s=1e9,
        shard_bytes_per_s=1e9,
        linger_ms=5.0,
        request_timeout_s=5.0,
    )
    out = sys.stdout
    async with Producer(config) as producer:
        out.write("ready\n")
        out.flush()
        for i in range(first, first + count):
            producer.submit(b"%d:wal" % i, f"k{i % 17}")
            out.write(f"{i}\n")
            out.flush()
            if i % 200 == 0:
                # A burst paced to last about a second, with requests in flight all along.
                await asyncio.sleep(0.01)
        await producer.flush(timeout=60)
        recovered = producer.stats_dict()["wal_recovered"]
    out.write(f"recovered {recovered}\ndone\n")
    out.flush()


if __name__ == "__main__":
    endpoint, stream, state_dir, first, count = sys.argv[1:6]
    asyncio.run(main(endpoint, stream, state_dir, int(first), int(count)))
