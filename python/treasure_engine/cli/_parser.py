"""The argument parser of the `treasure-engine` command: one subcommand per module of this package."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = "The `treasure-engine` command. Bad input: one line on stderr, exit code 2."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treasure-engine", description=DESCRIPTION)
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
    run.add_argument("--app-dir", default=".", help="look for the handler's module here first (default: .)")
    run.add_argument("--input", default=None, help="submit each line of this file as an event ([producer])")
    run.add_argument("--key-field", default=None, help="JSON field of an input line used as its partition key")
    consume = sub.add_parser("consume", help="read a stream into a handler until SIGTERM, sharing shards via leases")
    consume.add_argument("--config", required=True, help="TOML file: ConsumerConfig fields, top level or [consumer]")
    consume.add_argument("--handler", required=True, help="module:function, an async def handle(records)")
    consume.add_argument("--app-dir", default=".", help="look for the handler's module here first (default: .)")
    _add_dlq(sub)
    return parser


def _add_dlq(sub: Any) -> None:
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
