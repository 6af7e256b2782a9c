"""Calls to a downstream service: the client (`_downstream`) and its load shedding (`_limits`).

Private: the public names are re-exported by `treasure_engine`; the others here are for the package's own modules.
"""

from treasure_engine.downstream._downstream import (
    Downstream,
    DownstreamClosed,
    DownstreamConfig,
    DownstreamError,
    DownstreamMetrics,
    DownstreamOverloaded,
    DownstreamResponse,
    DownstreamState,
    DownstreamTimeout,
    DownstreamUnavailable,
)

__all__ = [
    "Downstream",
    "DownstreamClosed",
    "DownstreamConfig",
    "DownstreamError",
    "DownstreamMetrics",
    "DownstreamOverloaded",
    "DownstreamResponse",
    "DownstreamState",
    "DownstreamTimeout",
    "DownstreamUnavailable",
]
