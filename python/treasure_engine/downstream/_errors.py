"""The errors of a call to a downstream service."""

from __future__ import annotations

from treasure_engine._core import TreasureEngineError


class DownstreamError(TreasureEngineError):
    """A call to a downstream service failed without a response."""


class DownstreamOverloaded(DownstreamError):
    """The concurrency limit is full and the queue too (or the wait ran out): nothing was sent. Not retried."""


class DownstreamTimeout(DownstreamError, TimeoutError):
    """The call's deadline (`timeout_s`) passed before a response arrived."""


class DownstreamUnavailable(DownstreamError, ConnectionError):
    """The service could not be reached or dropped the connection (refused, reset, closed mid-response)."""


class DownstreamClosed(DownstreamError):
    """A call on a `Downstream` that is not started, or already closed."""
