"""Alert rules, their evaluation and states, the lag status, the age estimate and the exposition, on scripted
snapshots (no I/O, no clock: every time is given)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from treasure_engine import (
    BreakerConfig,
    CircuitBreaker,
    Consumer,
    ConsumerConfig,
    Producer,
    ProducerConfig,
    breakers,
)
from treasure_engine._core import ConfigError
from treasure_engine.consumer._types import ShardStats
from treasure_engine.monitoring._catalog import CATALOG, PREFIX, REGISTRY, Family, Snapshot
from treasure_engine.monitoring._exposition import Encoder, families_of
from treasure_engine.monitoring._expr import parse_expr
from treasure_engine.monitoring._lag import LagSample, LagStatus, LagTracker, lag_status
from treasure_engine.monitoring._monitor import Monitor, MonitorConfig
from treasure_engine.monitoring._notifiers import alertmanager_payload
from treasure_engine.monitoring._rules import DEFAULT_RULES, Alert, AlertRule, AlertState, RuleEvaluator
from treasure_engine.monitoring._snapshot import OldestAge

Series = Sequence[tuple[dict[str, str], Any]]


def snap(at: float, **metrics: Series) -> Snapshot:
    """A snapshot at monotonic time `at` (wall = 1e9 + at) holding `metrics`: name -> [(labels, value)]."""
    families = {}
    for name, series in metrics.items():
        kind, help = CATALOG.get(name, ("gauge", "test"))
        f = Family(name, help, kind)
        for labels, value in series:
            f.add(tuple(sorted(labels.items())), value)
        families[name] = f
    return Snapshot(families, at, 1e9 + at)


def run(evaluator: RuleEvaluator, steps: Iterable[tuple[float, dict[str, Series]]]) -> list[tuple[float, Alert]]:
    """Evaluates each (time, metrics) step; returns the notifications with their times."""
    out = []
    for at, metrics in steps:
        out.extend((at, a) for a in evaluator.evaluate(snap(at, **metrics)))
    return out


def ticks(start: float, stop: float, every: float = 0.25) -> list[float]:
    n = round((stop - start) / every)
    return [round(start + i * every, 6) for i in range(n + 1)]


# --- expressions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "backlog_events > 100000",
        "oldest_event_age_seconds > 5",
        "consumer_behind_latest_seconds>60",
        "rate(dead_lettered_total[1m]) > 0",
        'breaker_open{name="rewards"} == 1',
        'max(consumer_lag_status{name=~"app-.*", shard!="shardId-1"}) >= 2',
        "increase(records_throttled_total[30s]) >= 10",
        "request_duration_seconds_count > 0",
        "sum(rate(request_duration_seconds_count[5m])) < 1e3",
        'dead_lettered_total{source!~"prod.*",} != -1.5',
    ],
)
def test_valid_expressions(expr: str) -> None:
    AlertRule(name="ok", expr=expr)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("no_such_metric > 1", "unknown metric 'no_such_metric'"),
        ("backlog_events >", "expected a number"),
        ("backlog_events 5", "expected a comparison"),
        ("backlog_events > 1 and", "unexpected text"),
        ("rate(dead_lettered_total) > 0", "needs a range"),
        ("dead_lettered_total[1m] > 0", "needs rate"),
        ("rate(dead_lettered_total[0s]) > 0", "must be > 0"),
        ("rate(dead_lettered_total[1y]) > 0", "expected a duration"),
        ("foo(backlog_events) > 1", "unknown function foo"),
        ("rate(backlog_events[1m]) > 0", "needs a counter"),
        ("request_duration_seconds > 1", "is a histogram"),
        ("breaker_open{name=rewards} == 1", "quoted value"),
        ('breaker_open{name=~"("} == 1', "bad regular expression"),
        ('breaker_open{name~"x"} == 1', "label matcher"),
        ("max(backlog_events > 1", "')' closing max("),
        ("", "empty"),
    ],
)
def test_malformed_expressions_name_the_rule(expr: str, message: str) -> None:
    with pytest.raises(ConfigError, match="rule 'my_rule'") as info:
        AlertRule(name="my_rule", expr=expr)
    assert message in str(info.value)


def test_rule_fields_are_checked() -> None:
    with pytest.raises(ConfigError, match="name must be"):
        AlertRule(name="bad name", expr="backlog_events > 1")
    with pytest.raises(ConfigError, match="rule 'r': for_s"):
        AlertRule(name="r", expr="backlog_events > 1", for_s=-1)
    with pytest.raises(ConfigError, match="rule 'r': resolve_after_s"):
        AlertRule(name="r", expr="backlog_events > 1", resolve_after_s=math.inf)
    with pytest.raises(ConfigError, match="rule 'r': summary"):
        AlertRule(name="r", expr="backlog_events > 1", summary="{value!z}")
    with pytest.raises(ConfigError, match="severity"):
        AlertRule(name="r", expr="backlog_events > 1", severity="")
    with pytest.raises(ConfigError, match="for_s"):
        AlertRule(name="r", expr="backlog_events > 1", for_s="1")  # type: ignore[arg-type]


def test_parse_expr_structure() -> None:
    e = parse_expr('max(rate(dead_lettered_total{name="a", shard=~"s.*"}[90s])) >= 0.5')
    assert (e.metric, e.function, e.range_s, e.aggregation, e.op, e.threshold) == (
        "dead_lettered_total",
        "rate",
        90.0,
        "max",
        ">=",
        0.5,
    )
    assert [(m.label, m.op, m.value) for m in e.matchers] == [("name", "=", "a"), ("shard", "=~", "s.*")]


def test_a_metric_of_the_registry_is_known() -> None:
    REGISTRY.counter("app_orders_total", "Orders of the application (a test's metric).")
    try:
        AlertRule(name="orders", expr="rate(app_orders_total[5m]) > 100")
    finally:
        REGISTRY.remove("app_orders_total")


# --- config -----------------------------------------------------------------------------------------------


def test_default_rules_cover_the_symptoms() -> None:
    names = {r.name for r in DEFAULT_RULES}
    assert {"backlog_critical", "consumer_lag", "consumer_stalled", "dead_letters", "breaker_open", "throttling"} <= (
        names
    )
    dead = next(r for r in DEFAULT_RULES if r.name == "dead_letters")
    assert dead.expr == "rate(dead_lettered_total[1m]) > 0"
    assert [r.name for r in Monitor(MonitorConfig(port=None)).rules] == [r.name for r in DEFAULT_RULES]


def test_rules_replace_defaults_by_name() -> None:
    mine = AlertRule(name="backlog_critical", expr="backlog_events > 10", severity="page")
    extra = AlertRule(name="extra", expr="backlog_events > 1")
    monitor = Monitor(MonitorConfig(port=None, rules=[mine, extra]))
    rules = {r.name: r for r in monitor.rules}
    assert rules["backlog_critical"] is mine
    assert "extra" in rules
    assert len(rules) == len(DEFAULT_RULES) + 1
    assert Monitor(MonitorConfig(port=None, default_rules=False, rules=(extra,))).rules == [extra]
    assert isinstance(MonitorConfig(rules=[extra]).rules, tuple)


def test_monitor_config_is_checked() -> None:
    rule = AlertRule(name="same", expr="backlog_events > 1")
    with pytest.raises(ConfigError, match="two rules named 'same'"):
        MonitorConfig(rules=(rule, rule))
    with pytest.raises(ConfigError, match="port"):
        MonitorConfig(port=70000)
    with pytest.raises(ConfigError, match="evaluate_every_s"):
        MonitorConfig(evaluate_every_s=0)
    with pytest.raises(ConfigError, match="webhook_url"):
        MonitorConfig(webhook_url="ftp://x")
    with pytest.raises(ConfigError, match="rules"):
        MonitorConfig(rules=("backlog_events > 1",))  # type: ignore[arg-type]


def test_monitor_config_from_dict() -> None:
    cfg = MonitorConfig.from_dict(
        {"port": 0, "rules": [{"name": "deep", "expr": "backlog_events > 5", "for_s": 1, "labels": {"team": "a"}}]}
    )
    assert cfg.rules[0].name == "deep"
    assert cfg.rules[0].labels == {"team": "a"}
    with pytest.raises(ConfigError, match="rule 'bad'"):
        MonitorConfig.from_dict({"rules": [{"name": "bad", "expr": "nope > 1"}]})
    with pytest.raises(ConfigError, match="unknown field"):
        MonitorConfig.from_dict({"prot": 1})


# --- states -----------------------------------------------------------------------------------------------


def evaluator(*rules: AlertRule, resolve_after_s: float = 1.0, keep_s: float = 300.0) -> RuleEvaluator:
    return RuleEvaluator(rules, resolve_after_s=resolve_after_s, resolved_keep_s=keep_s)


P = {"name": "orders"}


def test_pending_then_firing_after_for_s_then_resolved_after_hysteresis() -> None:
    ev = evaluator(AlertRule(name="deep", expr="backlog_events > 100", for_s=1.0), resolve_after_s=2.0)
    high = {"backlog_events": [(P, 500)]}
    low = {"backlog_events": [(P, 5)]}
    states = []
    notes = []
    for t in ticks(0, 10):
        metrics = high if 1 <= t < 5 else low
        notes += [(t, a.state) for a in ev.evaluate(snap(t, **metrics))]
        states.append((t, ev.alerts()[0].state))
    assert dict(states)[1.0] is AlertState.PENDING
    assert dict(states)[1.75] is AlertState.PENDING
    assert notes == [(2.0, AlertState.FIRING), (7.0, AlertState.RESOLVED)]
    assert dict(states)[6.75] is AlertState.FIRING  # false since 5.0: not yet 2 s
    assert dict(states)[10.0] is AlertState.RESOLVED
    resolved = ev.alerts()[0]
    assert resolved.fired_at == 1e9 + 2.0
    assert resolved.resolved_at == 1e9 + 7.0
    assert resolved.active_since == 1e9 + 1.0


def test_a_value_hovering_at_the_threshold_does_not_flap() -> None:
    ev = evaluator(AlertRule(name="deep", expr="backlog_events > 100"), resolve_after_s=1.0)
    notes = run(
        ev,
        ((t, {"backlog_events": [(P, 101 if i % 2 else 99)]}) for i, t in enumerate(ticks(0, 20))),
    )
    assert [a.state for _, a in notes] == [AlertState.FIRING]
    notes = run(ev, ((t, {"backlog_events": [(P, 0)]}) for t in ticks(20.25, 22)))
    assert [(t, a.state) for t, a in notes] == [(21.0, AlertState.RESOLVED)]  # false since 20.0 (99)


def test_pending_that_clears_notifies_nothing() -> None:
    ev = evaluator(AlertRule(name="deep", expr="backlog_events > 100", for_s=5.0))
    notes = run(ev, ((t, {"backlog_events": [(P, 500 if t < 3 else 0)]}) for t in ticks(0, 10)))
    assert notes == []
    assert ev.alerts()[0].state is AlertState.INACTIVE


def test_for_s_zero_fires_on_the_first_evaluation() -> None:
    ev = evaluator(AlertRule(name="critical", expr="backlog_critical == 1"))
    assert ev.evaluate(snap(0.0, backlog_critical=[(P, 0.0)])) == []
    (fired,) = ev.evaluate(snap(0.25, backlog_critical=[(P, 1.0)]))
    assert fired.state is AlertState.FIRING
    assert fired.labels == {"alertname": "critical", "severity": "warning", "name": "orders"}


def test_resolved_alert_fires_again_and_is_forgotten_after_keep() -> None:
    ev = evaluator(AlertRule(name="open", expr="breaker_open == 1"), resolve_after_s=0.0, keep_s=5.0)
    b = {"name": "rewards"}
    notes = run(ev, [(0, {"breaker_open": [(b, 1)]}), (1, {"breaker_open": [(b, 0)]}), (2, {"breaker_open": [(b, 1)]})])
    assert [a.state for _, a in notes] == [AlertState.FIRING, AlertState.RESOLVED, AlertState.FIRING]
    run(ev, [(3, {"breaker_open": [(b, 0)]})])
    assert ev.alerts()[0].state is AlertState.RESOLVED
    run(ev, [(8.5, {"breaker_open": [(b, 0)]})])
    assert ev.alerts()[0].state is AlertState.INACTIVE


def test_one_alert_per_series_and_aggregation_gives_one() -> None:
    per = AlertRule(
        name="stalled", expr='consumer_lag_status{name="app"} >= 2', summary="{name}/{shard}: status {value:.0f}"
    )
    agg = AlertRule(name="worst", expr="max(consumer_lag_status) >= 2")
    ev = evaluator(per, agg)
    series = [
        ({"name": "app", "shard": "s-0"}, 0),
        ({"name": "app", "shard": "s-1"}, 2),
        ({"name": "app", "shard": "s-2"}, 3),
        ({"name": "other", "shard": "s-0"}, 3),
    ]
    fired = ev.evaluate(snap(0, consumer_lag_status=series))
    per_series = sorted((a.labels["shard"], a.summary, a.value) for a in fired if a.name == "stalled")
    assert per_series == [("s-1", "app/s-1: status 2", 2.0), ("s-2", "app/s-2: status 3", 3.0)]
    (worst,) = [a for a in fired if a.name == "worst"]
    assert worst.value == 3.0
    assert "shard" not in worst.labels
    assert len({a.fingerprint for a in fired}) == 3


def test_each_alerts_log_line_names_the_labels_that_tell_it_apart(caplog: pytest.LogCaptureFixture) -> None:
    """A rule firing for two shards logs two lines that say which shard each is about (and the aggregation,
    which has no series labels, says none)."""
    per = AlertRule(name="dead_letters", expr="consumer_lag_status >= 2", summary="dead letters")
    agg = AlertRule(name="worst", expr="max(consumer_lag_status) >= 2", summary="worst")
    series = [({"name": "app", "shard": "s-1"}, 2), ({"name": "app", "shard": "s-2"}, 3)]
    fired = evaluator(per, agg).evaluate(snap(0, consumer_lag_status=series))
    assert sorted(a.series.get("shard", "") for a in fired) == ["", "s-1", "s-2"]
    assert all(set(a.series.items()) <= set(a.labels.items()) for a in fired)
    with caplog.at_level(logging.INFO, logger="treasure_engine.monitor"):
        Monitor(MonitorConfig(port=0))._notify(fired)
    lines = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("alert "))
    assert lines == [
        'alert dead_letters firing {name="app", shard="s-1"}: dead letters',
        'alert dead_letters firing {name="app", shard="s-2"}: dead letters',
        "alert worst firing: worst",
    ]


def test_a_stopped_readers_lag_is_estimated_not_left_at_its_last_figure() -> None:
    """Kinesalite reports 0 behind; a paused shard (or one whose reader has read nothing for 5 s) must not read
    0 ms while events pile up: its lag is the last figure plus the time since that read, marked an estimate."""
    reading = ShardStats("s-0", millis_behind_latest=0, read_at=1000.0)
    assert reading.lag(1001.0) == (0, False)
    assert reading.lag(1004.9) == (0, False)
    assert reading.lag(1012.5) == (12_500, True)  # nothing read for 12.5 s
    paused = ShardStats("s-0", millis_behind_latest=250, read_at=1000.0, paused=True)
    assert paused.lag(1003.0) == (3_250, True)
    assert ShardStats("s-0").lag(1003.0) == (None, False)  # never read
    d = paused.as_dict(now=1003.0)
    assert (d["lag_ms"], d["lag_estimated"], d["millis_behind_latest"]) == (3_250, True, 250)


def test_missing_series_resolve() -> None:
    ev = evaluator(AlertRule(name="open", expr="breaker_open == 1"), resolve_after_s=0.5)
    notes = run(ev, [(0, {"breaker_open": [({"name": "x"}, 1)]}), (0.25, {}), (0.75, {})])
    assert [(t, a.state) for t, a in notes] == [(0, AlertState.FIRING), (0.75, AlertState.RESOLVED)]


@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        ('name="a"', {"a"}),
        ('name!="a"', {"b", "ab"}),
        ('name=~"a.*"', {"a", "ab"}),
        ('name!~"a.*"', {"b"}),
        ('name=~"a"', {"a"}),  # regular expressions match the whole value
    ],
)
def test_label_matchers(matcher: str, expected: set[str]) -> None:
    ev = evaluator(AlertRule(name="m", expr=f"breaker_open{{{matcher}}} == 1"))
    fired = ev.evaluate(snap(0, breaker_open=[({"name": n}, 1) for n in ("a", "b", "ab")]))
    assert {a.labels["name"] for a in fired} == expected


def test_rate_fires_on_growth_and_resolves_when_it_leaves_the_window() -> None:
    ev = evaluator(AlertRule(name="dead", expr="rate(dead_lettered_total[10s]) > 0"), resolve_after_s=0.0)
    labels = {"name": "orders", "source": "producer"}
    steps = [(t, {"dead_lettered_total": [(labels, 0 if t < 3 else 4)]}) for t in ticks(0, 20)]
    notes = run(ev, steps)
    # the jump came between 2.75 and 3.0: from 13.0 the window [3.0, 13.0] holds no increase
    assert [(t, a.state) for t, a in notes] == [(3.0, AlertState.FIRING), (13.0, AlertState.RESOLVED)]
    assert notes[0][1].value == pytest.approx(4 / 3.0)  # 4 over the 3 s of history so far


def test_rate_counts_a_counter_reset_as_a_restart() -> None:
    ev = evaluator(AlertRule(name="r", expr="increase(records_throttled_total[1m]) >= 7"))
    values = [0, 5, 2, 2]  # +5, then a reset to 0 and +2: 7
    notes = run(ev, [(float(i), {"records_throttled_total": [(P, v)]}) for i, v in enumerate(values)])
    assert [(t, a.value) for t, a in notes] == [(2.0, 7.0)]


def test_histogram_count_and_sum_are_usable() -> None:
    ev = evaluator(
        AlertRule(name="slow", expr="request_duration_seconds_sum > 10"),
        AlertRule(name="busy", expr="rate(request_duration_seconds_count[1m]) > 1"),
    )
    hist = lambda count, total: ((1.0, math.inf), (count, count), total, count)  # noqa: E731
    notes = run(
        ev,
        [
            (0.0, {"request_duration_seconds": [(P, hist(0, 0.0))]}),
            (1.0, {"request_duration_seconds": [(P, hist(5, 20.0))]}),
        ],
    )
    assert sorted((a.name, a.value) for _, a in notes) == [("busy", 5.0), ("slow", 20.0)]


def test_summary_template_and_extra_labels() -> None:
    rule = AlertRule(
        name="deep",
        expr="backlog_events > 1",
        summary="{name}: {value:,.0f} events waiting ({missing})",
        labels={"team": "payments"},
    )
    ev = RuleEvaluator([rule], extra_labels={"service": "api"})
    (a,) = ev.evaluate(snap(0, backlog_events=[(P, 12345)]))
    assert a.summary == "orders: 12,345 events waiting ({missing})"
    assert a.labels == {
        "alertname": "deep",
        "severity": "warning",
        "name": "orders",
        "team": "payments",
        "service": "api",
    }
    assert json.loads(json.dumps(a.to_dict()))["state"] == "firing"


# --- Alertmanager ------------------------------------------------------------------------------------------


def test_alertmanager_payload_shape() -> None:
    ev = evaluator(AlertRule(name="open", expr="breaker_open == 1", summary="{name} open"), resolve_after_s=0.0)
    fired = ev.evaluate(snap(0, breaker_open=[({"name": "a"}, 1), ({"name": "b"}, 1)]))
    body = alertmanager_payload(fired, external_url="http://127.0.0.1:9464")
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert body["groupLabels"] == {"alertname": "open"}
    assert body["groupKey"] == '{}:{alertname="open"}'
    assert body["commonLabels"] == {"alertname": "open", "severity": "warning"}
    assert body["externalURL"] == "http://127.0.0.1:9464"
    assert body["truncatedAlerts"] == 0
    item = body["alerts"][0]
    assert set(item) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert item["status"] == "firing"
    assert item["endsAt"] == "0001-01-01T00:00:00Z"
    assert item["startsAt"] == "2001-09-09T01:46:40.000Z"
    assert item["annotations"] == {"summary": "a open"}
    assert item["generatorURL"] == "http://127.0.0.1:9464/status"
    resolved = ev.evaluate(snap(1, breaker_open=[({"name": "a"}, 0), ({"name": "b"}, 0)]))
    body = alertmanager_payload(resolved)
    assert body["status"] == "resolved"
    assert all(i["status"] == "resolved" and i["endsAt"] == "2001-09-09T01:46:41.000Z" for i in body["alerts"])
    msgspec.json.encode(body)


# --- lag status --------------------------------------------------------------------------------------------


def samples(
    lags: Sequence[int | None],
    *,
    checkpoints: Sequence[str] | None = None,
    read: Sequence[int] | None = None,
    handled: Sequence[int] | None = None,
    failed: Sequence[int] | None = None,
    paused: bool = False,
    every: float = 1.0,
) -> list[LagSample]:
    n = len(lags)
    return [
        LagSample(
            at=i * every,
            millis_behind=lags[i],
            checkpoint=(checkpoints or [str(100 + i) for i in range(n)])[i],
            records_read=(read or [10 * i for i in range(n)])[i],
            records_handled=(handled or [10 * i for i in range(n)])[i],
            records_failed=(failed or [0] * n)[i],
            paused=paused,
        )
        for i in range(n)
    ]


def test_lag_ok_when_caught_up_or_catching_up() -> None:
    assert lag_status(samples([0] * 11), 10) is LagStatus.OK
    assert lag_status(samples([5000, 4000, 6000, 3000, 2000, 2500, 1000, 900, 800, 500, 300]), 10) is LagStatus.OK
    # caught up at the last sample, whatever came before
    assert lag_status(samples([9000] * 10 + [0], checkpoints=["1"] * 11, read=[0] * 11), 10) is LagStatus.OK
    assert lag_status([], 10) is LagStatus.OK


def test_lag_warn_when_it_never_decreases() -> None:
    assert lag_status(samples([1000 + 500 * i for i in range(11)]), 10) is LagStatus.WARN
    assert lag_status(samples([2000] * 11), 10) is LagStatus.WARN  # steady, never catching up


def test_lag_stall_when_the_checkpoint_does_not_move() -> None:
    # records keep being read (a reader a page ahead) and the handler keeps failing: the checkpoint stays
    flat = ["100"] * 11
    assert lag_status(samples([3000] * 11, checkpoints=flat, failed=list(range(11))), 10) is LagStatus.STALL
    assert lag_status(samples([3000] * 11, checkpoints=flat, handled=[0] * 11), 10) is LagStatus.STALL
    # paused by the downstream breaker: nothing moves, on purpose
    paused = samples([3000] * 11, checkpoints=flat, read=[7] * 11, handled=[7] * 11, paused=True)
    assert lag_status(paused, 10) is LagStatus.STALL


def test_lag_stop_when_nothing_happens() -> None:
    frozen = samples([3000] * 11, checkpoints=["100"] * 11, read=[50] * 11, handled=[40] * 11)
    assert lag_status(frozen, 10) is LagStatus.STOP
    # the checkpoint moved once early in the window, then nothing: still no reads, no handling
    assert lag_status(samples([3000] * 11, read=[50] * 11, handled=[40] * 11), 10) is LagStatus.STOP


def test_lag_needs_a_full_window() -> None:
    frozen = samples([3000] * 6, checkpoints=["100"] * 6, read=[50] * 6, handled=[40] * 6)
    assert lag_status(frozen, 10) is LagStatus.OK  # 5 s of a 10 s window


def test_lag_tracker_keeps_one_window_and_forgets_unowned_shards() -> None:
    tracker = LagTracker(window_s=2.0, sample_every_s=0.5)
    s = ShardStats("shardId-0", checkpoint="1", millis_behind_latest=5000, records_read=10)
    statuses = [tracker.update(i * 0.25, [("app", s)]).get(("app", "shardId-0")) for i in range(12)]
    assert statuses[-1] == LagStatus.STOP
    assert statuses[0] == LagStatus.OK
    window = tracker._samples["app", "shardId-0"]
    # the window spans 2 s: its first sample is at or before the window's start, the second after it
    assert window[-1].at - window[0].at >= 2.0 > window[-1].at - window[1].at
    s.records_read, s.records_handled = 20, 20  # handled, but the checkpoint did not move
    assert tracker.update(3.0, [("app", s)])["app", "shardId-0"] == LagStatus.STALL
    s.checkpoint = "2"
    s.millis_behind_latest = 100
    tracker.update(3.5, [("app", s)])
    assert tracker.status["app", "shardId-0"] == LagStatus.OK
    s.owned = False
    assert tracker.update(4.0, [("app", s)]) == {}


# --- age of the oldest event -------------------------------------------------------------------------------


def test_oldest_age_in_acceptance_order() -> None:
    age = OldestAge()
    assert age.update(0.0, accepted=0, in_flight=0) == 0.0
    assert age.update(1.0, accepted=100, in_flight=100) == 0.0  # accepted in (0, 1]: at most one interval off
    assert age.update(2.0, accepted=200, in_flight=200) == 1.0
    assert age.update(3.0, accepted=200, in_flight=150) == 2.0  # 50 done: the oldest is among the first 100
    assert age.update(4.0, accepted=250, in_flight=100) == 2.0  # 150 done: the oldest came at 2.0
    assert age.update(5.0, accepted=250, in_flight=0) == 0.0
    assert age.update(6.0, accepted=260, in_flight=10) == 0.0


# --- exposition -------------------------------------------------------------------------------------------


def encoded_and_reference(snapshot: Snapshot) -> tuple[bytes, bytes]:
    class Collector:
        def collect(self) -> Any:
            return families_of(snapshot)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return Encoder().encode(snapshot), generate_latest(registry)


def test_exposition_is_byte_for_byte_prometheus_client() -> None:
    values = [0, 1, -1, 7, 999_999, 1_000_000, 123_456_789, 2**53 + 1, 0.5, 1e-7, 1234567.8, -1e7, math.inf, -math.inf]
    odd = 'we"ird\\name\nwith newline'
    hist = REGISTRY.histogram("request_duration_seconds", CATALOG["request_duration_seconds"][1], {"name": "t"})
    for v in (0.0001, 0.01, 0.5, 3.0, 5000.0):
        hist.observe(v)
    try:
        registry_series = [s for s in REGISTRY.snapshot() if s[0] == "request_duration_seconds"]
        snapshot = snap(
            0,
            events_accepted_total=[({"name": f"p{i}"}, v) for i, v in enumerate(values)],
            backlog_events=[({"name": odd}, 5), ({"name": "plain"}, math.nan)],
            breaker_failure_rate=[({"name": "x"}, 0.25)],
        )
        f = Family("request_duration_seconds", CATALOG["request_duration_seconds"][1], "histogram")
        for _, _, _, labels, value in registry_series:
            f.add(labels, value)
        snapshot.families[f.name] = f
        ours, reference = encoded_and_reference(snapshot)
    finally:
        REGISTRY.remove("request_duration_seconds", {"name": "t"})
    assert ours == reference
    families = {f.name: f for f in text_string_to_metric_families(ours.decode())}
    assert families["treasure_engine_events_accepted"].type == "counter"
    assert families["treasure_engine_request_duration_seconds"].type == "histogram"
    samples = {
        (s.name, s.labels.get("le")): s.value for s in families["treasure_engine_request_duration_seconds"].samples
    }
    assert samples["treasure_engine_request_duration_seconds_count", None] == 5
    assert samples["treasure_engine_request_duration_seconds_bucket", "+Inf"] == 5
    backlog = {s.labels["name"]: s.value for s in families["treasure_engine_backlog_events"].samples}
    assert backlog[odd] == 5


def test_the_encoder_reuses_its_text_across_scrapes() -> None:
    enc = Encoder()
    one = snap(0, backlog_events=[({"name": "a"}, 1)])
    two = snap(1, backlog_events=[({"name": "a"}, 2), ({"name": "b"}, 3)])
    assert enc.encode(one).endswith(b'treasure_engine_backlog_events{name="a"} 1.0\n')
    assert enc.encode(two) == encoded_and_reference(two)[1]
    same = snap(2, backlog_events=[({"name": "a"}, 2.0), ({"name": "b"}, 3)])  # unchanged: the cached family
    assert enc.encode(same) == encoded_and_reference(same)[1]
    fewer = snap(3, backlog_events=[({"name": "b"}, 3)], breaker_open=[({"name": "x"}, math.nan)])
    assert enc.encode(fewer) == encoded_and_reference(fewer)[1]
    assert enc.encode(fewer) == encoded_and_reference(fewer)[1]  # NaN never equals itself: formatted again


# --- the monitor without a server ---------------------------------------------------------------------------


async def handler(records: list[Any]) -> None:
    return None


def consumer_with_shards(app: str, n: int, **stats: Any) -> Consumer:
    consumer = Consumer(ConsumerConfig(stream="s", application=app, breaker=BreakerConfig()), handler)
    for i in range(n):
        shard = f"shardId-{i:012d}"
        consumer._stats[shard] = ShardStats(shard, **stats)
    return consumer


async def test_monitor_collects_watched_components_without_a_server() -> None:
    producer = Producer(ProducerConfig(stream="arn:aws:kinesis:us-east-1:1:stream/orders"))
    consumer = consumer_with_shards("app-unit", 3, checkpoint="5", millis_behind_latest=1500, records_read=4)
    breaker = CircuitBreaker("unit-breaker", BreakerConfig(minimum_calls=1, window_size=1))
    registered = breakers.get("unit-registered", BreakerConfig(minimum_calls=1, window_size=1))
    got: list[Alert] = []
    seen_async: list[str] = []

    async def async_callback(alert: Alert) -> None:
        seen_async.append(alert.name)

    monitor = Monitor(
        MonitorConfig(
            port=None,
            default_rules=False,
            rules=(
                AlertRule(name="unit_open", expr='breaker_open{name="unit-breaker"} == 1'),
                AlertRule(name="unit_lag", expr='consumer_behind_latest_seconds{name="app-unit"} > 1'),
            ),
        )
    )
    monitor.on_alert(got.append)
    monitor.on_alert(async_callback)
    assert monitor.watch_producer(producer) == "orders"
    assert monitor.watch_consumer(consumer) == "app-unit"
    with pytest.raises(ValueError, match="already watched"):
        monitor.watch_producer(producer)
    monitor.watch_breaker(breaker)  # made directly, not in the registry
    async with monitor:
        breaker.force_open()
        try:
            changed = monitor.evaluate()
        finally:
            breaker.close()
        await asyncio.sleep(0)
        assert sorted(a.name for a in changed) == ["unit_lag", "unit_lag", "unit_lag", "unit_open"]
        assert sorted(a.name for a in got) == sorted(a.name for a in changed)
        assert sorted(seen_async) == sorted(a.name for a in changed)
        status = monitor.snapshot()
        json.dumps(status)
        assert status["producers"]["orders"]["endpoint_breaker"] == "closed"
        assert status["consumers"]["app-unit"]["leases"] == 3
        assert status["consumers"]["app-unit"]["shards"]["shardId-000000000000"]["lag_status"] == "OK"
        assert "unit-registered" in status["breakers"]
        assert "unit-breaker" in status["breakers"]
        assert "kinesis:arn:aws:kinesis:us-east-1:1:stream/orders" in (status["breakers"])
        ready, reasons = monitor.readiness()
        assert not ready
        assert "producer orders is new" in reasons
        text = monitor.metrics_text().decode()
        assert 'treasure_engine_consumer_behind_latest_seconds{name="app-unit",shard="shardId-000000000002"} 1.5' in (
            text
        )
        assert producer.attached_metrics is not None
    assert producer.attached_metrics is None
    assert consumer.attached_metrics is None
    assert not [s for s in REGISTRY.snapshot() if ("name", "orders") in s[3]]
    breakers.remove("unit-registered")
    assert registered.state.value == "closed"
    await monitor.stop()  # idempotent
    with pytest.raises(RuntimeError, match="starts once"):
        await monitor.start()


# --- deploy files -------------------------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _promql(expr: str) -> str:
    """A rule expression in PromQL: metric names prefixed (label names and functions stay)."""
    names = set(CATALOG) | {n + s for n in CATALOG for s in ("_count", "_sum")}
    return re.sub(
        r"\b([a-z_][a-z0-9_]*)\b(?=\s*[{\[)<>=!]|\s*$)", lambda m: PREFIX + m[1] if m[1] in names else m[1], expr
    )


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert m, duration
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]


def test_prometheus_rules_are_the_default_rules() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert list(rules) == [r.name for r in DEFAULT_RULES]
    for rule in DEFAULT_RULES:
        promql = rules[rule.name]
        assert promql["expr"] == _promql(rule.expr), rule.name
        assert _seconds(promql.get("for", "0s")) == rule.for_s, rule.name
        assert promql["labels"]["severity"] == rule.severity, rule.name
        assert promql["annotations"]["summary"], rule.name
        for name in re.findall(r"\btreasure_engine_([a-z0-9_]+)", promql["expr"]):
            assert name in CATALOG, f"{rule.name}: {name} is not a metric"


def test_grafana_dashboard_is_well_formed_and_uses_real_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource"}
    graphs = [p for p in panels if p["type"] != "row"]
    assert graphs
    used: set[str] = set()
    for p in graphs:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = re.findall(r"\btreasure_engine_([a-z0-9_]+)", t["expr"])
            assert names, t["expr"]
            for n in names:
                base = re.sub(r"_(bucket|count|sum)$", "", n)
                assert n in CATALOG or base in CATALOG, f"panel {p['title']!r}: {n} is not a metric"
                used.add(n if n in CATALOG else base)
    assert "backlog_events" in used
    assert "consumer_lag_status" in used
    assert "breaker_open" in used


# --- docs ---------------------------------------------------------------------------------------------------


def _table_rows(doc: str, header: str) -> list[list[str]]:
    lines = doc.split(header, 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| `")]


def test_monitoring_doc_lists_every_metric_and_default_rule() -> None:
    doc = (DEPLOY.parent / "docs" / "monitoring.md").read_text()
    metrics = {row[0].strip("`"): row[1] for row in _table_rows(doc, "| metric | type | labels | meaning |")}
    assert metrics == {name: kind for name, (kind, _) in CATALOG.items()}
    rules = [(r[0].strip("`"), r[1].strip("`"), float(r[2]), r[3]) for r in _table_rows(doc, "| name | expr |")]
    assert rules == [(r.name, r.expr, r.for_s, r.severity) for r in DEFAULT_RULES]
