"""The metrics registry of the Rust core through Python (`treasure_engine._core.Metrics`): get-or-create, labels,
kinds, the snapshot's shape, bad names, remove, and recording from threads."""

from __future__ import annotations

import math
import threading

import pytest

from treasure_engine import ConfigError
from treasure_engine._core import Counter, Gauge, Histogram, Metrics


def test_get_or_create_returns_the_same_metric() -> None:
    m = Metrics()
    c = m.counter("te_records_total", "Records.", {"shard": "1"})
    assert isinstance(c, Counter)
    assert m.counter("te_records_total", "Other help is ignored.", {"shard": "1"}) is c
    assert m.counter("te_records_total", "Records.", {"shard": "2"}) is not c
    g = m.gauge("te_lag_seconds", "Lag.")
    assert isinstance(g, Gauge)
    assert m.gauge("te_lag_seconds", "Lag.", None) is g
    assert m.gauge("te_lag_seconds", "Lag.", {}) is g
    h = m.histogram("te_put_seconds", "Put.")
    assert isinstance(h, Histogram)
    assert m.histogram("te_put_seconds", "Put.", kind="seconds") is h
    assert len(m) == 4


def test_labels_are_order_insensitive_and_sorted_in_the_snapshot() -> None:
    m = Metrics()
    a = m.counter("x_total", "X.", {"stream": "s", "shard": "1", "app": "a"})
    assert m.counter("x_total", "X.", {"app": "a", "shard": "1", "stream": "s"}) is a
    ((name, help_, kind, labels, value),) = m.snapshot()
    assert (name, help_, kind) == ("x_total", "X.", "counter")
    assert labels == (("app", "a"), ("shard", "1"), ("stream", "s"))
    assert value == 0.0


def test_counter() -> None:
    c = Metrics().counter("c_total", "C.")
    c.inc()
    c.inc(2)
    c.inc(0.5)
    c.inc(n=1.5)
    c.inc(True)
    assert c.value == 6.0
    for bad in (-1, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="counter only goes up"):
            c.inc(bad)
    with pytest.raises(TypeError):
        c.inc("1")  # type: ignore[arg-type]
    assert c.value == 6.0
    c.inc(2**62)
    assert c.value == 2**62 + 6.0


def test_gauge() -> None:
    g = Metrics().gauge("g", "G.")
    assert g.value == 0.0
    g.set(5)
    g.inc()
    g.inc(2.5)
    g.dec()
    g.dec(0.5)
    assert g.value == 7.0
    g.set(-1.25)
    assert g.value == -1.25
    g.set(math.nan)
    assert math.isnan(g.value)
    with pytest.raises(TypeError):
        g.set(None)  # type: ignore[arg-type]


def test_histogram_snapshot_is_cumulative_and_bounded_by_inf() -> None:
    m = Metrics()
    h = m.histogram("te_put_seconds", "Put latency.", {"shard": "1"})
    values = [1e-7, 0.001, 0.001, 0.25, 0.5, 0.75, 3.0, 90.0, 1e5]
    for v in values:
        h.observe(v)
    for bad in (-1.0, math.nan):
        h.observe(bad)
    assert h.count == len(values)
    assert h.rejected == 2
    assert h.sum == pytest.approx(sum(values))
    ((name, _, kind, labels, value),) = m.snapshot()
    assert (name, kind, labels) == ("te_put_seconds", "histogram", (("shard", "1"),))
    assert isinstance(value, tuple)
    bounds, cumulative, total, count = value
    assert len(bounds) == len(cumulative) <= 40
    assert bounds[-1] == math.inf
    assert list(bounds) == sorted(bounds)
    assert bounds[0] <= 1e-6
    assert bounds[-2] >= 3600
    assert list(cumulative) == sorted(cumulative)
    assert cumulative[-1] == count == len(values)
    assert total == pytest.approx(sum(values))
    # The bounds are powers of two and the buckets closed above, so each cumulative count is exact.
    for b, c in zip(bounds, cumulative, strict=True):
        assert c == sum(1 for v in values if v <= b), b
    assert 0.5 in bounds
    assert cumulative[bounds.index(0.5)] == 5


def test_count_histogram() -> None:
    m = Metrics()
    h = m.histogram("te_batch_records", "Batch size.", kind="count")
    for n in (1, 2, 500, 500, 10**7):
        h.observe(n)
    ((_, _, _, _, value),) = m.snapshot()
    assert isinstance(value, tuple)
    bounds, cumulative, total, count = value
    assert bounds[0] == 1.0
    assert bounds[-2] == 2.0**20
    assert bounds[-1] == math.inf
    assert cumulative[0] == 1
    assert cumulative[-2] == 4
    assert count == 5
    assert total == 1 + 2 + 500 + 500 + 10**7
    with pytest.raises(ConfigError):
        m.histogram("te_batch_records", "Batch size.")  # same name, other layout
    with pytest.raises(ConfigError, match="kind"):
        m.histogram("other", "O.", kind="bytes")  # type: ignore[arg-type]


