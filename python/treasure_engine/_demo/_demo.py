"""`treasure-engine demo`: a peak-sale burst through the whole engine, and the books at the end.

On the embedded endpoint (moto's server in this process; `--endpoint-url` for another Kinesis, DynamoDB stays
embedded) it creates a stream and a lease table, starts a "rewards" service on 127.0.0.1 with a scripted slow
period and outage, produces a ramping burst of treasure-hunt events (a few per mille malformed), and consumes
them through a circuit breaker into the rewards service. Malformed events are poison: they end in the dead-letter
queue. During the outage the breaker opens and reading pauses: the stream is the buffer, nothing is
dead-lettered for it. The monitor serves /metrics, /readyz and /status while it runs, and its alerts are shown.

It ends with a reconciliation: produced, delivered to the rewards service (unique), dead-lettered, lost,
duplicates, alerts fired; the exit code is 0 only when nothing was lost.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from treasure_engine._core import Record
from treasure_engine._demo._embedded import create_stream
from treasure_engine._loop_thread import run
from treasure_engine.breaker import BreakerConfig, CircuitBreaker
from treasure_engine.config import ConsumerConfig, ProducerConfig
from treasure_engine.consumer import BatchResult, Consumer
from treasure_engine.downstream import Downstream, DownstreamConfig
from treasure_engine.producer import Producer, submit_waiting

__all__ = ["DemoOptions", "run_demo"]

log = logging.getLogger("treasure_engine.demo")

MALFORMED_EVERY = 331
"""One event in 331 (about 3 per mille) is malformed JSON: poison for the rewards handler."""
_ID = re.compile(rb'"id":(\d+)')


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 30.0
    """Seconds of the scripted burst; draining the backlog afterwards takes a few more."""
    rate: int = 4_000
    """Peak events per second."""
    shards: int = 4
    endpoint_url: str | None = None
    port: int = 9464
    """The monitor's port on 127.0.0.1 (0: any free port)."""
    as_json: bool = False
    report: str | None = None


@dataclass
class Script:
    """When the rewards service is slow and when it is down, as fractions of the duration."""

    duration: float
    slow: tuple[float, float] = (0.20, 0.35)
    down: tuple[float, float] = (0.40, 0.60)
    produce_until: float = 0.70
    slow_latency_s: float = 0.15

    def phase(self, elapsed: float) -> str:
        f = elapsed / self.duration
        if self.down[0] <= f < self.down[1]:
            return "outage"
        if self.slow[0] <= f < self.slow[1]:
            return "slow"
        if f < self.produce_until:
            return "peak" if f >= 0.1 else "ramp"
        return "drain"


class Rewards:
    """The downstream "rewards" service: an aiohttp app on 127.0.0.1 following the script."""

    def __init__(self, script: Script, started: float) -> None:
        self.script = script
        self.started = started
        self.unique: set[int] = set()
        self.total = 0
        self.refused = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        phase = self.script.phase(time.monotonic() - self.started)
        if phase == "outage":
            self.refused += 1
            return web.Response(status=503, text="rewards is down")
        if phase == "slow":
            await asyncio.sleep(self.script.slow_latency_s)
        ids = [int(x) for x in body.split(b",") if x]
        self.total += len(ids)
        self.unique.update(ids)
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/rewards", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def event(i: int) -> tuple[bytes, str]:
    """A treasure-hunt event and its partition key (the hunter); every MALFORMED_EVERY-th is broken JSON."""
    hunter = f"hunter-{(i * 7919) % 20_000}"
    if i % MALFORMED_EVERY == MALFORMED_EVERY - 1:
        return b'{"id":%d,"hunter":"%s","clue":' % (i, hunter.encode()), hunter
    return b'{"id":%d,"hunter":"%s","clue":%d,"points":%d}' % (i, hunter.encode(), i % 97, 10 + i % 50), hunter


@dataclass
class Books:
    produced: int = 0
    malformed: int = 0
    refused_waits: int = 0
    alerts: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)


