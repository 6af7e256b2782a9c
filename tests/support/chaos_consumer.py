"""A consumer worker process for the chaos cases.

    python -m tests.support.chaos_consumer CONFIG_JSON OUT_FILE [--downstream URL] [--poison]

Runs a `Consumer` (CONFIG_JSON: ConsumerConfig fields as a JSON object) whose handler turns each batch into the
checker's frame (`tests.support.chaos.frame`) and either appends it to OUT_FILE in one write, or, with
``--downstream``, POSTs it through a `Downstream` to URL (the scripted downstream records what it accepted) and
fails the batch unless the answer is 2xx. ``--poison``: a batch holding a record marked poison raises (the
consumer bisects it and dead-letters that record). Prints ``ready <worker id>``; SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from tests.support.chaos import POISON, frame

from treasure_engine import Consumer, ConsumerConfig, Downstream, DownstreamConfig, Record


class PoisonRecord(Exception):
    """A record the handler cannot process, whatever the attempt."""


async def main(config: ConsumerConfig, out_path: str, downstream_url: str | None, poison: bool) -> None:
    out = open(out_path, "ab", buffering=0)  # noqa: ASYNC230, SIM115 - one small write per batch
    downstream = None
    if downstream_url is not None:
        # One attempt per call: retrying is the consumer's job (backoff, bisecting, its breaker).
        downstream = Downstream(downstream_url, DownstreamConfig(timeout_s=5.0, max_attempts=1, limiter="fixed"))
        await downstream.start()

    async def handle(records: list[Record]) -> None:
        if poison and any(POISON in r.data for r in records):
            raise PoisonRecord("a poison record in the batch")
        body = frame(records)
        if downstream is None:
            out.write(body)
            return
        response = await downstream.post("/batch", data=body)
        if not response.ok:
            raise RuntimeError(f"downstream answered {response.status}")

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with Consumer(config, handle) as consumer:
            print(f"ready {consumer.worker_id}", flush=True)
            await stop.wait()
    finally:
        if downstream is not None:
            await downstream.close()
        out.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--downstream")
    parser.add_argument("--poison", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(ConsumerConfig.from_dict(json.loads(args.config)), args.out, args.downstream, args.poison))
