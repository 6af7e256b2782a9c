"""Chaos: the Kinesis endpoint goes down in the middle of a burst, then comes back.

100,000 events are submitted over a few seconds through the fault proxy (in front of kinesalite); after the
first 30 % the proxy goes down for 3 s (10 s with ``TREASURE_CHAOS=full``): connections reset without an
answer, or every request answered 503. Afterwards every event must arrive exactly once (the proxy forwards
nothing while down, so retries cannot duplicate), with nothing dead-lettered.

The producer has no endpoint circuit breaker yet (DESIGN §3 plans one), so the requests it sends during the
outage are only counted at the proxy and bounded by ``outage_seconds * 1000``: backoff keeps retries from
turning into a storm. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from tests.support.emulators import Kinesalite
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.kinesis_reader import read_all

from treasure_engine import Producer, ProducerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FULL = os.environ.get("TREASURE_CHAOS") == "full"
OUTAGE_S = 10.0 if FULL else 3.0
N_EVENTS = 100_000


def _events(n: int, keys: int, seed: int) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    return [(b"%d:" % i + b"." * rng.randint(8, 120), f"k{rng.randrange(keys)}") for i in range(n)]


def _total_requests(proxy: ThreadedFaultProxy) -> tuple[int, int]:
    requests = proxy.snapshot()["requests"]
    return sum(requests.values()), int(requests["PutRecords"])


@pytest.mark.parametrize("down", ["reset", "503"])
async def test_endpoint_down_mid_burst_everything_delivered(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], fault_proxy: ThreadedFaultProxy, down: str
) -> None:
    ep = kinesalite.endpoint_url
    stream = stream_factory(ep, 4)
    events = _events(N_EVENTS, 5_000, seed=42)
    cfg = ProducerConfig(
        stream=stream, endpoint_url=fault_proxy.endpoint_url, region="us-east-1",
        shard_records_per_s=1e9, shard_bytes_per_s=1e9,  # the emulator does not throttle
    )  # fmt: skip
    chunks = 100
    per = N_EVENTS // chunks
    spread_s = OUTAGE_S + 2.0  # submissions go on before, during and after the outage
    outage: dict[str, Any] = {}
    t0 = time.monotonic()
    transitions: list[str] = []
    async with Producer(cfg) as p:
        assert p.endpoint_breaker is not None
        p.endpoint_breaker.on_transition(lambda _name, _old, new: transitions.append(str(new)))
        for c in range(chunks):
            if c == 30:
                outage["before"] = _total_requests(fault_proxy)
                outage["stats_before"] = p.stats()
                fault_proxy.down = down
                outage["t"] = time.monotonic()
            if "t" in outage and "after" not in outage and time.monotonic() - outage["t"] >= OUTAGE_S:
                outage["after"] = _total_requests(fault_proxy)
                outage["stats_after"] = p.stats()
                fault_proxy.down = False
            assert p.submit_many(events[c * per : (c + 1) * per]) == per
            await asyncio.sleep(spread_s / chunks)
        if "after" not in outage:
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage["t"])))
            outage["after"] = _total_requests(fault_proxy)
            outage["stats_after"] = p.stats()
            fault_proxy.down = False
        t_up = time.monotonic()
        await p.flush(timeout=120)
        t_end = time.monotonic()
        stats = p.stats()

    during_total = outage["after"][0] - outage["before"][0]
    during_put = outage["after"][1] - outage["before"][1]
    mid = outage["stats_after"]
    records = await asyncio.to_thread(read_all, ep, stream)
    counts: dict[int, int] = {}
    for r in records:
        i = int(r["data"].split(b":", 1)[0])
        counts[i] = counts.get(i, 0) + 1
    missing = N_EVENTS - len(counts)
    duplicates = sum(c - 1 for c in counts.values())
    print(
        f"\n[chaos down={down} outage={OUTAGE_S:.0f}s] {N_EVENTS} events in {t_end - t0:.2f}s "
        f"({N_EVENTS / (t_end - t0):,.0f} events/s overall); drained {t_end - t_up:.2f}s after recovery\n"
        f"  requests at the proxy during the outage: {during_total} ({during_put} PutRecords, "
        f"{during_total / OUTAGE_S:.1f}/s; bound {OUTAGE_S * 1000:.0f})\n"
        f"  at recovery: in_flight={mid.in_flight} delivered={mid.delivered} dead_lettered={mid.dead_lettered}"
        f" requests_failed={mid.requests_failed}\n"
        f"  final: {stats}\n  read back {len(records)}: missing={missing} duplicates={duplicates}\n"
        f"  endpoint breaker transitions: {transitions}"
    )
    assert during_put > 0, "the producer sent nothing during the outage: was the outage real?"
    assert mid.requests_failed > outage["stats_before"].requests_failed
    assert mid.in_flight > 0, mid  # events were held, not dropped nor delivered, while down
    # The endpoint breaker opens after a handful of failures (minimum 5 calls, plus what was already in flight),
    # then sends one probe per open period (1 s, doubling): no request storm.
    assert during_put <= 5 + cfg.max_in_flight + int(OUTAGE_S) + 2, f"{during_put} PutRecords in a {OUTAGE_S}s outage"
    assert during_total <= OUTAGE_S * 1000, f"{during_total} requests in a {OUTAGE_S}s outage: a retry storm"
    assert "open" in transitions, f"the endpoint breaker never opened: {transitions}"
    assert p.endpoint_breaker is not None
    assert p.endpoint_breaker.state.value == "closed", "closed again after recovery"
    assert stats.accepted == N_EVENTS, stats
    assert stats.in_flight == 0, stats
    assert stats.dead_lettered == 0, stats
    assert stats.delivered == N_EVENTS, stats
    assert missing == 0
    assert set(counts) == set(range(N_EVENTS))
    assert duplicates == 0  # nothing is forwarded while down, so nothing can be written twice
