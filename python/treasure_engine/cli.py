"""The `treasure-engine` command. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treasure-engine", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="log debug output and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a peak-sale burst through the whole engine, with an outage; the books")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of the scripted burst (default 30)")
    demo.add_argument("--rate", type=int, default=4_000, help="peak events per second (default 4,000)")
    demo.add_argument("--shards", type=int, default=4, help="shards of the demo stream (default 4)")
    demo.add_argument("--endpoint-url", default=None, help="use this Kinesis endpoint instead of the embedded one")
    demo.add_argument("--port", type=int, default=9464, help="the monitor's port on 127.0.0.1 (0: any free one)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON, no dashboard")
    demo.add_argument("--report", default=None, metavar="FILE", help="write an HTML chart of the run to FILE")
    run = sub.add_parser("run", help="run the engine a TOML file configures (producer, consumer, monitor)")
    run.add_argument("--config", required=True, help="TOML file: [producer], [consumer], [monitor] (EngineConfig)")
    run.add_argument("--handler", default=None, help="module:function, the consumer's async handler")
    run.add_argument("--input", default=None, help="submit each line of this file as an event ([producer])")
    run.add_argument("--key-field", default=None, help="JSON field of an input line used as its partition key")
    consume = sub.add_parser("consume", help="read a stream into a handler until SIGTERM, sharing shards via leases")
    consume.add_argument("--config", required=True, help="TOML file: ConsumerConfig fields, top level or [consumer]")
    consume.add_argument("--handler", required=True, help="module:function, an async def handle(records)")
    _dlq_parser(sub)
    return parser


def _dlq_parser(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="inspect, verify, redrive and purge a dead-letter queue")
    verbs = dlq.add_subparsers(dest="verb", required=True)
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="select entries: stream, source, error_type, partition_key (shell pattern), shard_id, since, before "
        "(times as ISO 8601, Unix seconds, or an age like 30m, 12h, 7d); repeat to combine",
    )
    ls = verbs.add_parser("list", parents=[filters], help="list waiting entries, oldest first")
    ls.add_argument("path", help="the dead-letter queue directory (<state_dir>/dlq)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line, payload included")
    ls.add_argument("--limit", type=int, default=None, help="at most this many entries")
    ls.add_argument("--all", action="store_true", help="include entries already redriven")
    show = verbs.add_parser("show", help="one entry in full, as JSON")
    show.add_argument("path")
    show.add_argument("id", type=int, help="the entry's id (as `dlq list` prints it)")
    stats = verbs.add_parser("stats", help="count, bytes, oldest age, rate, by error type")
    stats.add_argument("path")
    stats.add_argument("--json", action="store_true")
    verify = verbs.add_parser("verify", help="check every frame; exit 1 when anything is damaged")
    verify.add_argument("path")
    verify.add_argument("--json", action="store_true")
    redrive = verbs.add_parser("redrive", parents=[filters], help="send waiting entries back to a stream")
    redrive.add_argument("path")
    redrive.add_argument("--stream", required=True, help="the stream to send them to")
    redrive.add_argument("--endpoint-url", default=None, help="Kinesis endpoint (default: AWS)")
    redrive.add_argument("--region", default=None)
    redrive.add_argument("--rate", type=float, default=None, help="at most N events per second")
    redrive.add_argument("--name", default=None, help="name of the resumable cursor (default: stream and filter)")
    purge = verbs.add_parser("purge", help="remove entries dead-lettered before a time")
    purge.add_argument("path")
    purge.add_argument("--before", required=True, help="ISO 8601, Unix seconds, or an age like 7d")


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit code 2."""


def parse_time(text: str, *, now: float | None = None) -> float:
    """Unix seconds from ISO 8601 (`2026-11-30T12:00:00Z`), Unix seconds, or an age (`90s`, `30m`, `12h`, `7d`)."""
    import re
    from datetime import UTC, datetime

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


def _demo_options(args: Any) -> Any:
    from treasure_engine.demo import DemoOptions

    if args.duration < 5 or args.rate <= 0 or not 1 <= args.shards <= 64 or not 0 <= args.port <= 65535:
        raise UsageError("--duration must be >= 5, --rate > 0, --shards in [1, 64], --port in [0, 65535]")
    return DemoOptions(
        duration=args.duration,
        rate=args.rate,
        shards=args.shards,
        endpoint_url=args.endpoint_url,
        port=args.port,
        as_json=args.json,
        report=args.report,
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            from treasure_engine.demo import run_demo

            return run_demo(_demo_options(args))
        if args.command == "run":
            from treasure_engine.run_cli import run_engine

            return run_engine(args)
        if args.command == "consume":
            from treasure_engine.consume_cli import run_consume

            return run_consume(args)
        if args.command == "dlq":
            from treasure_engine.dlq_cli import run_dlq

            return run_dlq(args)
    except UsageError as e:
        print(f"treasure-engine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"treasure-engine: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
