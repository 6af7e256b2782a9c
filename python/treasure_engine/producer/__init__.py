"""The producer: lifecycle and flush (`_producer`), the sender's breaker and pipeline (`_sender`), its dead
letters (`_dead_letters`), and its state, stats and submit types (`_types`).

Private: the public names are re-exported by `treasure_engine`; the others here are for the package's own modules.
"""

from treasure_engine.producer._dead_letters import DeadLetterHook
from treasure_engine.producer._producer import BackgroundProducer, Producer
from treasure_engine.producer._types import ProducerState, ProducerStats, submit_waiting

__all__ = ["BackgroundProducer", "DeadLetterHook", "Producer", "ProducerState", "ProducerStats", "submit_waiting"]
