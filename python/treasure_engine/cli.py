"""The `treasure-engine` command. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treasure-engine", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="log debug output and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="push a burst through an embedded Kinesis endpoint and print the books")
    demo.add_argument("--events", type=int, default=1_000_000, help="events to push (default 1,000,000)")
    demo.add_argument("--shards", type=int, default=16, help="shards of the demo stream (default 16)")
    demo.add_argument("--endpoint-url", default=None, help="use this Kinesis endpoint instead of the embedded one")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            if args.events <= 0 or args.shards <= 0:
                parser.error("--events and --shards must be positive")
            from treasure_engine.demo import run_demo

            return run_demo(args.events, args.shards, args.endpoint_url, args.json)
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
