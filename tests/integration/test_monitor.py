"""The monitor end to end: a real producer on kinesalite (behind the fault proxy where an outage is needed), a
real consumer with leases in moto's DynamoDB, a webhook receiver (aiohttp on 127.0.0.1), and the HTTP endpoints.

Run with ``-s`` to see the measured figures (alert delay).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from tests.support.emulators import Dynalite, Kinesalite, MotoServer
from tests.support.faultproxy import FaultProxy

from treasure_engine import (
    BreakerConfig,
    BufferFull,
    Consumer,
    ConsumerConfig,
    Producer,
    ProducerConfig,
    Record,
    breakers,
)
from treasure_engine.monitoring._catalog import CATALOG, PREFIX
from treasure_engine.monitoring._lag import LagStatus
from treasure_engine.monitoring._monitor import Monitor, MonitorConfig
from treasure_engine.monitoring._rules import Alert, AlertRule, AlertState

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAST: dict[str, Any] = {"shard_records_per_s": 1e9, "shard_bytes_per_s": 1e9, "linger_ms": 5.0, "region": "us-east-1"}


@dataclass
class Receiver:
    """A webhook receiver: records every JSON body with its arrival time; answers `statuses` first, then 200."""

    url: str = ""
    bodies: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    attempts: int = 0
    delay_s: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.json()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        self.bodies.append((time.monotonic(), body))
        return web.Response(status=200)

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        return [
            a for _, b in self.bodies for a in b["alerts"] if a["labels"]["alertname"] == name and a["status"] == status
        ]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    r.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield r
    finally:
        await runner.cleanup()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def get(url: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read(), response.headers.get("Content-Type", "")


def scrape_families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def family_name(name: str) -> str:
    """The family name prometheus_client's parser gives a catalog metric (counters lose `_total`)."""
    kind, _ = CATALOG[name]
    full = PREFIX + name
    return full[: -len("_total")] if kind == "counter" and full.endswith("_total") else full


# --- 1. a stalled endpoint: backlog_critical within a second, to the webhook, resolved after recovery ------


