"""`treasure-engine consume`: runs a Consumer from a TOML file until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from treasure_engine.cli._common import load_config, load_handler, run_until_signal

log = logging.getLogger("treasure_engine.consume")


async def _consume(config: Any, handler: Any, stop: asyncio.Event) -> int:
    from treasure_engine.consumer import Consumer

    consumer = Consumer(config, handler)
    await consumer.start()
    print(f"consuming {config.stream} as {consumer.worker_id}; SIGTERM or Ctrl-C stops", flush=True)
    try:
        waiter = asyncio.ensure_future(consumer.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if waiter.done():
            waiter.result()
        waiter.cancel()
    finally:
        await consumer.stop()
    handled = sum(s["records_handled"] for s in consumer.stats().values())
    print(f"stopped: {handled} record(s) handled, checkpoints written, leases handed back", flush=True)
    return 0


def run_consume(args: Any) -> int:
    config = load_config(args.config)
    handler = load_handler(args.handler, args.app_dir)
    return run_until_signal(lambda stop: _consume(config, handler, stop))
