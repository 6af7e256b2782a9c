"""Downstream without I/O: the gradient limiter against scripted latencies, the retry budget, the config."""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from treasure_engine import ConfigError
from treasure_engine.downstream import DownstreamConfig
from treasure_engine.downstream._limits import GradientLimiter, RetryBudget

WINDOW_S = 0.1


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0


def limiter(clock: Clock, **kw: Any) -> GradientLimiter:
    args: dict[str, Any] = {
        "initial_limit": 20,
        "min_limit": 2,
        "max_limit": 200,
        "rtt_tolerance": 1.5,
        "smoothing": 0.2,
        "backoff_ratio": 0.9,
        "window_s": WINDOW_S,
        "window_min_samples": 10,
        "probe_interval_s": 0.0,
        "rng": random.Random(0),
    }
    args.update(kw)
    lim = GradientLimiter(**args)
    lim.open_window(clock.t)
    return lim


def window(lim: GradientLimiter, clock: Clock, rtt: float, *, in_flight: int | None = None) -> int:
    """Feeds one window: `window_min_samples` calls of latency `rtt`, all started after the window opened, the last
    one completing at least `window_s` after it opened. Returns the limit after it."""
    windows = lim.windows
    start = clock.t
    for i in range(lim.window_min_samples):
        clock.t = start + max(rtt, WINDOW_S) + (i + 1) * 1e-6
        lim.on_sample(rtt, lim.limit if in_flight is None else in_flight, clock.t)
    assert lim.windows == windows + 1, "the scripted window did not close"
    return lim.limit


# --- the gradient limiter ------------------------------------------------------------------------------------------


def test_flat_latency_grows_the_limit_by_its_square_root_per_window() -> None:
    clock = Clock()
    lim = limiter(clock)
    expected = 20.0
    for _ in range(5):
        window(lim, clock, 0.010)
        expected += math.sqrt(expected)
        assert lim.estimate == pytest.approx(expected)
    assert lim.noload_rtt == pytest.approx(0.010)


def test_flat_latency_stops_at_max_limit() -> None:
    clock = Clock()
    lim = limiter(clock, max_limit=60)
    seen = [window(lim, clock, 0.010) for _ in range(30)]
    assert seen == sorted(seen)
    assert seen[-1] == 60
    assert max(seen) == 60


def test_latency_within_tolerance_still_grows() -> None:
    clock = Clock()
    lim = limiter(clock)
    window(lim, clock, 0.010)
    before = lim.estimate
    window(lim, clock, 0.014)  # 1.4x the no-load latency, under rtt_tolerance=1.5: gradient 1
    assert lim.estimate == pytest.approx(before + math.sqrt(before))


def test_climbing_latency_shrinks_the_limit_smoothly() -> None:
    clock = Clock()
    lim = limiter(clock, initial_limit=50)
    window(lim, clock, 0.010)  # no-load latency 10 ms; the limit grows once
    limit = lim.estimate
    window(lim, clock, 0.040)  # 4x: gradient 1.5 * 10 / 40 = 0.375, floored at 0.5
    target = limit * 0.5 + math.sqrt(limit)
    assert lim.estimate == pytest.approx(limit + 0.2 * (target - limit))
    assert lim.estimate < limit


def test_gradient_between_floor_and_one() -> None:
    clock = Clock()
    lim = limiter(clock, initial_limit=100)
    window(lim, clock, 0.010)
    limit = lim.estimate
    window(lim, clock, 0.025)  # gradient 1.5 * 10 / 25 = 0.6
    target = limit * 0.6 + math.sqrt(limit)
    assert lim.estimate == pytest.approx(limit + 0.2 * (target - limit))


def test_sustained_high_latency_falls_to_min_limit_and_no_lower() -> None:
    clock = Clock()
    # With the gradient floored at 0.5, latency alone drives the limit down to 4 (L = L/2 + sqrt(L)); drops go lower.
    lim = limiter(clock, initial_limit=100, min_limit=6)
    first = window(lim, clock, 0.010)
    seen = [window(lim, clock, 0.500) for _ in range(60)]
    assert seen[0] < first
    assert seen == sorted(seen, reverse=True)
    assert seen[-1] == 6
    assert min(seen) == 6
    for _ in range(60):
        clock.t += WINDOW_S
        lim.on_drop(lim.limit, clock.t)
    assert lim.limit == 6


