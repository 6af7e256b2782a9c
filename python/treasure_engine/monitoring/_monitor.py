"""The Monitor: metrics over HTTP (Prometheus text), health endpoints, and alert rules with notifiers.

```python
async with Monitor(MonitorConfig(webhook_url="http://127.0.0.1:9000/hook")) as monitor:
    monitor.watch_producer(producer)
    monitor.watch_consumer(consumer)
    monitor.on_alert(lambda alert: print(alert.name, alert.state, alert.summary))
```

Endpoints on `127.0.0.1:9464` by default: `/metrics`, `/healthz`, `/readyz`, `/status`. Every `evaluate_every_s`
(250 ms) the monitor samples the lag of each shard, takes a snapshot of every metric and evaluates the rules.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import math
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self

import msgspec

from treasure_engine._core import ConfigError
from treasure_engine._validate import _check, _check_types
from treasure_engine.breaker import CircuitBreaker
from treasure_engine.dlq import DeadLetterQueue
from treasure_engine.monitoring._exposition import Encoder
from treasure_engine.monitoring._lag import LagStatus, LagTracker
from treasure_engine.monitoring._notifiers import WebhookNotifier
from treasure_engine.monitoring._rules import Alert, AlertRule, AlertState, RuleEvaluator, merge_rules
from treasure_engine.monitoring._snapshot import ConsumerLike, ProducerLike, SnapshotCollector, shard_stats

__all__ = ["Alert", "AlertCallback", "AlertRule", "AlertState", "LagStatus", "Monitor", "MonitorConfig", "MonitorState"]

log = logging.getLogger("treasure_engine.monitor")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's content type."""

AlertCallback = Callable[[Alert], Awaitable[None] | None]
"""Called with each alert that fires or resolves; a coroutine function runs as a task of its own."""


class MonitorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the monitor serves, how often it evaluates, its alert rules and where alerts go. Durations are
    seconds."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds; a public address (0.0.0.0) only if you set it."""
    port: int | None = 9464
    """Port of the HTTP server; 0 picks a free one (`monitor.url` tells which); None serves nothing."""
    evaluate_every_s: float = 0.25
    """How often the rules are evaluated (and the lag sampled)."""
    default_rules: bool = True
    """Evaluate the default rules (docs/monitoring.md); a rule in `rules` of the same name replaces one."""
    rules: Sequence[AlertRule] = ()
    """Alert rules (`AlertRule`), evaluated with the defaults; kept as a tuple."""
    resolve_after_s: float = 5.0
    """How long a firing alert's condition must be false before it resolves (unless the rule says)."""
    resolved_keep_s: float = 300.0
    """How long a resolved alert stays listed (`alerts()`, /status) before it counts as inactive."""
    alert_labels: dict[str, str] | None = None
    """Labels added to every alert (service, environment), for Alertmanager's routing."""
    webhook_url: str | None = None
    """Where firing and resolved alerts are posted, as Alertmanager's webhook JSON (version 4)."""
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 5
    """Attempts per notification (connection errors, timeouts, 429 and 5xx are retried)."""
    webhook_backoff_s: float = 0.5
    """First retry delay; doubles per attempt, with jitter, up to webhook_backoff_max_s."""
    webhook_backoff_max_s: float = 10.0
    webhook_queue_size: int = 1000
    """Notifications waiting to be posted; when full, the oldest is dropped (and counted)."""
    external_url: str | None = None
    """Base of the alerts' generatorURL and the payload's externalURL; default the monitor's own URL."""
    lag_window_s: float = 30.0
    """The window over which each shard's lag status is judged (OK / WARN / STALL / STOP)."""
    dlq_refresh_s: float = 5.0
    """How often the dead-letter queues' figures are read (each read scans the log, in a worker thread)."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check("host", bool(self.host), "must not be empty", self.host)
        _check("port", self.port is None or 0 <= self.port <= 65535, "must be in [0, 65535] or None", self.port)
        _check("evaluate_every_s", 0.01 <= self.evaluate_every_s <= 60, "must be in [0.01, 60]", self.evaluate_every_s)
        _check("resolve_after_s", 0 <= self.resolve_after_s < 1e6, "must be >= 0", self.resolve_after_s)
        _check("resolved_keep_s", 0 <= self.resolved_keep_s < 1e9, "must be >= 0", self.resolved_keep_s)
        _check(
            "webhook_url",
            self.webhook_url is None or self.webhook_url.startswith(("http://", "https://")),
            "must be an http:// or https:// URL",
            self.webhook_url,
        )
        _check("webhook_timeout_s", self.webhook_timeout_s > 0, "must be > 0", self.webhook_timeout_s)
        _check("webhook_max_attempts", self.webhook_max_attempts >= 1, "must be >= 1", self.webhook_max_attempts)
        _check("webhook_backoff_s", self.webhook_backoff_s >= 0, "must be >= 0", self.webhook_backoff_s)
        _check(
            "webhook_backoff_max_s",
            self.webhook_backoff_max_s >= self.webhook_backoff_s,
            "must be >= webhook_backoff_s",
            self.webhook_backoff_max_s,
        )
        _check("webhook_queue_size", self.webhook_queue_size >= 1, "must be >= 1", self.webhook_queue_size)
        _check("lag_window_s", 0 < self.lag_window_s <= 86400, "must be in (0, 86400]", self.lag_window_s)
        _check("dlq_refresh_s", self.dlq_refresh_s > 0, "must be > 0", self.dlq_refresh_s)
        _check(
            "rules",
            isinstance(self.rules, (tuple, list)) and all(isinstance(r, AlertRule) for r in self.rules),
            "must be a sequence of AlertRule",
            self.rules,
        )
        msgspec.structs.force_setattr(self, "rules", tuple(self.rules))
        _check(
            "alert_labels",
            self.alert_labels is None
            or (
                isinstance(self.alert_labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in self.alert_labels.items())
            ),
            "must map strings to strings",
            self.alert_labels,
        )
        merge_rules(self.rules, defaults=self.default_rules)  # two rules of one name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorConfig:
        """Builds a config from plain data (TOML, JSON), naming the offending field or rule on error."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as e:
            raise ConfigError(f"invalid configuration: {e}") from None


