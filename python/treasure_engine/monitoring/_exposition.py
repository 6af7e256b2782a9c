"""Prometheus text exposition of a `Snapshot` (format 0.0.4), with the escaping and number formatting
of the reference client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from treasure_engine.monitoring._catalog import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    PREFIX,
    Family,
    HistogramValue,
    Labels,
    Snapshot,
    Value,
)

_go_float: Callable[[float], str] = floatToGoString
"""prometheus_client's float formatting (Go's), for values and bucket bounds."""


def _le(bound: float) -> str:
    return _go_float(bound)


def families_of(snapshot: Snapshot) -> Iterator[Metric]:
    """A snapshot as prometheus_client metric families (names prefixed)."""
    for f in snapshot:
        if f.kind == COUNTER:
            base = f.name[: -len("_total")] if f.name.endswith("_total") else f.name
            m = Metric(PREFIX + base, f.help, COUNTER)
            sample = PREFIX + base + "_total"
            for labels, value in zip(f.labels, f.values, strict=True):
                m.add_sample(sample, dict(labels), float(cast("float", value)))
        elif f.kind == HISTOGRAM:
            m = Metric(PREFIX + f.name, f.help, HISTOGRAM)
            for labels, value in zip(f.labels, f.values, strict=True):
                bounds, counts, total, count = cast("HistogramValue", value)
                plain = dict(labels)
                for bound, c in zip(bounds, counts, strict=True):
                    m.add_sample(PREFIX + f.name + "_bucket", {**plain, "le": _le(bound)}, float(c))
                m.add_sample(PREFIX + f.name + "_count", plain, float(count))
                m.add_sample(PREFIX + f.name + "_sum", plain, float(total))
        else:
            m = Metric(PREFIX + f.name, f.help, GAUGE if f.kind == GAUGE else "unknown")
            for labels, value in zip(f.labels, f.values, strict=True):
                m.add_sample(PREFIX + f.name, dict(labels), float(cast("float", value)))
        yield m


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(h: str) -> str:
    return h.replace("\\", r"\\").replace("\n", r"\n")


def _value(value: float) -> str:
    """`floatToGoString(value)`, without its function calls for the common cases: it is `repr(float(value))`
    for every finite value below 1e6 (Go switches to exponents from there)."""
    if type(value) is int and -(1 << 53) < value < 1_000_000:
        return f"{value}.0"
    if type(value) is float and -1e300 < value < 1e6:
        return repr(value)
    return _go_float(value)


class Encoder:
    """Prometheus text format (0.0.4), byte for byte what `prometheus_client.generate_latest` writes for
    `families_of(snapshot)` (a test holds it to that), several times faster: the text before each value
    (name, labels, escaping) is made once per series and kept, a line (or a whole family) whose values did not
    change since the last scrape is reused, and values are formatted as prometheus_client's `floatToGoString`
    does."""

    MAX_CACHED = 50_000

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str, str], str] = {}
        self._prefixes: dict[str, dict[Labels, str]] = {}
        self._buckets: dict[tuple[str, Labels, tuple[float, ...]], list[str]] = {}
        self._last: dict[str, dict[Labels, tuple[float, str]]] = {}
        self._chunks: dict[str, tuple[list[Labels], list[Value], str]] = {}
        """sample -> (labels, values, text) of the whole family at the last scrape."""
        """sample -> labels -> (value, line) of the last scrape: a value that did not change is not formatted."""
        self._cached = 0

    def _head(self, name: str, help: str, kind: str) -> str:
        key = (name, help, kind)
        head = self._heads.get(key)
        if head is None:
            shown = PREFIX + name
            typ = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}.get(kind, "untyped")
            head = self._heads[key] = f"# HELP {shown} {_escape_help(help)}\n# TYPE {shown} {typ}\n"
        return head

    def _cache(self, sample: str) -> dict[Labels, str]:
        cache = self._prefixes.get(sample)
        if cache is None:
            cache = self._prefixes[sample] = {}
        return cache

    def _prefix(self, sample: str, labels: Labels) -> str:
        cache = self._cache(sample)
        prefix = cache.get(labels)
        if prefix is None:
            if labels:
                inner = ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels))
                prefix = f"{PREFIX}{sample}{{{inner}}} "
            else:
                prefix = f"{PREFIX}{sample} "
            cache[labels] = prefix
            self._cached += 1
        return prefix

    def _bucket_prefixes(self, name: str, labels: Labels, bounds: tuple[float, ...]) -> list[str]:
        key = (name, labels, bounds)
        found = self._buckets.get(key)
        if found is None:
            found = self._buckets[key] = [self._prefix(name + "_bucket", (*labels, ("le", _le(b)))) for b in bounds]
        return found

    def _lines(self, out: list[str], sample: str, family: Family) -> None:
        chunk = self._chunks.get(sample)
        # A family whose series and values are all as at the last scrape (a paused flag, a lag status, a
        # counter that did not move) is the same text: two list comparisons in C instead of a line per series.
        if chunk is not None and chunk[1] == family.values and chunk[0] == family.labels:
            out.append(chunk[2])
            return
        lines = self._last.get(sample)
        if lines is None:
            lines = self._last[sample] = {}
        last = lines.get
        mine: list[str] = []
        append = mine.append
        for labels, value in zip(family.labels, family.values, strict=True):
            v = cast("float", value)
            hit = last(labels)
            if hit is not None and hit[0] == v:  # unchanged since the last scrape (NaN never is)
                append(hit[1])
                continue
            prefix = self._prefix(sample, labels)
            if type(v) is int and -(1 << 53) < v < 1_000_000:
                line = f"{prefix}{v}.0\n"
            elif type(v) is float and -1e300 < v < 1e6:
                line = f"{prefix}{v!r}\n"
            else:
                line = f"{prefix}{_go_float(v)}\n"
            lines[labels] = (v, line)
            append(line)
        text = "".join(mine)
        self._chunks[sample] = (family.labels, family.values, text)
        out.append(text)

    def encode(self, snapshot: Snapshot) -> bytes:
        if self._cached > self.MAX_CACHED:  # series come and go (shards): start afresh now and then
            self._prefixes.clear()
            self._buckets.clear()
            self._last.clear()
            self._chunks.clear()
            self._cached = 0
        out: list[str] = []
        append = out.append
        for f in snapshot:
            name, kind = f.name, f.kind
            if kind == COUNTER:
                sample = name if name.endswith("_total") else name + "_total"
                append(self._head(sample, f.help, kind))
                self._lines(out, sample, f)
            elif kind == HISTOGRAM:
                append(self._head(name, f.help, kind))
                for labels, value in zip(f.labels, f.values, strict=True):
                    bounds, counts, total, count = cast("HistogramValue", value)
                    for p, c in zip(self._bucket_prefixes(name, labels, bounds), counts, strict=True):
                        append(p + _value(c) + "\n")
                    append(self._prefix(name + "_count", labels) + _value(count) + "\n")
                    append(self._prefix(name + "_sum", labels) + _value(total) + "\n")
            else:
                append(self._head(name, f.help, kind))
                self._lines(out, name, f)
        return "".join(out).encode()


def encode(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of `snapshot` (a fresh `Encoder`; keep one to reuse its caches)."""
    return Encoder().encode(snapshot)
