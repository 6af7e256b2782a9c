"""Calls to a downstream service: the client (`_downstream`), its errors (`_errors`) and its load shedding
(`_limits`: the concurrency limit, the admission queue, the retry budget).

Private: the public names are re-exported by `treasure_engine`; the others here are for the package's own modules.
"""

from treasure_engine.downstream._downstream import (
    Downstream,
    DownstreamConfig,
    DownstreamMetrics,
    DownstreamResponse,
    DownstreamState,
)
from treasure_engine.downstream._errors import (
    DownstreamClosed,
    DownstreamError,
    DownstreamOverloaded,
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