async def test_stalled_endpoint_fires_backlog_critical_within_a_second(
    kinesalite: Kinesalite, stream_factory: Callable[..., str], async_fault_proxy: FaultProxy, receiver: Receiver
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 1)
    proxy = async_fault_proxy
    proxy.set(fault_targets={"PutRecords"})
    ring = 1024 * 1024
    config = ProducerConfig(
        stream=stream,
        endpoint_url=proxy.endpoint_url,
        ring_bytes=ring,
        max_record_bytes=16 * 1024,
        aggregation_max_bytes=16 * 1024,
        max_request_bytes=64 * 1024,
        max_buffered_bytes=128 * 1024,
        max_in_flight=2,
        **FAST,
    )
    critical = ring * config.critical_backlog
    fired: list[tuple[float, Alert]] = []
    monitor = Monitor(MonitorConfig(port=0, webhook_url=receiver.url, resolve_after_s=0.5, webhook_backoff_s=0.05))
    monitor.on_alert(lambda a: fired.append((time.monotonic(), a)))
    event = b"x" * 500
    sent = 0
    async with monitor, Producer(config) as producer:
        name = monitor.watch_producer(producer)
        await asyncio.sleep(0.3)  # a few evaluations of a healthy producer first
        assert not [a for _, a in fired if a.name == "backlog_critical"]
        proxy.stall = True
        crossed: float | None = None
        deadline = time.monotonic() + 10
        # Fill the ring steadily (about 1 MB/s), sampling the backlog after each chunk, until the alert fires.
        while not [a for _, a in fired if a.name == "backlog_critical"]:
            assert time.monotonic() < deadline, "backlog_critical never fired"
            for _ in range(20):
                try:
                    producer.submit(event, f"k{sent % 97}")
                    sent += 1
                except BufferFull:
                    break
            if crossed is None and producer.stats_dict()["ring_bytes_used"] >= critical:
                crossed = time.monotonic()
            await asyncio.sleep(0.01)
        assert crossed is not None, "the alert fired before the backlog crossed its threshold"
        at, alert = next((t, a) for t, a in fired if a.name == "backlog_critical")
        delay = at - crossed
        print(f"\n[backlog_critical] fired {delay * 1000:.0f} ms after the ring crossed {critical:.0f} bytes")
        assert delay < 1.0, f"backlog_critical fired {delay:.3f}s after the threshold was crossed"
        assert alert.state is AlertState.FIRING
        assert alert.severity == "critical"
        assert alert.labels["name"] == name

        status, body, _ = await get(monitor.url + "/readyz")
        assert status == 503
        assert "backlog critical" in body.decode()
        await wait_for(lambda: bool(receiver.alerts("backlog_critical", "firing")), 5, "the firing webhook")
        payload = next(b for _, b in receiver.bodies if b["alerts"][0]["labels"]["alertname"] == "backlog_critical")
        assert payload["version"] == "4"
        assert payload["status"] == "firing"
        assert payload["groupLabels"] == {"alertname": "backlog_critical"}
        assert payload["commonLabels"]["severity"] == "critical"
        assert payload["externalURL"] == monitor.url
        item = payload["alerts"][0]
        assert item["labels"] == {"alertname": "backlog_critical", "severity": "critical", "name": name}
        assert item["endsAt"] == "0001-01-01T00:00:00Z"
        assert item["startsAt"].endswith("Z")
        assert item["generatorURL"] == monitor.url + "/status"
        assert len(item["fingerprint"]) == 16
        assert "critical" in item["annotations"]["summary"]

        recovered = time.monotonic()
        proxy.stall = False
        await wait_for(lambda: bool(receiver.alerts("backlog_critical", "resolved")), 20, "the resolved webhook")
        resolved = receiver.alerts("backlog_critical", "resolved")[0]
        assert resolved["fingerprint"] == item["fingerprint"]
        assert resolved["endsAt"] != "0001-01-01T00:00:00Z"
        print(f"[backlog_critical] resolved {time.monotonic() - recovered:.2f} s after the endpoint recovered")
        assert [a.state for a in monitor.alerts() if a.name == "backlog_critical"] == [AlertState.RESOLVED]
        await producer.flush(timeout=30)
        stats = producer.stats()
    assert stats.accepted == sent
    assert stats.delivered == sent
    assert stats.dead_lettered == 0


# --- 2. a scrape holds every metric; /readyz follows the endpoint breaker -----------------------------------


async def handle_records(records: list[Record]) -> None:
    await asyncio.sleep(0)


