"""The alert expression language: a small PromQL subset parsed and compiled against the metric
catalogue."""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from treasure_engine._core import ConfigError
from treasure_engine.monitoring._catalog import CATALOG, COUNTER, HISTOGRAM, REGISTRY, Labels

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
