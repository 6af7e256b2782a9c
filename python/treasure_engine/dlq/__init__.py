"""The dead-letter queue: entries and their encoding (`_entries`), the store and its queries (`_store`), and
redrive through a `Submitter` (`_redrive`).

Private: the public names are re-exported by `treasure_engine`; the others here are for the package's own modules.
"""

from treasure_engine.dlq._entries import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStats,
    RedriveReport,
    VerifyReport,
    format_traceback,
)
from treasure_engine.dlq._store import DeadLetterQueue, claim_slot

__all__ = [
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterQueue",
    "DeadLetterStats",
    "RedriveReport",
    "VerifyReport",
    "claim_slot",
    "format_traceback",
]
