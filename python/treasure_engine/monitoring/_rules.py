"""Alert rules and their evaluation: pending, firing and resolved states over the snapshots, with
the default rules."""

from __future__ import annotations

import collections
import enum
import hashlib
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import msgspec

from treasure_engine._core import ConfigError
from treasure_engine._validate import _check_types
from treasure_engine.monitoring._catalog import HISTOGRAM, HistogramValue, Labels, Snapshot
from treasure_engine.monitoring._expr import compile_expr


class AlertState(enum.StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    """The condition holds, for less than the rule's `for_s` so far."""
    FIRING = "firing"
    RESOLVED = "resolved"
    """Was firing; the condition has been false for `resolve_after_s`. Listed until `resolved_keep_s` passes."""


_RULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class AlertRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One alert rule. `expr` is checked when the rule is made: a malformed expression or an unknown metric
    raises `ConfigError` naming the rule."""

    name: str
    """The alert's name (`alertname`): letters, digits and '_'."""
    expr: str
    """`metric{label="v", ...} OP number`, `rate(metric[1m]) OP number`, `increase(metric[5m]) OP number`, or
    either inside `sum(...)`, `max(...)`, `min(...)`, `avg(...)`; OP is one of > >= < <= == !=. Metric names
    are without the `treasure_engine_` prefix; label matchers are =, !=, =~ and !~ (regular expressions match
    the whole value)."""
    for_s: float = 0.0
    """How long the condition must hold before the alert fires (pending until then)."""
    severity: str = "warning"
    summary: str = ""
    """The notification's text; `{value}` and the series' labels (`{name}`, `{shard}`, ...) are filled in."""
    resolve_after_s: float | None = None
    """How long the condition must be false before a firing alert resolves; None: the monitor's default."""
    labels: dict[str, str] = {}
    """Extra labels of the alert (for Alertmanager's routing)."""

    def __post_init__(self) -> None:
        _check_types(self)
        if _RULE_NAME.fullmatch(self.name) is None:
            raise ConfigError(
                f"invalid configuration: rule {self.name!r}: name must be letters, digits and '_' (at most 128)"
            )
        where = f"invalid configuration: rule {self.name!r}"
        if not (self.for_s >= 0 and math.isfinite(self.for_s)):
            raise ConfigError(f"{where}: for_s: must be >= 0 (got {self.for_s!r})")
        after = self.resolve_after_s
        if after is not None and not (after >= 0 and math.isfinite(after)):
            raise ConfigError(f"{where}: resolve_after_s: must be >= 0 (got {self.resolve_after_s!r})")
        if not self.severity:
            raise ConfigError(f"{where}: severity: must not be empty")
        for k, v in self.labels.items():
            if not isinstance(k, str) or _LABEL_NAME.fullmatch(k) is None or not isinstance(v, str):
                raise ConfigError(f"{where}: labels: {k!r}={v!r} is not a label name and a string value")
        try:
            compile_expr(self.expr)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            _render(self.summary, 1.0, {})
        except (ValueError, IndexError, AttributeError) as e:
            raise ConfigError(f"{where}: summary: {e}") from None


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert: a rule and one series it selected (no series labels for an aggregation)."""

    name: str
    """The rule's name (the `alertname` label)."""
    state: AlertState
    severity: str
    labels: dict[str, str]
    """alertname, severity, the rule's and the monitor's extra labels, and the series' labels."""
    annotations: dict[str, str]
    """summary."""
    value: float | None
    """The expression's value at the last evaluation where the condition held (None: inactive)."""
    expr: str
    active_since: float | None = None
    """Unix seconds when the condition started to hold (pending or firing since)."""
    fired_at: float | None = None
    resolved_at: float | None = None
    fingerprint: str = ""
    series: dict[str, str] = msgspec.field(default_factory=dict)
    """The labels of the series the rule selected (a subset of `labels`): what tells this rule's alerts apart."""

    @property
    def summary(self) -> str:
        return self.annotations.get("summary", "")

    def to_dict(self) -> dict[str, Any]:
        d = msgspec.structs.asdict(self)
        d["state"] = self.state.value
        return d


class _Formatter(string.Formatter):
    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, str):
            return kwargs.get(key, "{" + key + "}")
        return super().get_value(key, args, kwargs)


_FORMATTER = _Formatter()


def _render(template: str, value: float, labels: Mapping[str, str]) -> str:
    return _FORMATTER.vformat(template, (), {**labels, "value": value})