async def test_scrape_holds_every_metric_and_readyz_follows_the_breaker(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 2)
    producer_config = ProducerConfig(
        stream=stream, endpoint_url=kinesalite.endpoint_url, state_dir=str(tmp_path), **FAST
    )
    consumer_config = ConsumerConfig(
        stream=stream,
        application=f"mon-{time.monotonic_ns() % 10**9}",
        endpoint_url=kinesalite.endpoint_url,
        dynamodb_endpoint_url=dynalite.endpoint_url,
        region="us-east-1",
        idle_poll_ms=100.0,
        max_batch_wait_ms=20.0,
        lease_duration_s=3.0,
        state_dir=str(tmp_path / "consumer"),
        breaker=BreakerConfig(minimum_calls=1, window_size=10),
    )
    monitor = Monitor(MonitorConfig(port=0, dlq_refresh_s=0.2))
    handled = 0

    async def handle(records: list[Record]) -> None:
        nonlocal handled
        handled += len(records)

    try:
        async with monitor, Producer(producer_config) as producer, Consumer(consumer_config, handle) as consumer:
            monitor.watch_producer(producer, name="orders")
            monitor.watch_consumer(consumer, name="rewards")
            for i in range(500):
                producer.submit(b'{"n": %d}' % i, f"user-{i % 37}")
            await producer.flush(timeout=30)
            await wait_for(lambda: handled >= 500, 30, "the consumer to handle every record")
            await wait_for(lambda: all(d.stats is not None for d in monitor._collector.dlqs.values()), 5, "DLQ figures")
            await asyncio.sleep(0.3)

            status, body, content_type = await get(monitor.url + "/metrics")
            assert status == 200
            assert content_type.startswith("text/plain; version=0.0.4")
            families = scrape_families(body.decode())
            missing = [n for n in CATALOG if family_name(n) not in families]
            assert not missing, f"metrics missing from the scrape: {missing}"
            for name in CATALOG:
                assert families[family_name(name)].samples, name

            def value(metric: str, /, **labels: str) -> float:
                family = families[family_name(metric)]
                return sum(s.value for s in family.samples if labels.items() <= s.labels.items())

            assert value("events_accepted_total", name="orders") == 500
            assert value("events_delivered_total", name="orders") == 500
            assert value("backlog_events", name="orders") == 0
            assert value("requests_total", name="orders", result="ok") >= 1
            assert value("consumer_records_handled_total", name="rewards") == 500
            assert value("consumer_leases", name="rewards") == 2
            assert value("consumer_lag_status", name="rewards") == 0
            assert value("breaker_open", name=f"kinesis:{stream}") == 0
            assert value("dlq_entries", name="orders") == 0
            count = [s for s in families[PREFIX + "request_duration_seconds"].samples if s.name.endswith("_count")]
            assert sum(s.value for s in count) >= 1
            handler_calls = families[PREFIX + "consumer_handler_duration_seconds"].samples
            assert sum(s.value for s in handler_calls if s.name.endswith("_count")) >= 1

            assert (await get(monitor.url + "/healthz"))[0] == 200
            status, body, _ = await get(monitor.url + "/readyz")
            assert status == 200, body
            breaker = producer.endpoint_breaker
            assert breaker is not None
            breaker.force_open()
            try:
                status, body, _ = await get(monitor.url + "/readyz")
                assert status == 503
                assert f"endpoint breaker kinesis:{stream} is forced_open" in body.decode()
            finally:
                breaker.close()
            assert (await get(monitor.url + "/readyz"))[0] == 200

            status, body, content_type = await get(monitor.url + "/status")
            assert status == 200
            assert content_type.startswith("application/json")
            data = json.loads(body)
            assert data["producers"]["orders"]["delivered"] == 500
            assert set(data["consumers"]["rewards"]["shards"]) == {"shardId-000000000000", "shardId-000000000001"}
            assert {a["name"] for a in data["alerts"]} >= {"backlog_critical", "consumer_stalled"}
            assert data == data | {"state": "running", "ready": True}
            check_deploy_files(families)
    finally:
        breakers.remove(f"{consumer_config.application}-downstream")


def check_deploy_files(families: dict[str, Any]) -> None:
    """deploy/prometheus/alerts.yml and deploy/grafana/dashboard.json refer only to metrics a real scrape holds."""
    exposed = {s.name for f in families.values() for s in f.samples} | set(families)
    token = re.compile(r"\b(treasure_engine_[a-z0-9_]+)")
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    dashboard = json.loads((ROOT / "deploy/grafana/dashboard.json").read_text())
    targets = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets
    for expr in exprs + targets:
        names = token.findall(expr)
        assert names, expr
        unknown = [n for n in names if n not in exposed]
        assert not unknown, f"{expr!r} refers to {unknown}, which no scrape holds"


# --- 3. the webhook retries and never holds the evaluator up ------------------------------------------------


