"""Helpers the commands share: the usage error, time and filter parsing, config and handler loading, and
running a command's coroutine until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from treasure_engine._loop_thread import run


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit code 2."""


def parse_time(text: str, *, now: float | None = None) -> float:
    """Unix seconds from ISO 8601 (`2026-11-30T12:00:00Z`), Unix seconds, or an age (`90s`, `30m`, `12h`, `7d`)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"not a time: {text!r} (use ISO 8601, Unix seconds, or an age like 7d)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_filter(items: list[str]) -> Any:
    from treasure_engine.dlq import DeadLetterFilter

    fields: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in DeadLetterFilter.__struct_fields__:
            raise UsageError(
                f"bad --filter {item!r}: expected FIELD=VALUE with FIELD one of "
                + ", ".join(DeadLetterFilter.__struct_fields__)
            )
        if name in ("since", "before"):
            fields[name] = parse_time(value)
        elif name == "source" and value not in ("producer", "consumer"):
            raise UsageError(f"bad --filter {item!r}: source is producer or consumer")
        else:
            fields[name] = value
    return DeadLetterFilter(**fields) if fields else None


def load_config(path: str) -> Any:
    """A ConsumerConfig from a TOML file: the settings at the top level, or under a `[consumer]` table."""
    from treasure_engine.config import ConsumerConfig, read_toml

    data = read_toml(path)
    section = data.get("consumer", data)
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [consumer] must be a table")
    return ConsumerConfig.from_dict(section)


def load_handler(spec: str, app_dir: str = ".") -> Any:
    """The async function named by `module:function` (a dotted attribute path is allowed after the colon).

    The module is looked for in `app_dir` first (the current directory by default, as uvicorn and celery do: a
    console script does not put it on the import path), then on the import path.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"bad --handler {spec!r}: expected module:function")
    where = os.path.abspath(app_dir)
    if not os.path.isdir(where):
        raise UsageError(f"--app-dir {app_dir!r} is not a directory")
    if where not in sys.path:
        sys.path.insert(0, where)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import handler module {module_name!r} (looked in {where} first): {e}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"handler {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not inspect.iscoroutinefunction(target):
        raise UsageError(f"handler {spec!r} must be an async function (async def handle(records) -> ...)")
    return target


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Runs `main(stop)` on uvloop (asyncio where uvloop is missing); SIGTERM and SIGINT set `stop`."""

    async def until_signal() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return run(until_signal())
