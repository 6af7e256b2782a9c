"""A consumer worker process for the multi-process tests.

``python consumer_child.py CONFIG_JSON OUT_FILE``: runs a `Consumer` with the config (a JSON object of
ConsumerConfig fields) and appends every handled record's data, one line per record, to OUT_FILE (written and
flushed once per batch, so a SIGKILL loses at most a partial last line, which the reader ignores). Prints
"ready <worker_id>" once started; SIGTERM stops it gracefully (final checkpoint, leases handed back).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from treasure_engine import Consumer, ConsumerConfig, Record


async def main(config: ConsumerConfig, out_path: str) -> None:
    out = open(out_path, "ab", buffering=0)  # noqa: SIM115, ASYNC230 - one write per batch, closed at exit

    async def handle(records: list[Record]) -> None:
        out.write(b"".join(r.data + b"\n" for r in records))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Consumer(config, handle) as consumer:
        print(f"ready {consumer.worker_id}", flush=True)
        await stop.wait()
    out.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    cfg = ConsumerConfig.from_dict(json.loads(sys.argv[1]))
    asyncio.run(main(cfg, sys.argv[2]))