def test_snapshot_kinds_and_order() -> None:
    m = Metrics()
    m.gauge("b_gauge", "B.").set(2)
    m.counter("a_total", "A.", {"shard": "2"}).inc(3)
    m.counter("a_total", "A.", {"shard": "1"}).inc(1)
    m.histogram("c_seconds", "C.").observe(0.1)
    snap = m.snapshot()
    assert [(s[0], s[2], s[3]) for s in snap] == [
        ("a_total", "counter", (("shard", "1"),)),
        ("a_total", "counter", (("shard", "2"),)),
        ("b_gauge", "gauge", ()),
        ("c_seconds", "histogram", ()),
    ]
    assert [s[4] for s in snap[:3]] == [1.0, 3.0, 2.0]
    # Snapshots are fresh values each time.
    m.counter("a_total", "A.", {"shard": "1"}).inc()
    assert m.snapshot()[0][4] == 2.0


def test_a_name_keeps_its_kind() -> None:
    m = Metrics()
    m.counter("x", "X.")
    with pytest.raises(ConfigError, match="counter"):
        m.gauge("x", "X.")
    with pytest.raises(ConfigError):
        m.histogram("x", "X.", {"a": "b"})


@pytest.mark.parametrize("name", ["", "1x", "a-b", "a b", "a.b", "é"])
def test_bad_metric_names(name: str) -> None:
    m = Metrics()
    with pytest.raises(ConfigError, match="name"):
        m.counter(name, "help")
    with pytest.raises(ValueError, match="not a metric name"):  # ConfigError is a ValueError
        m.gauge(name, "help")
    assert len(m) == 0


@pytest.mark.parametrize("label", ["", "1x", "a:b", "__reserved", "a-b"])
def test_bad_label_names(label: str) -> None:
    with pytest.raises(ConfigError, match="label"):
        Metrics().counter("ok_total", "help", {label: "v"})


def test_le_is_reserved_on_histograms_and_labels_must_be_strings() -> None:
    m = Metrics()
    with pytest.raises(ConfigError, match="le"):
        m.histogram("h_seconds", "H.", {"le": "1"})
    m.counter("c_total", "C.", {"le": "1"})  # fine on a counter
    with pytest.raises(TypeError):
        m.counter("c_total", "C.", {"shard": 1})  # type: ignore[dict-item]


def test_remove() -> None:
    m = Metrics()
    c = m.counter("c_total", "C.", {"shard": "1"})
    m.counter("c_total", "C.", {"shard": "2"})
    assert m.remove("c_total", {"shard": "1"})
    assert not m.remove("c_total", {"shard": "1"})
    assert not m.remove("nothing")
    assert len(m) == 1
    c.inc()  # still works, unseen
    assert [s[3] for s in m.snapshot()] == [(("shard", "2"),)]
    c2 = m.counter("c_total", "C.", {"shard": "1"})
    assert c2 is not c
    assert c2.value == 0.0
    assert m.remove("c_total", {"shard": "1"})
    assert m.remove("c_total", {"shard": "2"})
    assert len(m) == 0
    assert m.snapshot() == []
    m.gauge("c_total", "Now a gauge.")  # the family went with its last series


def test_threads_from_python() -> None:
    m = Metrics()
    threads, per_thread = 4, 20_000
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        c = m.counter("c_total", "C.", {"k": "v"})
        g = m.gauge("g", "G.")
        h = m.histogram("h", "H.", kind="count")
        for i in range(per_thread):
            c.inc()
            g.inc()
            g.dec(0.5)
            h.observe(i % 100 + 1)
        m.counter("own_total", "Own.", {"t": str(t)}).inc()
        m.snapshot()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert m.counter("c_total", "C.", {"k": "v"}).value == threads * per_thread
    assert m.gauge("g", "G.").value == threads * per_thread * 0.5
    h = m.histogram("h", "H.", kind="count")
    assert h.count == threads * per_thread
    assert h.sum == threads * sum(i % 100 + 1 for i in range(per_thread))
    assert len(m) == 3 + threads


def test_snapshots_follow_every_change() -> None:
    # Unchanged series are given the previous snapshot's tuples again: make sure a change always shows.
    m = Metrics()
    c = m.counter("c_total", "C.")
    g = m.gauge("g", "G.")
    h = m.histogram("h_seconds", "H.")
    first = m.snapshot()
    assert m.snapshot() == first
    for i in range(1, 50):
        c.inc(0.5)
        g.set(-i)
        h.observe(0.0)  # a zero changes the count, not the sum
        (counter, gauge, hist) = m.snapshot()
        assert counter[4] == i * 0.5
        assert gauge[4] == -i
        assert isinstance(hist[4], tuple)
        assert hist[4][3] == i
        assert hist[4][1][0] == i
        assert hist[4][2] == 0.0
    g.set(-49)  # same value: same tuple, and still right
    assert m.snapshot()[1][4] == -49
