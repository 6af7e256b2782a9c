"""Alert rules over the metrics, their evaluation, the notifiers, and the per-shard lag status.

A rule is `expr` (`metric{label="v"} > 5`, `rate(metric[1m]) > 0`, `max(metric) >= 2`), `for_s`, `severity` and
`summary`. The monitor evaluates every rule on each snapshot (every 250 ms by default); each series the expression
selects is an alert of its own (as in Prometheus), going inactive -> pending -> firing -> resolved -> inactive.
A firing alert resolves only after its condition has been false for `resolve_after_s` (hysteresis), so a value
hovering at the threshold does not flap. Firing and resolution are logged, passed to callbacks and posted to a
webhook as Alertmanager does (its v4 payload), from a background task with a bounded queue.

The lag status of a consumer's shard follows Burrow's idea: it judges a window of samples rather than one value
against a threshold (see `lag_status`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import enum
import functools
import hashlib
import itertools
import logging
import math
import operator
import random
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import msgspec

from treasure_engine._core import ConfigError
from treasure_engine._validate import _check_types
from treasure_engine.metrics import CATALOG, COUNTER, HISTOGRAM, REGISTRY, HistogramValue, Labels, Snapshot

__all__ = [
    "DEFAULT_RULES",
    "Alert",
    "AlertRule",
    "AlertState",
    "LagSample",
    "LagStatus",
    "LagTracker",
    "RuleEvaluator",
    "WebhookNotifier",
    "alertmanager_payload",
    "lag_status",
    "parse_expr",
]

log = logging.getLogger("treasure_engine.alerts")


class AlertState(enum.StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    """The condition holds, for less than the rule's `for_s` so far."""
    FIRING = "firing"
    RESOLVED = "resolved"
    """Was firing; the condition has been false for `resolve_after_s`. Listed until `resolved_keep_s` passes."""


class LagStatus(enum.IntEnum):
    """A shard's lag status over the window (the value of `consumer_lag_status`)."""

    OK = 0
    WARN = 1
    """Behind, the checkpoint moves, but the lag never decreased over the window: the consumer does not keep up."""
    STALL = 2
    """Behind, and the checkpoint did not move over the window although the shard is busy: records read, handler
    attempts failing, or paused by the downstream breaker."""
    STOP = 3
    """Behind, and nothing happened over the window: nothing read, handled or failed, not paused. The reader is
    gone or hung (or the handler never returns)."""


# --- rules ------------------------------------------------------------------------------------------------


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


# --- expressions ------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_FUNCTIONS = ("rate", "increase")
_AGGREGATIONS = ("sum", "max", "min", "avg")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[Ii]nf|NaN)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Matcher:
    label: str
    op: str  # = != =~ !~
    value: str
    pattern: re.Pattern[str] | None

    def __call__(self, labels: Labels) -> bool:
        v = ""
        for name, value in labels:
            if name == self.label:
                v = value
                break
        if self.pattern is not None:
            hit = self.pattern.fullmatch(v) is not None
            return hit if self.op == "=~" else not hit
        return (v == self.value) if self.op == "=" else (v != self.value)


