"""Per-shard lag status in the spirit of Burrow (OK / WARN / STALL / STOP), not only a threshold."""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


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
