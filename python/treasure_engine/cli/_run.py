"""`treasure-engine run`: an Engine from one TOML file, until SIGTERM or SIGINT.

With `[producer]` and `--input FILE`, every line of FILE is an event (its partition key is the JSON field
`--key-field`, else a hash of the line); the line reached is remembered in `<state_dir>/input/`, so a restart
with the same file goes on after the last line submitted. With `[consumer]`, the stream is read into the handler
(`--handler module:function`, or `handler` in the file). SIGTERM stops reading the input, finishes the batches
in flight, checkpoints, hands the leases back and flushes the producer, within `shutdown_timeout_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from treasure_engine._state import state_dir_of
from treasure_engine.cli._common import UsageError, load_handler, run_until_signal
from treasure_engine.producer import submit_waiting

log = logging.getLogger("treasure_engine.run")

_CHUNK = 2_000


def _offset_file(engine: Any, input_path: Path) -> Path:
    cfg = engine.config.producer
    state = state_dir_of(cfg.state_dir, cfg.app_name)
    digest = hashlib.sha1(str(input_path.resolve()).encode()).hexdigest()[:12]
    return state / "input" / f"{input_path.name}-{digest}.offset"


def _key_of(line: bytes, key_field: str | None) -> str:
    if key_field is not None:
        try:
            value = orjson.loads(line).get(key_field)
        except (orjson.JSONDecodeError, AttributeError):
            value = None
        if value is not None and str(value):
            return str(value)[:256]
    return hashlib.md5(line).hexdigest()


async def _feed(engine: Any, input_path: Path, key_field: str | None, stop: asyncio.Event) -> tuple[int, int]:
    """Submits the file's lines after the remembered one until the end or `stop`; returns (events submitted,
    the last line submitted). Every line up to that one was submitted (or was empty)."""
    offset_file = _offset_file(engine, input_path)
    done_through = int(offset_file.read_text()) if offset_file.exists() else 0
    offset_file.parent.mkdir(parents=True, exist_ok=True)
    submitted = 0
    lines: list[int] = []
    batch: list[tuple[bytes, str]] = []

    async def flush_batch() -> None:
        nonlocal done_through, submitted
        n, _ = await submit_waiting(engine.submit_many, batch, stop=stop)
        await asyncio.sleep(0)
        submitted += n
        if n:
            done_through = lines[n - 1]  # every line before the last one accepted was accepted too
        _save(offset_file, done_through)
        lines.clear()
        batch.clear()

    with input_path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no <= done_through:
                continue
            line = raw.rstrip(b"\r\n")
            if not line:
                continue
            batch.append((line, _key_of(line, key_field)))
            lines.append(line_no)
            if len(batch) >= _CHUNK:
                await flush_batch()
                if stop.is_set():
                    return submitted, done_through
        if batch:
            await flush_batch()
    return submitted, done_through


def _save(path: Path, line: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(line))
    os.replace(tmp, path)


async def _run(config: Any, handler: Any, input_path: Path | None, key_field: str | None, stop: asyncio.Event) -> int:
    from treasure_engine.engine import Engine

    engine = Engine(config, handler=handler)
    await engine.start()
    parts = [name for name in ("producer", "consumer") if getattr(engine, name) is not None]
    print(f"treasure-engine running: {', '.join(parts)}; SIGTERM or Ctrl-C stops", flush=True)
    fed: tuple[int, int] | None = None
    try:
        if input_path is not None:
            fed = await _feed(engine, input_path, key_field, stop)
            print(f"input: {fed[0]} event(s) submitted from {input_path} (next start after line {fed[1]})", flush=True)
        await stop.wait()
    finally:
        started = time.monotonic()
        await engine.stop()
        stats = engine.stats()
    took = time.monotonic() - started
    summary: dict[str, Any] = {"stop_s": round(took, 3)}
    if "producer" in stats:
        p = stats["producer"]
        summary["producer"] = {k: p[k] for k in ("accepted", "delivered", "dead_lettered", "in_flight")}
    if "consumer" in stats:
        summary["consumer_handled"] = sum(s["records_handled"] for s in stats["consumer"].values())
        summary["consumer_dead_lettered"] = sum(s["records_dead_lettered"] for s in stats["consumer"].values())
    print("stopped: " + orjson.dumps(summary).decode(), flush=True)
    return 0


def run_engine(args: Any) -> int:
    from treasure_engine.engine import EngineConfig

    config = EngineConfig.from_toml(args.config)
    handler_spec = args.handler or config.handler
    handler = load_handler(handler_spec, args.app_dir) if config.consumer is not None and handler_spec else None
    if config.consumer is not None and handler is None:
        raise UsageError("[consumer] is configured: give --handler module:function (or handler in the file)")
    input_path = Path(args.input) if args.input else None
    if input_path is not None:
        if config.producer is None:
            raise UsageError("--input needs a [producer] section")
        if not input_path.is_file():
            raise UsageError(f"input file not found: {input_path}")
    return run_until_signal(lambda stop: _run(config, handler, input_path, args.key_field, stop))
