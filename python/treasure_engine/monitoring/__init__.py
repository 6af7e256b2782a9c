"""Monitoring: the metric catalogue (`_catalog`), snapshots (`_snapshot`), the Prometheus exposition
(`_exposition`), alert expressions (`_expr`), rules (`_rules`), notifiers (`_notifiers`), lag status (`_lag`) and
the `Monitor` that serves and evaluates them (`_monitor`).

Private: the public names are re-exported by `treasure_engine`; the others here are for the package's own modules.
"""

from treasure_engine.monitoring._catalog import REGISTRY
from treasure_engine.monitoring._lag import LagStatus
from treasure_engine.monitoring._monitor import Monitor, MonitorConfig, MonitorState
from treasure_engine.monitoring._rules import Alert, AlertRule, AlertState
from treasure_engine.monitoring._snapshot import ConsumerMetrics, ProducerMetrics

__all__ = [
    "REGISTRY",
    "Alert",
    "AlertRule",
    "AlertState",
    "ConsumerMetrics",
    "LagStatus",
    "Monitor",
    "MonitorConfig",
    "MonitorState",
    "ProducerMetrics",
]