async def test_webhook_retries_and_never_blocks_the_evaluator(receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    name = f"mon-test-{time.monotonic_ns() % 10**9}"
    breaker = breakers.get(name, BreakerConfig())
    rule = AlertRule(name="test_open", expr=f'breaker_open{{name="{name}"}} == 1', summary="{name} is open")
    monitor = Monitor(
        MonitorConfig(
            port=None,
            default_rules=False,
            rules=(rule,),
            resolve_after_s=0.0,
            webhook_url=receiver.url,
            webhook_backoff_s=0.05,
            webhook_timeout_s=0.5,
        )
    )
    try:
        async with monitor:
            breaker.force_open()
            await wait_for(lambda: bool(receiver.alerts("test_open", "firing")), 5, "the firing post")
            assert receiver.attempts == 3  # 500, 503, then 200
            receiver.delay_s = 1.0  # a receiver that hangs: posts time out and are retried in the background
            breaker.close()
            before = monitor.snapshot()["evaluations"]
            await asyncio.sleep(1.0)
            evaluations = monitor.snapshot()["evaluations"] - before
            assert evaluations >= 3, f"only {evaluations} evaluations in 1 s while the webhook hung"
            webhook = monitor.snapshot()["webhook"]
            assert webhook["sent"] == 1
            assert webhook["retries"] >= 2
            receiver.delay_s = 0.0
    finally:
        breakers.remove(name)


# --- 4. lag status on a real consumer -------------------------------------------------------------------


async def test_real_consumer_lag_status_stall_and_stop(
    moto_server: MotoServer, dynalite: Dynalite, stream_factory: Callable[..., str]
) -> None:
    """Two shards of a moto stream (moto reports MillisBehindLatest; kinesalite always says 0): the handler
    keeps failing the records of shard 0 (read, attempted, never checkpointed: STALL) and never returns for
    shard 1 (nothing moves: STOP)."""
    endpoint = moto_server.endpoint_url
    stream = stream_factory(endpoint, 2)
    client = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1")
    hash_keys = {"shardId-000000000000": "1", "shardId-000000000001": str(2**127 + 1)}
    for shard, key in hash_keys.items():
        client.put_records(
            StreamName=stream,
            Records=[{"Data": b"%d" % i, "PartitionKey": shard, "ExplicitHashKey": key} for i in range(30)],
        )
    await asyncio.sleep(1.1)  # the newest records come later: the consumer reads behind them
    for shard, key in hash_keys.items():
        client.put_record(StreamName=stream, Data=b"late", PartitionKey=shard, ExplicitHashKey=key)
    hang = asyncio.Event()

    async def handle(records: list[Record]) -> None:
        if records[0].shard_id == "shardId-000000000000":
            raise RuntimeError("downstream rejects it")
        await hang.wait()

    config = ConsumerConfig(
        stream=stream,
        application=f"lag-{time.monotonic_ns() % 10**9}",
        endpoint_url=endpoint,
        dynamodb_endpoint_url=dynalite.endpoint_url,
        region="us-east-1",
        get_records_limit=10,
        batch_size=10,
        max_batch_wait_ms=0.0,
        idle_poll_ms=100.0,
        max_attempts=10_000,
        bisect_on_error=False,
        backoff_base_s=0.02,
        backoff_max_s=0.1,
        shutdown_timeout_s=0.5,
    )
    seen: dict[str, set[str]] = {}
    monitor = Monitor(MonitorConfig(port=0, lag_window_s=1.0))
    monitor.on_alert(lambda a: seen.setdefault(a.name, set()).add(a.labels.get("shard", "")))
    async with monitor, Consumer(config, handle) as consumer:
        monitor.watch_consumer(consumer, name="lagging")
        statuses = monitor._collector.lag_status
        want = {
            ("lagging", "shardId-000000000000"): LagStatus.STALL,
            ("lagging", "shardId-000000000001"): LagStatus.STOP,
        }
        await wait_for(lambda: all(statuses.get(k) == v for k, v in want.items()), 15, f"lag statuses {want}")
        families = scrape_families((await get(monitor.url + "/metrics"))[1].decode())
        by_shard = {s.labels["shard"]: s.value for s in families[PREFIX + "consumer_lag_status"].samples}
        assert by_shard == {"shardId-000000000000": 2.0, "shardId-000000000001": 3.0}
        await wait_for(lambda: len(seen.get("consumer_stalled", ())) == 2, 2, "consumer_stalled for both shards")
        hang.set()