def test_latency_recovering_lets_the_limit_grow_again() -> None:
    clock = Clock()
    lim = limiter(clock, initial_limit=60)
    window(lim, clock, 0.010)
    for _ in range(10):
        window(lim, clock, 0.050)
    low = lim.estimate
    window(lim, clock, 0.010)
    assert lim.estimate == pytest.approx(low + math.sqrt(low))


def test_a_drop_backs_off_by_the_ratio() -> None:
    clock = Clock()
    lim = limiter(clock, initial_limit=40, min_limit=1)
    window(lim, clock, 0.010)
    before = lim.estimate
    clock.t += WINDOW_S
    lim.on_drop(lim.limit, clock.t)
    assert lim.estimate == pytest.approx(before * 0.9)
    for _ in range(100):
        clock.t += WINDOW_S
        lim.on_drop(lim.limit, clock.t)
    assert lim.limit == 1


def test_app_limited_windows_leave_the_limit_alone_but_teach_the_no_load_latency() -> None:
    clock = Clock()
    lim = limiter(clock, initial_limit=40)
    window(lim, clock, 0.030, in_flight=19)  # peak in flight under half the limit
    assert lim.estimate == 40
    assert lim.noload_rtt == pytest.approx(0.030)
    window(lim, clock, 0.010, in_flight=3)
    assert lim.estimate == 40
    assert lim.noload_rtt == pytest.approx(0.010)
    window(lim, clock, 0.010, in_flight=20)  # half the limit: the limit binds
    assert lim.estimate == pytest.approx(40 + math.sqrt(40))


def test_calls_started_before_the_window_opened_are_left_out() -> None:
    clock = Clock()
    lim = limiter(clock)
    window(lim, clock, 0.010)
    before, opened = lim.estimate, clock.t
    # A slow call that started before this window opened: it measured the old limit.
    clock.t = opened + 0.5
    lim.on_sample(0.6, lim.limit, clock.t)
    assert lim.stale == 1
    assert lim.windows == 1
    assert lim.estimate == before


def test_window_needs_both_its_duration_and_its_samples() -> None:
    clock = Clock()
    lim = limiter(clock, window_min_samples=10)
    for _ in range(9):
        clock.t += WINDOW_S
        lim.on_sample(0.001, lim.limit, clock.t)
    assert lim.windows == 0
    clock.t += 0.001
    lim.on_sample(0.001, lim.limit, clock.t)
    assert lim.windows == 1
    lim2 = limiter(clock, window_min_samples=1)
    for _ in range(50):  # plenty of samples, all in the first 50 ms
        clock.t += 0.001
        lim2.on_sample(0.0001, lim2.limit, clock.t)
    assert lim2.windows == 0


def test_probe_halves_the_limit_and_relearns_no_load_latency() -> None:
    clock = Clock()
    lim = limiter(clock, initial_limit=40, probe_interval_s=1.0)
    window(lim, clock, 0.020)  # no-load latency learned under load: 20 ms
    while lim.probes == 0:
        before = lim.estimate
        window(lim, clock, 0.020)
    assert lim.estimate == pytest.approx(before / 2)
    assert lim.noload_rtt is None
    window(lim, clock, 0.005)
    assert lim.noload_rtt == pytest.approx(0.005)


def test_fixed_limit_never_moves() -> None:
    clock = Clock()
    lim = limiter(clock, initial_limit=64, min_limit=64, max_limit=64)
    for rtt in (0.001, 0.5, 0.001):
        assert window(lim, clock, rtt) == 64
    lim.on_drop(64, clock.t + 1)
    assert lim.limit == 64


@given(
    rtts=st.lists(st.floats(min_value=1e-4, max_value=2.0), min_size=1, max_size=60),
    drops=st.lists(st.booleans(), min_size=60, max_size=60),
    bounds=st.tuples(st.integers(1, 50), st.integers(0, 200)),
)
def test_limit_stays_within_bounds(rtts: list[float], drops: list[bool], bounds: tuple[int, int]) -> None:
    lo, extra = bounds
    clock = Clock()
    lim = limiter(clock, min_limit=lo, max_limit=lo + extra, initial_limit=lo, probe_interval_s=0.5)
    for rtt, drop in zip(rtts, drops, strict=False):
        if drop:
            clock.t += WINDOW_S
            lim.on_drop(lim.limit, clock.t)
        else:
            window(lim, clock, rtt)
        assert lo <= lim.limit <= lo + extra
        assert lo <= lim.estimate <= lo + extra


