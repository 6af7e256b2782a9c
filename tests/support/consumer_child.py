"""A consumer worker process for the multi-process tests.

``python consumer_child.py CONFIG_JSON OUT_FILE``: runs a `Consumer` with the config (a JSON object of
ConsumerConfig fields) and `tests.support.handlers.append_to_file`, which appends every handled record's data,
one line per record, to OUT_FILE (one write per batch, so a SIGKILL loses at most a partial last line, which
the reader ignores). Prints
"ready <worker_id>" once started; SIGTERM stops it gracefully (final checkpoint, leases handed back).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from tests.support.handlers import append_to_file

from treasure_engine import Consumer, ConsumerConfig


async def main(config: ConsumerConfig, out_path: str) -> None:
    os.environ["TREASURE_TEST_OUT"] = out_path  # where append_to_file writes
    open(out_path, "ab").close()  # noqa: ASYNC230 - there from the start, even before the first batch

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Consumer(config, append_to_file) as consumer:
        print(f"ready {consumer.worker_id}", flush=True)
        await stop.wait()
    print("stopped", flush=True)


if __name__ == "__main__":
    cfg = ConsumerConfig.from_dict(json.loads(sys.argv[1]))
    asyncio.run(main(cfg, sys.argv[2]))