def _summary(rule: AlertRule, value: float, labels: Mapping[str, str]) -> str:
    if not rule.summary:
        return f"{rule.expr} (value {value:g})"
    try:
        return _render(rule.summary, value, labels)
    except (ValueError, IndexError, AttributeError, KeyError):
        return rule.summary


def fingerprint(labels: Mapping[str, str]) -> str:
    """16 hex digits identifying a label set (as Alertmanager's fingerprints do)."""
    h = hashlib.blake2b(digest_size=8)
    for k, v in sorted(labels.items()):
        h.update(k.encode())
        h.update(b"\xff")
        h.update(v.encode())
        h.update(b"\xfe")
    return h.hexdigest()


class _Instance:
    __slots__ = (
        "active_mono",
        "active_since",
        "false_since",
        "fired_at",
        "labels",
        "resolved_at",
        "resolved_mono",
        "series",
        "state",
        "value",
    )

    def __init__(self, labels: dict[str, str], series: dict[str, str]) -> None:
        self.labels = labels
        self.series = series
        self.state = AlertState.INACTIVE
        self.value: float | None = None
        self.active_since: float | None = None
        self.active_mono = 0.0
        self.fired_at: float | None = None
        self.false_since: float | None = None
        self.resolved_at: float | None = None
        self.resolved_mono = 0.0


class _Rule:
    __slots__ = ("expr", "instances", "resolve_after_s", "rule")

    def __init__(self, rule: AlertRule, resolve_after_s: float) -> None:
        self.rule = rule
        self.expr = compile_expr(rule.expr)
        self.resolve_after_s = rule.resolve_after_s if rule.resolve_after_s is not None else resolve_after_s
        self.instances: dict[Labels, _Instance] = {}


def merge_rules(rules: Iterable[AlertRule], *, defaults: bool) -> list[AlertRule]:
    """The default rules (if `defaults`), each replaced by a rule of the same name, then the other rules.
    Two rules of one name in `rules` raise `ConfigError`."""
    own: dict[str, AlertRule] = {}
    for r in rules:
        if not isinstance(r, AlertRule):
            raise ConfigError(f"invalid configuration: rules: expected AlertRule, got {type(r).__name__}")
        if r.name in own:
            raise ConfigError(f"invalid configuration: rules: two rules named {r.name!r}")
        own[r.name] = r
    merged = [own.pop(d.name, d) for d in DEFAULT_RULES] if defaults else []
    return merged + list(own.values())


class _History:
    """The points (time, value) where a counter series changed, the last one at or before the window's start
    kept as the base; `seen`: when it was last in a snapshot."""

    __slots__ = ("points", "seen")

    def __init__(self, now: float, value: float) -> None:
        self.points: collections.deque[tuple[float, float]] = collections.deque([(now, value)])
        self.seen = now


