"""The network case's driver, run inside a `tests.support.netfault.Namespace` (it reaches nothing outside):

    python -m tests.support.netem_driver OUT_DIR RATE BEFORE_S FAULT_S AFTER_S

Starts kinesalite and a 2-shard stream inside the namespace, feeds the checker's events through an ordered
`Producer` at RATE per second, printing ``fault`` after BEFORE_S (the parent then sets netem on the loopback) and
``clear`` after FAULT_S more; flushes after AFTER_S more; then reads the stream back with the independent reader
and writes it as the checker's batch frames (one batch per shard, parents first) to ``OUT_DIR/read.out``, and
the accepted ids' range as ``first last`` to ``OUT_DIR/accepted``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from itertools import groupby
from pathlib import Path
from typing import Any

from tests.support.chaos import Feeder, producer_config
from tests.support.emulators import Kinesalite, create_stream
from tests.support.kinesis_reader import read_all

from treasure_engine import Producer


async def main(out: Path, rate: float, before_s: float, fault_s: float, after_s: float) -> None:
    with Kinesalite() as kinesalite:
        create_stream(kinesalite.endpoint_url, "netem", 2)
        config = producer_config("netem", kinesalite.endpoint_url, out / "producer", request_timeout_s=2.0)
        async with Producer(config) as producer:
            feeder = Feeder(producer)
            await feeder.run(rate, duration_s=before_s)
            print("fault", flush=True)
            await feeder.run(rate, duration_s=fault_s)
            print("clear", flush=True)
            await feeder.run(rate, duration_s=after_s)
            await producer.flush(timeout=120)
        records = await asyncio.to_thread(read_all, kinesalite.endpoint_url, "netem")
    write_frames(out / "read.out", records)
    (out / "accepted").write_text(f"{feeder.accepted[0]} {feeder.accepted[-1]}")
    print("done", flush=True)


def write_frames(path: Path, records: list[dict[str, Any]]) -> None:
    """The records read back, as the checker's batch frames: one batch per shard, in the reader's order."""
    with open(path, "wb") as f:
        for shard, group in groupby(records, key=lambda r: r["shard_id"]):
            rows = [r["data"] for r in group]
            head = b"@%d %s %d\n" % (time.monotonic_ns(), shard.encode(), len(rows))
            f.write(head + b"".join(d + b"\n" for d in rows))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), *map(float, sys.argv[2:6])))  # type: ignore[arg-type]
