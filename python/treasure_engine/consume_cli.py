"""`treasure-engine consume`: runs a Consumer from a TOML file until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import signal
from typing import Any

from treasure_engine.cli import UsageError

log = logging.getLogger("treasure_engine.consume")


def load_config(path: str) -> Any:
    """A ConsumerConfig from a TOML file: the settings at the top level, or under a `[consumer]` table."""
    from treasure_engine.config import ConsumerConfig, read_toml

    data = read_toml(path)
    section = data.get("consumer", data)
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [consumer] must be a table")
    return ConsumerConfig.from_dict(section)


def load_handler(spec: str) -> Any:
    """The async function named by `module:function` (a dotted attribute path is allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"bad --handler {spec!r}: expected module:function")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import handler module {module_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"handler {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not inspect.iscoroutinefunction(target):
        raise UsageError(f"handler {spec!r} must be an async function (async def handle(records) -> ...)")
    return target


async def _consume(config: Any, handler: Any) -> int:
    from treasure_engine.consumer import Consumer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
    handler = load_handler(args.handler)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(_consume(config, handler))
    return uvloop.run(_consume(config, handler))