# --- the retry budget ----------------------------------------------------------------------------------------------


def test_retry_budget_starts_empty_and_each_call_buys_a_fraction_of_a_retry() -> None:
    budget = RetryBudget(0.1, 10.0)
    assert not budget.try_withdraw()
    for _ in range(9):
        budget.deposit()
    assert not budget.try_withdraw()
    budget.deposit()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    assert (budget.deposits, budget.withdrawals, budget.denied) == (10, 1, 3)
    assert budget.tokens == pytest.approx(0.0)


def test_retry_budget_is_capped() -> None:
    budget = RetryBudget(0.5, 3.0)
    for _ in range(100):
        budget.deposit()
    assert budget.tokens == 3.0
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]


def test_retry_budget_zero_ratio_never_retries() -> None:
    budget = RetryBudget(0.0, 10.0)
    for _ in range(1000):
        budget.deposit()
    assert not budget.try_withdraw()


@given(
    ratio=st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.5, 1.0]),
    ops=st.lists(st.booleans(), max_size=500),
)
def test_retries_never_exceed_ratio_of_calls(ratio: float, ops: list[bool]) -> None:
    budget = RetryBudget(ratio, 10.0)
    for deposit in ops:
        if deposit:
            budget.deposit()
        else:
            budget.try_withdraw()
        assert budget.withdrawals <= ratio * budget.deposits + 1e-6
        assert 0.0 <= budget.tokens <= 10.0


# --- the config ----------------------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    c = DownstreamConfig()
    assert (c.limiter, c.initial_limit, c.min_limit, c.max_limit) == ("gradient", 20, 1, 100)
    assert (c.rtt_tolerance, c.smoothing, c.backoff_ratio) == (1.5, 0.2, 0.9)
    assert (c.max_attempts, c.retry_ratio, c.retry_budget_max) == (3, 0.1, 10.0)
    assert c.retry_statuses == (429, 500, 502, 503, 504)
    assert "POST" not in c.retry_methods
    assert c.timeout_s == 10.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_s", 0),
        ("timeout_s", -1.0),
        ("max_connections", 0),
        ("min_limit", 0),
        ("initial_limit", 500),
        ("initial_limit", 0),
        ("rtt_tolerance", 0.9),
        ("smoothing", 0.0),
        ("smoothing", 1.5),
        ("backoff_ratio", 1.0),
        ("backoff_ratio", 0.0),
        ("window_s", -0.1),
        ("window_min_samples", 0),
        ("probe_interval_s", -1.0),
        ("max_queue", -1),
        ("queue_timeout_s", -0.5),
        ("max_attempts", 0),
        ("retry_ratio", -0.1),
        ("retry_ratio", 1.5),
        ("retry_budget_max", -1.0),
        ("retry_statuses", (503, 700)),
        ("retry_methods", ("get",)),
        ("backoff_base_s", -0.1),
        ("backoff_max_s", 0.01),
        ("limiter", "vegas"),
        ("max_attempts", 2.5),
        ("retry_on_timeout", 1),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        DownstreamConfig(**{field: value})  # type: ignore[arg-type]


def test_config_max_limit_below_min_limit() -> None:
    with pytest.raises(ConfigError, match=r"\bmax_limit\b"):
        DownstreamConfig(min_limit=10, max_limit=5, initial_limit=10)


def test_config_is_frozen_and_refuses_unknown_fields() -> None:
    c = DownstreamConfig()
    with pytest.raises(AttributeError):
        c.timeout_s = 1.0  # type: ignore[misc]
    with pytest.raises(msgspec.ValidationError, match="retries"):
        msgspec.convert({"retries": 3}, DownstreamConfig)
    with pytest.raises(TypeError):
        DownstreamConfig(retries=3)  # type: ignore[call-arg]