@dataclass(frozen=True, slots=True)
class Expr:
    """A parsed rule expression."""

    text: str
    metric: str
    """The name as written (a histogram's `_count` / `_sum` included)."""
    matchers: tuple[Matcher, ...]
    function: str | None
    range_s: float | None
    aggregation: str | None
    op: str
    threshold: float

    def compare(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"malformed expression {self.text!r} at column {self.i + 1}: {message}")

    def ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self, literal: str) -> bool:
        self.ws()
        return self.text.startswith(literal, self.i)

    def expect(self, literal: str, what: str) -> None:
        if not self.peek(literal):
            raise self.error(f"expected {what}")
        self.i += len(literal)

    def match(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        self.ws()
        m = pattern.match(self.text, self.i)
        if m is None:
            raise self.error(f"expected {what}")
        self.i = m.end()
        return m

    def parse(self) -> Expr:
        name = self.match(_NAME, "a metric name, rate(...) or an aggregation such as max(...)").group()
        aggregation = None
        if self.peek("("):
            if name in _AGGREGATIONS:
                aggregation = name
                self.expect("(", "'('")
                name = self.match(_NAME, "a metric name or rate(...)").group()
                metric, matchers, function, range_s = self.inner(name)
                self.expect(")", f"')' closing {aggregation}(")
            else:
                metric, matchers, function, range_s = self.inner(name)
        else:
            metric, matchers, function, range_s = self.inner(name)
        self.ws()
        for op in (">=", "<=", "==", "!=", ">", "<"):
            if self.text.startswith(op, self.i):
                self.i += len(op)
                break
        else:
            raise self.error("expected a comparison: > >= < <= == !=")
        number = self.match(_NUMBER, "a number").group()
        self.ws()
        if self.i != len(self.text):
            raise self.error("unexpected text after the number")
        return Expr(self.text, metric, matchers, function, range_s, aggregation, op, float(number))

    def inner(self, name: str) -> tuple[str, tuple[Matcher, ...], str | None, float | None]:
        if self.peek("("):
            if name not in _FUNCTIONS:
                raise self.error(f"unknown function {name}(): known are {', '.join((*_FUNCTIONS, *_AGGREGATIONS))}")
            self.expect("(", "'('")
            metric = self.match(_NAME, "a metric name").group()
            matchers = self.matchers()
            if not self.peek("["):
                raise self.error(f"{name}() needs a range, as in {name}({metric}[1m])")
            self.expect("[", "'['")
            m = self.match(_DURATION, "a duration such as 30s, 1m, 5m or 1h")
            range_s = float(m.group(1)) * _UNITS[m.group(2)]
            if range_s <= 0:
                raise self.error("the range must be > 0")
            self.expect("]", "']'")
            self.expect(")", f"')' closing {name}(")
            return metric, matchers, name, range_s
        matchers = self.matchers()
        if self.peek("["):
            raise self.error(f"a range [...] needs rate() or increase(), as in rate({name}[1m])")
        return name, matchers, None, None

    def matchers(self) -> tuple[Matcher, ...]:
        if not self.peek("{"):
            return ()
        self.expect("{", "'{'")
        out: list[Matcher] = []
        while not self.peek("}"):
            label = self.match(_NAME, "a label name").group()
            self.ws()
            for op in ("=~", "!~", "!=", "="):
                if self.text.startswith(op, self.i):
                    self.i += len(op)
                    break
            else:
                raise self.error("expected a label matcher: = != =~ !~")
            raw = self.match(_STRING, 'a quoted value, as in name="orders"').group(1)
            value = re.sub(r"\\(.)", r"\1", raw)
            pattern = None
            if op in ("=~", "!~"):
                try:
                    pattern = re.compile(value)
                except re.error as e:
                    raise self.error(f"bad regular expression {value!r}: {e}") from None
            out.append(Matcher(label, op, value, pattern))
            if not self.peek(","):
                break
            self.expect(",", "','")
        self.expect("}", "'}' or ','")
        return tuple(out)


@functools.lru_cache(maxsize=1024)
def parse_expr(text: str) -> Expr:
    """Parses a rule expression (syntax only); raises `ConfigError` saying where it is malformed."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("malformed expression: empty")
    return _Parser(text).parse()


def _known_metrics() -> dict[str, str]:
    """Names a rule may use -> kind: the catalog, the registry's series, and histograms' _count and _sum."""
    known = {name: kind for name, (kind, _help) in CATALOG.items()}
    for name, _help, kind, _labels, _value in REGISTRY.snapshot():
        known.setdefault(name, kind)
    for name, kind in list(known.items()):
        if kind == HISTOGRAM:
            known[name + "_count"] = COUNTER
            known[name + "_sum"] = COUNTER
    return known


def compile_expr(text: str) -> Expr:
    """Parses and checks an expression against the known metrics: `ConfigError` for an unknown metric, a
    histogram compared as a whole, or rate() of a gauge."""
    expr = parse_expr(text)
    known = _known_metrics()
    kind = known.get(expr.metric)
    if kind is None:
        close = [n for n in known if expr.metric in n or n in expr.metric][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see docs/monitoring.md for the metrics)"
        raise ConfigError(f"unknown metric {expr.metric!r} in {text!r}{hint}")
    if kind == HISTOGRAM:
        raise ConfigError(f"{expr.metric!r} is a histogram: compare {expr.metric}_count or {expr.metric}_sum")
    if expr.function is not None and kind != COUNTER:
        raise ConfigError(f"{expr.function}() needs a counter; {expr.metric!r} is a {kind}")
    return expr


# --- evaluation -------------------------------------------------------------------------------------------


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
        "state",
        "value",
    )

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
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
                    inst = r.instances[key] = _Instance(self._labels(r, key))
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


# --- notifications ----------------------------------------------------------------------------------------

_ZERO_TIME = "0001-01-01T00:00:00Z"


def _rfc3339(t: float | None) -> str:
    if t is None:
        return _ZERO_TIME
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alertmanager_payload(
    alerts: Sequence[Alert], *, receiver: str = "treasure_engine", external_url: str = ""
) -> dict[str, Any]:
    """The JSON body Alertmanager's webhook receiver posts (version 4), for alerts of one group (one rule)."""
    items: list[dict[str, Any]] = [
        {
            "status": "firing" if a.state is AlertState.FIRING else "resolved",
            "labels": dict(a.labels),
            "annotations": dict(a.annotations),
            "startsAt": _rfc3339(a.fired_at or a.active_since),
            "endsAt": _rfc3339(a.resolved_at) if a.state is AlertState.RESOLVED else _ZERO_TIME,
            "generatorURL": f"{external_url}/status" if external_url else "",
            "fingerprint": a.fingerprint,
        }
        for a in alerts
    ]
    common_labels = _common([i["labels"] for i in items])
    group_labels = {"alertname": alerts[0].name} if alerts else {}
    return {
        "version": "4",
        "groupKey": "{}:{" + ",".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}",
        "truncatedAlerts": 0,
        "status": "firing" if any(i["status"] == "firing" for i in items) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": _common([i["annotations"] for i in items]),
        "externalURL": external_url,
        "alerts": items,
    }


