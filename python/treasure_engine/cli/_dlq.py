"""`treasure-engine dlq ...`: list, show, stats, verify, redrive and purge a dead-letter queue."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from treasure_engine.cli._common import UsageError, parse_filter, parse_time
from treasure_engine.dlq import DeadLetter, DeadLetterQueue, RedriveReport

__all__ = ["run_dlq"]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _preview(data: bytes, width: int = 40) -> str:
    text = data[:width].decode("utf-8", "backslashreplace")
    return text + ("…" if len(data) > width else "")


def _line(d: DeadLetter) -> str:
    return (
        f"{d.id:>12}  {_when(d.dead_lettered_at)}  {d.source:<8}  {d.stream}  key={d.partition_key}  "
        f"{d.error_type} x{d.attempts}  {len(d.data)}B  {_preview(d.data)}"
    )


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def run_dlq(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    dlq = DeadLetterQueue(args.path)
    verb = args.verb
    if verb == "list":
        if args.limit is not None and args.limit < 0:
            raise UsageError("--limit must be >= 0")
        chosen = parse_filter(args.filter)
        for n, d in enumerate(dlq.entries(filter=chosen, include_redriven=args.all)):
            if args.limit is not None and n >= args.limit:
                break
            print(_json(d.to_dict()) if args.json else _line(d), file=out)
        return 0
    if verb == "show":
        try:
            d = dlq.get(args.id)
        except KeyError:
            raise UsageError(f"no entry {args.id} in {args.path}") from None
        print(json.dumps(d.to_dict(), ensure_ascii=False, indent=2, sort_keys=True), file=out)
        return 0
    if verb == "stats":
        s = dlq.stats()
        if args.json:
            print(_json(msgspec.structs.asdict(s)), file=out)
        else:
            oldest = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:.0f}s"
            print(
                f"waiting {s.count} ({s.bytes} B), oldest {oldest}, rate {s.rate_per_s:.2f}/s over "
                f"{s.window_s:.0f}s, redriven {s.redriven}, purged {s.purged}, damaged frames "
                f"{s.corrupted_frames}, on disk {s.log_bytes} B",
                file=out,
            )
            for error, count in sorted(s.by_error_type.items(), key=lambda kv: -kv[1]):
                print(f"  {error}: {count}", file=out)
        return 0
    if verb == "verify":
        report = dlq.verify()
        if args.json:
            print(_json(msgspec.structs.asdict(report)), file=out)
        else:
            print(
                f"{report.entries} entries, {len(report.corruptions)} damaged region(s), "
                f"{len(report.undecodable)} undecodable frame(s)",
                file=out,
            )
            for c in report.corruptions:
                print(f"  damaged: {c['segment']} at {c['position']}, {c['length']} bytes: {c['reason']}", file=out)
            for p in report.undecodable:
                print(f"  undecodable frame at {p}", file=out)
        return 0 if report.ok else 1
    if verb == "redrive":
        if args.rate is not None and args.rate <= 0:
            raise UsageError("--rate must be > 0")
        return asyncio.run(_redrive(dlq, args, out))
    if verb == "purge":
        before = parse_time(args.before)
        n = dlq.purge(before)
        print(f"purged {n} entr{'y' if n == 1 else 'ies'} dead-lettered before {_when(before)}", file=out)
        return 0
    raise UsageError(f"unknown dlq command {verb!r}")


async def _redrive(dlq: DeadLetterQueue, args: argparse.Namespace, out: TextIO) -> int:
    from treasure_engine.config import ProducerConfig
    from treasure_engine.producer import Producer

    chosen = parse_filter(args.filter)
    total = sum(1 for _ in dlq.entries(filter=chosen))
    started = time.monotonic()
    tty = out.isatty()

    def progress(r: RedriveReport) -> None:
        done = r.redriven
        width = 30
        filled = width if total == 0 else min(width, width * done // total)
        rate = done / max(1e-9, time.monotonic() - started)
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {rate:,.0f}/s"
        if tty:
            print(line, end="", file=out, flush=True)

    # The redriving producer's own dead letters go back into this queue (a free slot of it when another
    # process holds it): a second failure is a new entry, never a loss.
    config = ProducerConfig(stream=args.stream, endpoint_url=args.endpoint_url, region=args.region)
    sink = DeadLetterQueue.claim(dlq.path)

    async def store(batch: list[DeadLetter]) -> None:
        await asyncio.to_thread(sink.put, batch)

    try:
        async with Producer(config, on_dead_letter=store) as producer:
            report = await dlq.redrive(producer, filter=chosen, rate=args.rate, name=args.name, progress=progress)
    finally:
        sink.close()
    if tty:
        print(file=out)
    print(
        f"redriven {report.redriven}, failed again {report.failed}, skipped {report.skipped}; "
        f"cursor at {report.cursor}",
        file=out,
    )
    return 0 if report.failed == 0 else 1
