"""The consumer: leases (`_leases`, `_coordinator`), one worker per owned shard that reads and dispatches
(`_worker`), and what the handler sees (`_types`).

Private: the public names are re-exported by `treasure_engine`; the others here are for the package's own modules.
"""

from treasure_engine.consumer._consumer import Consumer
from treasure_engine.consumer._coordinator import LeaseCoordinator
from treasure_engine.consumer._leases import AT_TIMESTAMP, LATEST, SHARD_END, TRIM_HORIZON, Lease, LeaseTable
from treasure_engine.consumer._types import BatchResult, Handler, ShardStats

__all__ = [
    "AT_TIMESTAMP",
    "LATEST",
    "SHARD_END",
    "TRIM_HORIZON",
    "BatchResult",
    "Consumer",
    "Handler",
    "Lease",
    "LeaseCoordinator",
    "LeaseTable",
    "ShardStats",
]