def _common(dicts: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not dicts:
        return {}
    first = dict(dicts[0])
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


class WebhookNotifier:
    """Posts Alertmanager-shaped JSON to a URL from a background task: a bounded queue (the oldest payload is
    dropped when it is full), a timeout per post, and bounded retries with exponential backoff on connection
    errors, timeouts, 429 and 5xx. `notify` never blocks."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        queue_size: int = 1000,
        receiver: str = "treasure_engine",
        external_url: Callable[[], str] | str = "",
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.receiver = receiver
        self._external_url = external_url
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=queue_size)
        self._wakeup: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.retries = 0

    def _external(self) -> str:
        return self._external_url() if callable(self._external_url) else self._external_url

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="treasure-engine-webhook")

    def notify(self, alerts: Sequence[Alert]) -> None:
        """Queues one post for `alerts` (one group); returns at once."""
        if not alerts:
            return
        payload = alertmanager_payload(alerts, receiver=self.receiver, external_url=self._external())
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            log.warning("alert webhook queue full: the oldest notification is dropped", extra={"url": self.url})
        self._queue.append(payload)
        if self._wakeup is not None:
            self._wakeup.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            payload = self._queue[0]
            await self._post(payload)
            if self._queue and self._queue[0] is payload:
                self._queue.popleft()
            if not self._queue and self._drained is not None:
                self._drained.set()

    async def _post(self, payload: dict[str, Any]) -> None:
        body = msgspec.json.encode(payload)
        for attempt in range(1, self.max_attempts + 1):
            retry = True
            try:
                async with self._session.post(
                    self.url, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    if 200 <= response.status < 300:
                        self.sent += 1
                        return
                    retry = response.status == 429 or response.status >= 500
                    problem = f"HTTP {response.status}"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection refused, reset, timeout: all worth a retry
                problem = f"{type(e).__name__}: {e}"
            if not retry or attempt == self.max_attempts:
                self.failed += 1
                log.error(
                    "alert webhook %s: gave up after %d attempt(s): %s",
                    self.url,
                    attempt,
                    problem,
                    extra={"url": self.url, "status": payload.get("status")},
                )
                return
            self.retries += 1
            delay = min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))

    async def stop(self, drain_s: float = 2.0) -> None:
        """Gives the queued posts up to `drain_s` to go out, then stops."""
        task = self._task
        if task is not None:
            if self._queue and not task.done():
                self._drained = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), drain_s)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- lag status -------------------------------------------------------------------------------------------


class LagSample(NamedTuple):
    """One look at a shard (its `ShardStats`): when (monotonic seconds), how far behind, where the checkpoint is,
    and its counters."""

    at: float
    millis_behind: int | None
    checkpoint: str | None
    records_read: int
    records_handled: int = 0
    records_failed: int = 0
    paused: bool = False


def lag_status(samples: Sequence[LagSample], window_s: float) -> LagStatus:
    """The status of one shard from its samples over the window (oldest first), in the spirit of Burrow: not a
    threshold on one value, but how lag, checkpoint and reads moved over the window.

    - OK while the shard is caught up (no lag at the last sample), and until the samples span the window;
    - STOP: behind, and nothing moved over the window: no record read, handled or failed, not paused;
    - STALL: behind, and the checkpoint did not move over the window (though records are read, or handler
      attempts fail, or the shard is paused by the downstream breaker);
    - WARN: behind, and the lag never decreased from one sample to the next (the consumer does not keep up);
    - OK otherwise (behind, but catching up at times).
    """
    if not samples:
        return LagStatus.OK
    last, first = samples[-1], samples[0]
    if not last.millis_behind:
        return LagStatus.OK
    if last.at - first.at < window_s:
        return LagStatus.OK
    idle = (
        last.records_read == first.records_read
        and last.records_handled == first.records_handled
        and last.records_failed == first.records_failed
        and not any(s.paused for s in samples)
    )
    if idle:
        return LagStatus.STOP
    if last.checkpoint == first.checkpoint:
        return LagStatus.STALL
    lags = [s.millis_behind for s in samples if s.millis_behind is not None]
    if all(b >= a for a, b in itertools.pairwise(lags)):
        return LagStatus.WARN
    return LagStatus.OK


class LagTracker:
    """Keeps a window of samples per (consumer, shard) and their lag status."""

    def __init__(self, window_s: float = 30.0, sample_every_s: float | None = None) -> None:
        self.window_s = window_s
        self.sample_every_s = sample_every_s if sample_every_s is not None else max(window_s / 30.0, 0.05)
        self._samples: dict[tuple[str, str], collections.deque[LagSample]] = {}
        self.status: dict[tuple[str, str], int] = {}

    def add(self, key: tuple[str, str], sample: LagSample) -> LagStatus:
        """Adds a sample (ignored if the last is younger than `sample_every_s`); returns the status."""
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = collections.deque()
        if samples and sample.at - samples[-1].at < self.sample_every_s:
            return LagStatus(self.status.get(key, 0))
        samples.append(sample)
        # Keep one sample at or before the window's start, so that a full window spans `window_s`.
        horizon = sample.at - self.window_s
        while len(samples) > 1 and samples[1].at <= horizon:
            samples.popleft()
        status = lag_status(samples, self.window_s)
        self.status[key] = int(status)
        return status

    def update(self, now: float, shards: Iterable[tuple[str, Any]]) -> dict[tuple[str, str], int]:
        """Samples `(consumer name, ShardStats)` pairs; shards not listed (or not owned) are forgotten."""
        seen: set[tuple[str, str]] = set()
        for name, s in shards:
            if not s.owned or s.ended:
                continue
            key = (name, s.shard_id)
            seen.add(key)
            self.add(
                key,
                LagSample(
                    now,
                    s.millis_behind_latest,
                    s.checkpoint,
                    s.records_read,
                    s.records_handled,
                    s.records_failed,
                    s.paused,
                ),
            )
        for key in [k for k in self._samples if k not in seen]:
            del self._samples[key]
            self.status.pop(key, None)
        return self.status


# --- default rules ---------------------------------------------------------------------------------------

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
        expr="consumer_behind_latest_seconds > 60",
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