class RuleEvaluator:
    """Evaluates rules on snapshots and keeps each alert's state; times come from the snapshots (monotonic for
    the states, wall-clock for the alerts). Not thread-safe: one evaluator, one caller."""

    def __init__(
        self,
        rules: Iterable[AlertRule],
        *,
        resolve_after_s: float = 5.0,
        resolved_keep_s: float = 300.0,
        extra_labels: Mapping[str, str] | None = None,
    ) -> None:
        self._rules = [_Rule(r, resolve_after_s) for r in rules]
        self._resolved_keep_s = resolved_keep_s
        self._extra = dict(extra_labels or {})
        # (metric, labels) -> the changes of a counter, for rate() and increase()
        self._history: dict[tuple[str, Labels], _History] = {}
        self._ranges: dict[str, float] = {}
        for r in self._rules:
            if r.expr.range_s is not None:
                m = r.expr.metric
                self._ranges[m] = max(self._ranges.get(m, 0.0), r.expr.range_s)

    @property
    def rules(self) -> list[AlertRule]:
        return [r.rule for r in self._rules]

    # values ----------------------------------------------------------------------------------------------

    @staticmethod
    def _series(snapshot: Snapshot, metric: str) -> tuple[list[Labels], list[float]]:
        """The labels and values of a metric (a histogram's `_count` or `_sum` included), as parallel lists."""
        family = snapshot.families.get(metric)
        if family is not None:
            if family.kind == HISTOGRAM:
                return [], []
            return family.labels, cast("list[float]", family.values)
        for suffix in ("_count", "_sum"):
            if metric.endswith(suffix):
                family = snapshot.families.get(metric[: -len(suffix)])
                if family is not None and family.kind == HISTOGRAM:
                    values = cast("list[HistogramValue]", family.values)
                    if suffix == "_count":
                        return family.labels, [float(v[3]) for v in values]
                    return family.labels, [v[2] for v in values]
        return [], []

    def _record_history(self, snapshot: Snapshot) -> None:
        """Keeps, per counter series that rate() or increase() reads, the points where its value changed."""
        now = snapshot.at
        history = self._history
        for metric, range_s in self._ranges.items():
            labels_list, values = self._series(snapshot, metric)
            horizon = now - range_s
            for labels, value in zip(labels_list, values, strict=True):
                h = history.get((metric, labels))
                if h is None:
                    history[metric, labels] = _History(now, value)
                    continue
                h.seen = now
                points = h.points
                if value != points[-1][1]:
                    points.append((now, value))
                while len(points) > 1 and points[1][0] <= horizon:
                    points.popleft()
        stale = [k for k, h in history.items() if h.seen < now - self._ranges.get(k[0], 0.0) - 1.0]
        for k in stale:
            del history[k]

    def _increase(self, metric: str, labels: Labels, range_s: float, now: float) -> tuple[float, float] | None:
        """(increase, seconds covered) of a counter over the range; a value going down is a reset (a restart from
        0). None for a series not seen before."""
        h = self._history.get((metric, labels))
        if h is None:
            return None
        since = now - range_s
        points = h.points
        base = 0
        for i in range(len(points) - 1, -1, -1):
            if points[i][0] <= since:
                base = i
                break
        total = 0.0
        prev = points[base][1]
        for i in range(base + 1, len(points)):
            v = points[i][1]
            total += v - prev if v >= prev else v
            prev = v
        return total, now - max(since, points[0][0])

    def _holding(self, r: _Rule, snapshot: Snapshot) -> dict[Labels, float]:
        """The series for which the rule's condition holds now, with their values."""
        e = r.expr
        labels_list, values = self._series(snapshot, e.metric)
        matchers = e.matchers
        function = e.function
        selected: list[tuple[Labels, float]] = []
        for labels, value in zip(labels_list, values, strict=True):
            if matchers and not all(m(labels) for m in matchers):
                continue
            v = float(value)
            if function is not None:
                assert e.range_s is not None
                inc = self._increase(e.metric, labels, e.range_s, snapshot.at)
                if inc is None:
                    continue
                total, covered = inc
                v = total if function == "increase" else (total / covered if covered > 0 else 0.0)
            if e.aggregation is None:
                if e.compare(v):
                    selected.append((labels, v))
            else:
                selected.append((labels, v))
        if e.aggregation is None:
            return dict(selected)
        if not selected:
            return {}
        vs = [v for _, v in selected]
        agg: float
        if e.aggregation == "sum":
            agg = math.fsum(vs)
        elif e.aggregation == "max":
            agg = max(vs)
        elif e.aggregation == "min":
            agg = min(vs)
        else:
            agg = math.fsum(vs) / len(vs)
        return {(): agg} if e.compare(agg) else {}

    # states ----------------------------------------------------------------------------------------------

    def _labels(self, r: _Rule, series: Labels) -> dict[str, str]:
        labels = dict(series)
        labels.update(self._extra)
        labels.update(r.rule.labels)
        labels["alertname"] = r.rule.name
        labels["severity"] = r.rule.severity
        return labels

    def evaluate(self, snapshot: Snapshot) -> list[Alert]:
        """Moves every alert's state on; returns the alerts that fired or resolved now (to notify)."""
        now, wall = snapshot.at, snapshot.wall
        self._record_history(snapshot)
        changed: list[Alert] = []
        for r in self._rules:
            holding = self._holding(r, snapshot)
            for key, value in holding.items():
                inst = r.instances.get(key)
                if inst is None:
                    inst = r.instances[key] = _Instance(self._labels(r, key), dict(key))
                inst.value = value
                inst.false_since = None
                if inst.state in (AlertState.INACTIVE, AlertState.RESOLVED):
                    inst.state = AlertState.PENDING
                    inst.active_since, inst.active_mono = wall, now
                    inst.fired_at = inst.resolved_at = None
                if inst.state is AlertState.PENDING and now - inst.active_mono >= r.rule.for_s:
                    inst.state = AlertState.FIRING
                    inst.fired_at = wall
                    changed.append(self._alert(r, inst))
            for key in [k for k in r.instances if k not in holding]:
                inst = r.instances[key]
                if inst.state is AlertState.PENDING:
                    del r.instances[key]
                elif inst.state is AlertState.FIRING:
                    if inst.false_since is None:
                        inst.false_since = now
                    if now - inst.false_since >= r.resolve_after_s:
                        inst.state = AlertState.RESOLVED
                        inst.resolved_at, inst.resolved_mono = wall, now
                        changed.append(self._alert(r, inst))
                elif inst.state is AlertState.RESOLVED and now - inst.resolved_mono >= self._resolved_keep_s:
                    del r.instances[key]
        return changed

    def _alert(self, r: _Rule, inst: _Instance) -> Alert:
        value = inst.value
        return Alert(
            name=r.rule.name,
            state=inst.state,
            severity=r.rule.severity,
            labels=dict(inst.labels),
            annotations={"summary": _summary(r.rule, value if value is not None else math.nan, inst.labels)},
            value=value,
            expr=r.rule.expr,
            active_since=inst.active_since,
            fired_at=inst.fired_at,
            resolved_at=inst.resolved_at,
            fingerprint=fingerprint(inst.labels),
            series=dict(inst.series),
        )

    def alerts(self) -> list[Alert]:
        """Every rule's alerts that are not inactive; a rule with none is listed once, inactive."""
        out: list[Alert] = []
        for r in self._rules:
            if not r.instances:
                labels = self._labels(r, ())
                out.append(
                    Alert(
                        name=r.rule.name,
                        state=AlertState.INACTIVE,
                        severity=r.rule.severity,
                        labels=labels,
                        annotations={},
                        value=None,
                        expr=r.rule.expr,
                        fingerprint=fingerprint(labels),
                    )
                )
                continue
            out.extend(self._alert(r, inst) for inst in r.instances.values())
        return out

    def firing_counts(self) -> list[tuple[Labels, float]]:
        """The `alerts_firing` series: per rule, how many of its alerts fire."""
        return [
            (
                (("alertname", r.rule.name), ("severity", r.rule.severity)),
                float(sum(1 for i in r.instances.values() if i.state is AlertState.FIRING)),
            )
            for r in self._rules
        ]


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        name="backlog_critical",
        expr="backlog_critical == 1",
        severity="critical",
        summary="producer {name}: the backlog is critical (ring at critical_backlog, or events in the spill)",
    ),
    AlertRule(
        name="oldest_event_old",
        expr="oldest_event_age_seconds > 60",
        for_s=5.0,
        severity="warning",
        summary="producer {name}: the oldest undelivered event is {value:.0f} s old",
    ),
    AlertRule(
        name="dead_letter_store_failing",
        expr="dead_letter_pending > 0",
        for_s=30.0,
        severity="critical",
        summary="producer {name}: {value:.0f} dead letter(s) cannot be stored",
    ),
    AlertRule(
        name="storage_failing",
        expr="rate(storage_errors_total[1m]) > 0",
        severity="critical",
        summary="producer {name}: its {store} cannot be written or read (a full or read-only disk?)",
    ),
    AlertRule(
        name="throttling",
        expr="rate(records_throttled_total[1m]) > 0",
        for_s=60.0,
        severity="warning",
        summary="producer {name}: Kinesis throttles {value:.1f} records/s (sustained)",
    ),
    AlertRule(
        name="dead_letters",
        expr="rate(dead_lettered_total[1m]) > 0",
        severity="warning",
        summary="{source} {name}: {value:.2f} dead letters/s over the last minute",
    ),
    AlertRule(
        name="dlq_oldest_entry_old",
        expr="dlq_oldest_entry_age_seconds > 86400",
        severity="warning",
        summary="dead-letter queue {name}: an entry has waited {value:.0f} s (redrive or purge it)",
    ),
    AlertRule(
        name="breaker_open",
        expr="breaker_open == 1",
        severity="warning",
        summary="circuit breaker {name} is open",
    ),
    AlertRule(
        name="consumer_lag",
        expr="consumer_lag_seconds > 60",
        for_s=30.0,
        severity="warning",
        summary="consumer {name}, shard {shard}: {value:.0f} s behind",
    ),
    AlertRule(
        name="consumer_lag_growing",
        expr="consumer_lag_status == 1",
        for_s=60.0,
        severity="warning",
        summary="consumer {name}, shard {shard}: the lag keeps growing",
    ),
    AlertRule(
        name="consumer_stalled",
        expr="consumer_lag_status >= 2",
        severity="critical",
        summary="consumer {name}, shard {shard}: stalled (2) or stopped (3): status {value:.0f}",
    ),
)
"""On unless `MonitorConfig.default_rules=False`; a rule of the same name in `MonitorConfig.rules` replaces one."""