class MonitorState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


def _short(stream: str) -> str:
    return stream.rsplit("/", 1)[-1]


class Monitor:
    """Serves metrics and health, evaluates alert rules and notifies. Start it with `async with` or `start()`;
    watch components before or after."""

    def __init__(self, config: MonitorConfig | None = None) -> None:
        config = MonitorConfig() if config is None else config
        if not isinstance(config, MonitorConfig):
            raise TypeError(f"config must be a MonitorConfig, not {type(config).__name__}")
        self.config = config
        self.state = MonitorState.NEW
        self._rules = merge_rules(config.rules, defaults=config.default_rules)
        self._evaluator = RuleEvaluator(
            self._rules,
            resolve_after_s=config.resolve_after_s,
            resolved_keep_s=config.resolved_keep_s,
            extra_labels=config.alert_labels,
        )
        self._collector = SnapshotCollector()
        sample_every_s = max(config.evaluate_every_s, config.lag_window_s / 30)
        self._lag = LagTracker(config.lag_window_s, sample_every_s=sample_every_s)
        self._encoder = Encoder()
        self._callbacks: list[AlertCallback] = []
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self._webhook: WebhookNotifier | None = None
        if config.webhook_url is not None:
            self._webhook = WebhookNotifier(
                config.webhook_url,
                timeout_s=config.webhook_timeout_s,
                max_attempts=config.webhook_max_attempts,
                backoff_s=config.webhook_backoff_s,
                backoff_max_s=config.webhook_backoff_max_s,
                queue_size=config.webhook_queue_size,
                external_url=self._external_url,
            )
        self._runner: Any = None
        self._port: int | None = config.port
        self._tasks: list[asyncio.Task[None]] = []
        self._evaluations = 0
        self._evaluation_errors = 0
        self._last_evaluation_s = 0.0
        self._last_evaluated_at: float | None = None

    # --- watching ----------------------------------------------------------------------------------------

    def _unique(self, taken: dict[str, Any], base: str) -> str:
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        return name

    def watch_producer(self, producer: Any, name: str | None = None) -> str:
        """Reports a `Producer` (or `BackgroundProducer`) under `name` (default: its stream's name), with its
        endpoint breaker and its dead-letter queue; returns the name. While watched it records request
        latency and batch sizes."""
        p: ProducerLike = getattr(producer, "producer", producer)
        if p.attached_metrics is not None:
            raise ValueError("this producer is already watched by another Monitor")
        if name is None:
            name = self._unique(self._collector.producers, _short(p.config.stream))
        self._collector.add_producer(name, p)
        self._collector.add_dlq(self._unique(self._collector.dlqs, name), lambda: p.dead_letter_queue)
        return name

    def watch_consumer(self, consumer: Any, name: str | None = None) -> str:
        """Reports a `Consumer` under `name` (default: its application), with its breaker and its dead-letter
        queue, and samples each shard's lag; returns the name. While watched it records handler latency and
        batch sizes."""
        c: ConsumerLike = consumer
        if c.attached_metrics is not None:
            raise ValueError("this consumer is already watched by another Monitor")
        if name is None:
            name = self._unique(self._collector.consumers, c.config.application)
        self._collector.add_consumer(name, c)
        self._collector.add_dlq(self._unique(self._collector.dlqs, name), lambda: c.dead_letter_queue)
        return name

    def watch_dlq(self, dlq: DeadLetterQueue, name: str | None = None) -> str:
        """Reports a dead-letter queue (one written by another process, say) under `name` (default: its path)."""
        name = str(dlq.path) if name is None else name
        self._collector.add_dlq(name, lambda: dlq)
        return name

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Reports a breaker made without the registry (those of `treasure_engine.breakers`, of watched producers
        and of watched consumers are reported anyway)."""
        self._collector.extra_breakers.append(breaker)

    def on_alert(self, callback: AlertCallback) -> AlertCallback:
        """Calls `callback(alert)` for each alert that fires or resolves (usable as a decorator). A callback that
        raises is logged; a coroutine function is run as a task, never awaited by the evaluator."""
        self._callbacks.append(callback)
        return callback

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Starts the HTTP server (unless `port=None`), the evaluator and the notifiers. A Monitor starts once."""
        if self.state is not MonitorState.NEW:
            raise RuntimeError(f"a Monitor starts once (it is {self.state.value})")
        cfg = self.config
        if cfg.port is not None:
            from aiohttp import web

            app = web.Application()
            app.router.add_get("/metrics", self._handle_metrics)
            app.router.add_get("/healthz", self._handle_healthz)
            app.router.add_get("/readyz", self._handle_readyz)
            app.router.add_get("/status", self._handle_status)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                site = web.TCPSite(runner, cfg.host, cfg.port)
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
            self._runner = runner
            addresses = runner.addresses
            if addresses:
                self._port = int(addresses[0][1])
        if self._webhook is not None:
            await self._webhook.start()
        self._tasks = [
            asyncio.create_task(self._evaluate_forever(), name="treasure-engine-monitor-evaluator"),
            asyncio.create_task(self._refresh_dlqs_forever(), name="treasure-engine-monitor-dlq"),
        ]
        self.state = MonitorState.RUNNING
        log.info(
            "monitor started%s: %d alert rule(s), evaluated every %.0f ms",
            f" on {self.url}" if cfg.port is not None else "",
            len(self._rules),
            cfg.evaluate_every_s * 1000,
            extra={"url": self.url if cfg.port is not None else None, "rules": [r.name for r in self._rules]},
        )

    async def stop(self) -> None:
        """Stops serving and evaluating, gives queued webhook posts a moment, stops recording. Idempotent."""
        if self.state is MonitorState.CLOSED:
            return
        was_running = self.state is MonitorState.RUNNING
        self.state = MonitorState.CLOSED
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._webhook is not None and was_running:
            await self._webhook.stop()
        if self._callback_tasks:
            await asyncio.gather(*list(self._callback_tasks), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._collector.detach()
        if was_running:
            log.info("monitor stopped")

    def __del__(self) -> None:
        if getattr(self, "state", MonitorState.CLOSED) is MonitorState.RUNNING:
            warnings.warn(
                "Monitor was never stopped (call `await monitor.stop()` or use `async with`)",
                ResourceWarning,
                stacklevel=1,
            )

    @property
    def url(self) -> str:
        """`http://host:port` of the HTTP server (the port picked when `port=0`, once started)."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    def _external_url(self) -> str:
        return self.config.external_url or (self.url if self.config.port is not None else "")

    # --- evaluation --------------------------------------------------------------------------------------

    def _shards(self) -> list[tuple[str, Any]]:
        return [(name, s) for name, cw in self._collector.consumers.items() for s in shard_stats(cw.consumer)]

    def evaluate(self) -> list[Alert]:
        """One evaluation now (the evaluator runs this every `evaluate_every_s`): samples the lag, takes a
        snapshot, moves the alerts' states and notifies; returns the alerts that fired or resolved."""
        started = time.perf_counter()
        now = time.monotonic()
        collector = self._collector
        collector.lag_status = self._lag.update(now, self._shards())
        snapshot = collector.collect_snapshot(now)
        changed = self._evaluator.evaluate(snapshot)
        collector.alerts_firing = self._evaluator.firing_counts()
        self._evaluations += 1
        self._last_evaluated_at = snapshot.wall
        self._last_evaluation_s = time.perf_counter() - started
        if changed:
            self._notify(changed)
        return changed

    async def _evaluate_forever(self) -> None:
        loop = asyncio.get_running_loop()
        every = self.config.evaluate_every_s
        next_at = loop.time()
        while True:
            try:
                self.evaluate()
            except Exception:
                self._evaluation_errors += 1
                log.exception("alert evaluation failed; trying again in %.2f s", every)
            next_at += every
            delay = next_at - loop.time()
            if delay < 0:  # late (a busy loop): start again from now rather than catching up
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    async def _refresh_dlqs_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._collector.refresh_dlqs)
            except Exception:
                log.exception("reading the dead-letter queues' figures failed")
            await asyncio.sleep(self.config.dlq_refresh_s)

    def _notify(self, changed: list[Alert]) -> None:
        groups: dict[str, list[Alert]] = {}
        for alert in changed:
            groups.setdefault(alert.name, []).append(alert)
            firing = alert.state is AlertState.FIRING
            level = logging.INFO
            if firing:
                level = logging.ERROR if alert.severity == "critical" else logging.WARNING
            # The series' labels in the line itself: a rule's alerts (one per shard, say) must read apart.
            series = ", ".join(f'{k}="{v}"' for k, v in sorted(alert.series.items()))
            log.log(
                level,
                "alert %s %s%s: %s",
                alert.name,
                "firing" if firing else "resolved",
                f" {{{series}}}" if series else "",
                alert.summary,
                extra={
                    "alertname": alert.name,
                    "alert_state": alert.state.value,
                    "severity": alert.severity,
                    "alert_labels": alert.labels,
                    "value": alert.value,
                },
            )
            for callback in list(self._callbacks):
                try:
                    result = callback(alert)
                    if inspect.isawaitable(result):
                        task = asyncio.ensure_future(result)
                        self._callback_tasks.add(task)
                        task.add_done_callback(self._callback_done)
                except Exception:
                    log.exception("alert callback %r failed", callback)
        if self._webhook is not None:
            for alerts in groups.values():
                self._webhook.notify(alerts)

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("alert callback failed", exc_info=task.exception())

    # --- what is served ----------------------------------------------------------------------------------

    def alerts(self) -> list[Alert]:
        """The alerts that are pending, firing or recently resolved; a rule with none is listed once, inactive."""
        return self._evaluator.alerts()

    @property
    def rules(self) -> list[AlertRule]:
        """The rules evaluated (the defaults merged with `config.rules`)."""
        return list(self._rules)

    def metrics_text(self) -> bytes:
        """The /metrics body: every metric now, in the Prometheus text format."""
        return self._encoder.encode(self._collector.collect_snapshot())

    def collector(self) -> SnapshotCollector:
        """A prometheus_client collector of the same metrics, for an application's own prometheus_client
        registry: `prometheus_client.REGISTRY.register(monitor.collector())`."""
        return self._collector

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons not): started, no producer's endpoint breaker open, no backlog critical, producers
        running, consumers started and not stopping."""
        reasons: list[str] = []
        if self.state is not MonitorState.RUNNING:
            reasons.append(f"monitor is {self.state.value}")
        for name, pw in self._collector.producers.items():
            p = pw.producer
            state = getattr(p, "state", None)
            if state is not None and getattr(state, "value", state) != "running":
                reasons.append(f"producer {name} is {getattr(state, 'value', state)}")
            breaker = p.endpoint_breaker
            if breaker is not None and breaker.state.value in ("open", "forced_open"):
                reasons.append(f"producer {name}: endpoint breaker {breaker.name} is {breaker.state.value}")
            s = p.stats_dict()
            ring = getattr(p.config, "ring_bytes", 0)
            if ring and (
                s.get("ring_bytes_used", 0) >= ring * getattr(p.config, "critical_backlog", 1.0)
                or s.get("spill_backlog_bytes", 0) > 0
            ):
                reasons.append(f"producer {name}: backlog critical")
        for name, cw in self._collector.consumers.items():
            c = cw.consumer
            if not getattr(c, "running", True):
                reasons.append(f"consumer {name} is not running")
        return not reasons, reasons

    def snapshot(self) -> dict[str, Any]:
        """What /status serves: every watched component's figures, the lag statuses, the breakers, the
        dead-letter queues, the alerts and the monitor's own state. JSON-ready."""
        collector = self._collector
        producers: dict[str, Any] = {}
        now = time.monotonic()
        for name, pw in collector.producers.items():
            p = pw.producer
            s: dict[str, Any] = dict(p.stats_dict())
            state = getattr(p, "state", None)
            breaker = p.endpoint_breaker
            s["state"] = getattr(state, "value", state)
            s["endpoint_breaker"] = breaker.state.value if breaker is not None else None
            s["oldest_event_age_s"] = s.get("oldest_event_age_s", pw.age.update(now, s["accepted"], s["in_flight"]))
            producers[name] = s
        consumers: dict[str, Any] = {}
        for name, cw in collector.consumers.items():
            shards = {}
            for stat in shard_stats(cw.consumer):
                d = stat.as_dict() if hasattr(stat, "as_dict") else dict(vars(stat))
                code = collector.lag_status.get((name, stat.shard_id))
                d["lag_status"] = LagStatus(code).name if code is not None else None
                shards[stat.shard_id] = d
            consumers[name] = {"leases": sum(1 for d in shards.values() if d.get("owned")), "shards": shards}
        breakers = {}
        for name, b in collector.breakers():
            m = msgspec.structs.asdict(b.metrics())
            m["state"] = b.state.value
            if not math.isfinite(m["open_remaining_s"]):
                m["open_remaining_s"] = None
            breakers[name] = m
        dlqs: dict[str, Any] = {}
        for name, dw in collector.dlqs.items():
            dlqs[name] = None if dw.stats is None else {**msgspec.structs.asdict(dw.stats), "read_at": dw.refreshed_at}
        ready, reasons = self.readiness()
        webhook = self._webhook
        return {
            "state": self.state.value,
            "url": self.url if self.config.port is not None else None,
            "ready": ready,
            "not_ready": reasons,
            "evaluations": self._evaluations,
            "evaluation_errors": self._evaluation_errors,
            "last_evaluated_at": self._last_evaluated_at,
            "last_evaluation_ms": round(self._last_evaluation_s * 1000, 3),
            "producers": producers,
            "consumers": consumers,
            "breakers": breakers,
            "dead_letter_queues": dlqs,
            "alerts": [a.to_dict() for a in self.alerts()],
            "webhook": None
            if webhook is None
            else {
                "url": webhook.url,
                "sent": webhook.sent,
                "failed": webhook.failed,
                "dropped": webhook.dropped,
                "retries": webhook.retries,
                "queued": webhook.queued,
            },
        }

    # --- HTTP --------------------------------------------------------------------------------------------

    async def _handle_metrics(self, _request: Any) -> Any:
        from aiohttp import web

        return web.Response(body=self.metrics_text(), headers={"Content-Type": CONTENT_TYPE})

    async def _handle_healthz(self, _request: Any) -> Any:
        from aiohttp import web

        evaluator = self._tasks[0] if self._tasks else None
        if evaluator is None or evaluator.done():
            return _json(web, {"status": "evaluator not running"}, 503)
        return _json(web, {"status": "ok"}, 200)

    async def _handle_readyz(self, _request: Any) -> Any:
        from aiohttp import web

        ready, reasons = self.readiness()
        return _json(web, {"ready": ready, "reasons": reasons}, 200 if ready else 503)

    async def _handle_status(self, _request: Any) -> Any:
        from aiohttp import web

        return _json(web, self.snapshot(), 200)


def _json(web: Any, body: Any, status: int) -> Any:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")