class Demo:
    def __init__(self, options: DemoOptions, endpoint_url: str, dynamodb_url: str) -> None:
        self.o = options
        self.endpoint_url = endpoint_url
        self.dynamodb_url = dynamodb_url
        self.stream = f"treasure-demo-{os.getpid()}-{int(time.time())}"
        self.script = Script(options.duration)
        self.books = Books()
        self.state_dir = Path(tempfile.mkdtemp(prefix="treasure-demo-"))
        self.started = time.monotonic()
        self.monitor: Any = None

    # --- the handler ---------------------------------------------------------------------------------

    def handler(self, downstream: Downstream) -> Any:
        async def handle(records: list[Record]) -> BatchResult | None:
            good: list[bytes] = []
            bad: dict[Record, BaseException | str] = {}
            for r in records:
                try:
                    doc = orjson.loads(r.data)
                    good.append(b"%d" % doc["id"])
                except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                    bad[r] = ValueError(f"malformed treasure-hunt event: {e}")
            if good:
                response = await downstream.post("/rewards", data=b",".join(good))
                if not response.ok:
                    raise RuntimeError(f"rewards answered {response.status}")
            return BatchResult(failed=list(bad), reasons=bad) if bad else None

        return handle

    # --- producing -----------------------------------------------------------------------------------

    async def produce(self, producer: Producer) -> None:
        tick = 0.05
        end = self.o.duration * self.script.produce_until
        next_id = 0
        owed = 0.0
        while (elapsed := time.monotonic() - self.started) < end:
            ramp = min(1.0, 0.25 + 0.75 * elapsed / (0.3 * self.o.duration))
            owed += self.o.rate * ramp * tick
            n = int(owed)
            owed -= n
            batch = [event(i) for i in range(next_id, next_id + n)]
            _, waits = await submit_waiting(producer.submit_many, batch)  # the ring full: wait for room, never drop
            self.books.refused_waits += waits
            next_id += n
            self.books.produced = next_id
            self.books.malformed = (next_id + 1) // MALFORMED_EVERY
            await asyncio.sleep(tick)
        await producer.flush(timeout=120)

    # --- watching ------------------------------------------------------------------------------------

    def on_alert(self, alert: Any) -> None:
        entry = {
            "name": getattr(alert, "name", str(alert)),
            "state": str(getattr(getattr(alert, "state", ""), "value", getattr(alert, "state", ""))),
            "severity": getattr(alert, "severity", ""),
            "at_s": round(time.monotonic() - self.started, 2),
        }
        self.books.alerts.append(entry)

    def alert_states(self) -> dict[str, str]:
        """The latest state of each alert that changed state."""
        return {a["name"]: a["state"] for a in self.books.alerts}

    def sample(
        self, producer: Producer, consumer: Consumer, rewards: Rewards, breaker: CircuitBreaker
    ) -> dict[str, Any]:
        p = producer.stats_dict()
        shards = consumer.stats().values()
        lag = max((s["lag_ms"] or 0 for s in shards), default=0)
        lag_estimated = any(s["lag_estimated"] for s in shards)
        dlq = sum(s["records_dead_lettered"] for s in shards)
        return {
            "t": round(time.monotonic() - self.started, 2),
            "phase": self.script.phase(time.monotonic() - self.started),
            "produced": self.books.produced,
            "delivered_to_kinesis": p["delivered"],
            "backlog": p["in_flight"],
            "throttled": p["throttled"],
            "requests": p["requests"],
            "handled": len(rewards.unique),
            "dead_lettered": dlq,
            "lag_ms": lag,
            "lag_estimated": lag_estimated,
            "paused": any(s["paused"] for s in shards),
            "breaker": breaker.state.value,
            "firing": sorted(name for name, state in self.alert_states().items() if state == "firing"),
            "fired": sorted({a["name"] for a in self.books.alerts if a["state"] == "firing"}),
        }

    def dashboard(self, s: dict[str, Any], rewards: Rewards) -> Any:
        from rich.table import Table

        table = Table(title=f"treasure_engine demo: {self.stream}", title_justify="left", expand=False)
        table.add_column("", style="bold")
        table.add_column("", justify="right")
        rate = 0.0
        if len(self.books.timeline) >= 2:
            a, b = self.books.timeline[-2], self.books.timeline[-1]
            rate = (b["produced"] - a["produced"]) / max(1e-9, b["t"] - a["t"])
        breaker_style = {"closed": "green", "open": "red", "half_open": "yellow"}.get(s["breaker"], "white")
        rows = [
            ("time / phase", f"{s['t']:.1f} s / {s['phase']}"),
            ("ingest rate", f"{rate:,.0f} events/s"),
            ("produced", f"{s['produced']:,}"),
            ("in Kinesis", f"{s['delivered_to_kinesis']:,}"),
            ("producer backlog", f"{s['backlog']:,}"),
            ("PutRecords requests / throttled", f"{s['requests']:,} / {s['throttled']:,}"),
            ("rewarded (unique)", f"{s['handled']:,}"),
            ("consumer lag", _lag_text(s)),
            ("rewards breaker", f"[{breaker_style}]{s['breaker']}[/]"),
            ("refused by rewards", f"{rewards.refused:,}"),
            ("dead-lettered", f"{s['dead_lettered']:,}"),
            ("alerts firing now", ", ".join(s["firing"]) or "none"),
            ("alerts fired so far", ", ".join(s["fired"]) or "none"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table

    # --- the run -------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        rewards = Rewards(self.script, self.started)
        await rewards.start()
        breaker = CircuitBreaker(
            f"rewards-{os.getpid()}",
            BreakerConfig(window_size=20, minimum_calls=5, failure_rate=0.5, open_s=0.5, open_backoff=1.5,
                          open_max_s=2.0, half_open_calls=1),
        )  # fmt: skip
        producer = Producer(
            ProducerConfig(
                stream=self.stream,
                endpoint_url=self.endpoint_url,
                region="us-east-1",
                linger_ms=20,
                ordered=True,  # moto loses concurrent writes to one shard
                state_dir=str(self.state_dir / "producer"),
                app_name="treasure-demo",
            )
        )
        consumer_config = ConsumerConfig(
            stream=self.stream,
            application=f"treasure-demo-{os.getpid()}",
            region="us-east-1",
            endpoint_url=self.endpoint_url,
            dynamodb_endpoint_url=self.dynamodb_url,
            batch_size=250,
            parallelism=4,
            max_attempts=3,
            backoff_base_s=0.05,
            backoff_max_s=0.5,
            idle_poll_ms=200,
            max_batch_wait_ms=100,
            lease_duration_s=10,
            state_dir=str(self.state_dir / "consumer"),
            app_name="treasure-demo",
        )
        downstream = Downstream(
            rewards.url, DownstreamConfig(timeout_s=2.0, max_attempts=2, initial_limit=8, max_limit=64), breaker=breaker
        )
        await downstream.start()
        consumer = Consumer(consumer_config, self.handler(downstream), breaker=breaker)
        self.monitor = await self._start_monitor(breaker)
        live = None
        try:
            await producer.start()
            await consumer.start()
            if self.monitor is not None:
                self.monitor.watch_producer(producer, name="treasure-demo")
                self.monitor.watch_consumer(consumer, name="treasure-demo")
            if not self.o.as_json and sys.stdout.isatty():
                from rich.live import Live
                from rich.logging import RichHandler

                live = Live(refresh_per_second=4, transient=False)
                live.start()
                # Log lines above the dashboard, not through it.
                logging.getLogger().handlers = [RichHandler(console=live.console, show_path=False)]
            producing = asyncio.create_task(self.produce(producer))
            deadline = self.started + self.o.duration + 60.0
            while True:
                await asyncio.sleep(0.25)
                s = self.sample(producer, consumer, rewards, breaker)
                self.books.timeline.append(s)
                if live is not None:
                    live.update(self.dashboard(s, rewards))
                settled = producing.done() and s["handled"] + s["dead_lettered"] >= self.books.produced
                if settled and s["t"] >= self.o.duration * self.script.down[1]:
                    break
                if time.monotonic() > deadline:
                    log.error("the demo did not settle in time: reporting what it has")
                    break
            if producing.done():
                producing.result()
            else:
                producing.cancel()
            await asyncio.sleep(0.5)  # the last checkpoints and alert evaluations
            final = self.sample(producer, consumer, rewards, breaker)
        finally:
            if live is not None:
                live.stop()
            await consumer.stop()
            await producer.close(30)
            await downstream.close()
            if self.monitor is not None:
                await self.monitor.stop()
            await rewards.stop()
        return self.reconcile(final, producer, consumer, rewards)

    async def _start_monitor(self, breaker: CircuitBreaker) -> Any:
        try:
            from treasure_engine.monitoring import AlertRule, Monitor, MonitorConfig
        except ImportError:  # pragma: no cover - the monitor ships with the package
            return None
        rules = [
            AlertRule(
                name="rewards_down",
                expr=f'breaker_open{{name="{breaker.name}"}} == 1',
                for_s=0.0,
                severity="critical",
                summary="the rewards service is failing: its breaker is open, reading paused, the stream buffers",
            )
        ]
        monitor = Monitor(MonitorConfig(host="127.0.0.1", port=self.o.port, rules=rules))
        monitor.on_alert(self.on_alert)
        await monitor.start()
        return monitor

    def reconcile(
        self, final: dict[str, Any], producer: Producer, consumer: Consumer, rewards: Rewards
    ) -> dict[str, Any]:
        from treasure_engine.dlq import DeadLetterQueue

        dead_ids: set[int] = set()
        dead = 0
        for d in DeadLetterQueue(self.state_dir / "consumer" / "dlq").entries():
            dead += 1
            m = _ID.search(d.data)
            if m:
                dead_ids.add(int(m.group(1)))
        p = producer.stats_dict()
        produced = self.books.produced
        accounted = rewards.unique | dead_ids
        lost = len(set(range(produced)) - accounted)
        fired = sorted({a["name"] for a in self.books.alerts if a["state"] == "firing"})
        return {
            "stream": self.stream,
            "duration_s": round(time.monotonic() - self.started, 1),
            "produced": produced,
            "malformed_produced": self.books.malformed,
            "accepted_by_producer": p["accepted"],
            "delivered_to_kinesis": p["delivered"],
            "producer_dead_lettered": p["dead_lettered"],
            "delivered_to_rewards_unique": len(rewards.unique),
            "rewards_duplicates": rewards.total - len(rewards.unique),
            "dead_lettered": dead,
            "lost": lost,
            "refused_by_rewards_during_outage": rewards.refused,
            "producer_waits_for_room": self.books.refused_waits,
            "alerts_fired": fired,
            "alert_events": self.books.alerts,
            "state_dir": str(self.state_dir),
            "monitor": getattr(self.monitor, "url", None),
        }


def _lag_text(s: dict[str, Any]) -> str:
    """The dashboard's lag: an estimate once reading has stopped (kinesalite and moto report 0 behind), said so."""
    lag = f"{s['lag_ms']:,} ms"
    notes = [n for n, on in (("paused", s["paused"]), ("estimated", s["lag_estimated"])) if on]
    return ("~" if s["lag_estimated"] else "") + lag + (f" ({', '.join(notes)})" if notes else "")


def _start_embedded() -> Any:
    from treasure_engine._demo._embedded import EmbeddedAWS

    return EmbeddedAWS().start()


def run_demo(options: DemoOptions) -> int:
    """Runs the demo; returns the exit code (0 only when nothing was lost)."""
    embedded = _start_embedded()
    try:
        endpoint = options.endpoint_url or embedded.endpoint_url
        demo = Demo(options, endpoint, embedded.endpoint_url)
        create_stream(endpoint, demo.stream, options.shards)
        demo.started = time.monotonic()
        result = run(demo.run())
    finally:
        embedded.stop()
    if options.report:
        write_report(options.report, result, demo.books.timeline)
    if options.as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_books(result)
    return 0 if result["lost"] == 0 else 1


def print_books(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="the books", title_justify="left")
    table.add_column("")
    table.add_column("", justify="right")
    for key in (
        "produced",
        "delivered_to_kinesis",
        "delivered_to_rewards_unique",
        "rewards_duplicates",
        "malformed_produced",
        "dead_lettered",
        "lost",
        "refused_by_rewards_during_outage",
        "duration_s",
    ):
        value = result[key]
        style = "bold red" if key == "lost" and value else ("bold green" if key == "lost" else "")
        table.add_row(key.replace("_", " "), f"[{style}]{value:,}[/]" if style else f"{value:,}")
    table.add_row("alerts fired", ", ".join(result["alerts_fired"]) or "none")
    console = Console()
    console.print(table)
    console.print(f"dead letters kept in {result['state_dir']}/consumer/dlq (treasure-engine dlq list ...)")


def write_report(path: str, result: dict[str, Any], timeline: list[dict[str, Any]]) -> None:
    """An HTML page with an SVG chart of ingest and reward rates and the backlog over time."""
    width, height, pad = 900, 300, 40
    if len(timeline) < 2:
        timeline = [*timeline, *timeline] or [{"t": 0, "produced": 0, "handled": 0, "backlog": 0, "lag_ms": 0}] * 2
    t_max = max(s["t"] for s in timeline) or 1.0

    def rates(key: str) -> list[tuple[float, float]]:
        return [(b["t"], (b[key] - a[key]) / max(1e-9, b["t"] - a["t"])) for a, b in itertools.pairwise(timeline)]

    series = {
        "ingest events/s": (rates("produced"), "#1f77b4"),
        "rewarded events/s": (rates("handled"), "#2ca02c"),
        "producer backlog": ([(s["t"], float(s["backlog"])) for s in timeline], "#d62728"),
        "unrewarded backlog": (
            [(s["t"], float(s["produced"] - s["handled"] - s["dead_lettered"])) for s in timeline],
            "#ff7f0e",
        ),
    }
    y_max = max((v for points, _ in series.values() for _, v in points), default=1.0) or 1.0
    lines = []
    for points, colour in series.values():
        coords = " ".join(
            f"{pad + (t / t_max) * (width - 2 * pad):.1f},{height - pad - (v / y_max) * (height - 2 * pad):.1f}"
            for t, v in points
        )
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
    legend = "".join(
        f'<span style="color:{colour}">&#9632; {html.escape(label)}</span> ' for label, (_, colour) in series.items()
    )
    outage = [s["t"] for s in timeline if s["phase"] == "outage"]
    band = ""
    if outage:
        x0 = pad + (min(outage) / t_max) * (width - 2 * pad)
        x1 = pad + (max(outage) / t_max) * (width - 2 * pad)
        band = f'<rect x="{x0:.1f}" y="{pad}" width="{x1 - x0:.1f}" height="{height - 2 * pad}" fill="#fdd" />'
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in result.items()
        if k not in ("alert_events",)
    )
    page = f"""<!doctype html><meta charset="utf-8"><title>treasure_engine demo</title>
<h1>treasure_engine demo: {html.escape(result["stream"])}</h1>
<p>{legend}<span style="color:#c99">&#9632; rewards outage</span></p>
<svg width="{width}" height="{height}" style="border:1px solid #ccc">{band}
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>
<text x="{pad}" y="{pad - 10}" font-size="12">max {y_max:,.0f}</text>
<text x="{width - pad - 60}" y="{height - 10}" font-size="12">{t_max:.0f} s</text>
{"".join(lines)}</svg>
<h2>the books</h2><table border="1" cellpadding="4">{rows}</table>
"""
    Path(path).write_text(page, encoding="utf-8")
