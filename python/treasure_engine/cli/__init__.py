"""The `treasure-engine` command. Bad input: one line on stderr, exit code 2.

Each subcommand is a module of this package, imported only when it runs: `demo`, `run`, `consume`, `dlq`.
"""

from __future__ import annotations

import logging
import sys

from treasure_engine.cli._common import UsageError
from treasure_engine.cli._parser import build_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            from treasure_engine.cli._demo import run_demo_command

            return run_demo_command(args)
        if args.command == "run":
            from treasure_engine.cli._run import run_engine

            return run_engine(args)
        if args.command == "consume":
            from treasure_engine.cli._consume import run_consume

            return run_consume(args)
        if args.command == "dlq":
            from treasure_engine.cli._dlq import run_dlq

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
