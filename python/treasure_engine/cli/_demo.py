"""`treasure-engine demo`: the demo's options from the command line; the demo itself lives in `_demo`."""

from __future__ import annotations

import math
from typing import Any

from treasure_engine.cli._common import UsageError


def demo_options(args: Any) -> Any:
    from treasure_engine._demo import DemoOptions

    # Written so that nan fails each test; inf would run the demo without end.
    if (
        not 5 <= args.duration < math.inf
        or not 0 < args.rate < math.inf
        or not 1 <= args.shards <= 64
        or not 0 <= args.port <= 65535
    ):
        raise UsageError(
            "--duration must be finite and >= 5, --rate finite and > 0, --shards in [1, 64], --port in [0, 65535]"
        )
    return DemoOptions(
        duration=args.duration,
        rate=args.rate,
        shards=args.shards,
        endpoint_url=args.endpoint_url,
        port=args.port,
        as_json=args.json,
        report=args.report,
    )


def run_demo_command(args: Any) -> int:
    from treasure_engine._demo import run_demo

    return run_demo(demo_options(args))
