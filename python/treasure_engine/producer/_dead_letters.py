"""Dead letters of the producer: the drain that stores what the batcher gives up on, in the queue or through
the hook that may take them instead."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from treasure_engine import _core
from treasure_engine.dlq import DeadLetter, DeadLetterQueue

log = logging.getLogger("treasure_engine.producer")

DEAD_LETTER_BATCH = 10_000
"""Most dead letters handed to the hook at once (memory stays bounded however many there are)."""


DeadLetterHook = Callable[[list[DeadLetter]], Awaitable[None] | None]
"""Called with batches of dead letters instead of the dead-letter queue; they count as dead-lettered once it
returns without raising (until then they are kept and offered again)."""


class DeadLetterDrain:
    """Takes the batcher's dead letters into the dead-letter queue (or the hook instead) in bounded batches.
    Letters a failed store leaves are kept and offered again first; the batcher counts them dead-lettered only
    once stored (`confirm_dead`)."""

    def __init__(
        self,
        stream: str,
        app_name: str,
        hook: DeadLetterHook | None,
        pipeline: Callable[[], _core.Pipeline | None],
        progress: asyncio.Event,
    ) -> None:
        self.stream = stream
        self.app_name = app_name
        self.hook = hook
        self.dlq: DeadLetterQueue | None = None
        """The queue, once the producer claimed it (None with a hook)."""
        self.failures = 0
        """Failed attempts to store dead letters."""
        self.pending: list[DeadLetter] = []
        """Taken from the batcher, not yet stored."""
        self.wake = asyncio.Event()
        """Set when the batcher reports dead letters."""
        self._pipeline = pipeline
        self._progress = progress

    async def pump(self) -> None:
        """Stores dead letters when the batcher reports them; a failed store is tried again every 50 ms."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05 if self.pending else 1.0):
                    await self.wake.wait()
            self.wake.clear()
            await self.drain(final=False)

    async def drain(self, *, final: bool) -> None:
        while await self.drain_batch(final=final):
            pass

    async def drain_batch(self, *, final: bool) -> bool:
        """Hands one bounded batch of dead letters to the hook; True when there may be more."""
        pipeline = self._pipeline()
        if pipeline is None:
            return False
        now = time.time()
        # Letters a failed store left here go first; the batch handed to the store never grows past the limit.
        room = DEAD_LETTER_BATCH - len(self.pending)
        for rec in pipeline.take_dead(room) if room > 0 else ():
            self.pending.append(
                DeadLetter(
                    data=rec.data,
                    partition_key=rec.partition_key,
                    explicit_hash_key=rec.explicit_hash_key,
                    source="producer",
                    stream=self.stream,
                    attempts=rec.attempts,
                    error_type=rec.error_code,
                    error_message=rec.error_message,
                    first_failure_at=now if rec.failed_age_s is None else now - rec.failed_age_s,
                    dead_lettered_at=now,
                    app_name=self.app_name,
                    engine_version=_core.__version__,
                )
            )
        if not self.pending:
            return False
        batch = self.pending
        try:
            if self.dlq is not None:
                await asyncio.to_thread(self.dlq.put, batch)
            elif self.hook is not None:
                result = self.hook(batch)
                if inspect.isawaitable(result):
                    await result
        except Exception:
            self.failures += 1
            log.exception(
                "cannot store %d dead letter(s); they are kept and retried",
                len(batch),
                extra={"stream": self.stream, "dead_letter_write_failures": self.failures},
            )
            if final:
                raise
            return False
        self.pending = []
        pipeline.confirm_dead(len(batch))
        self._progress.set()
        return len(batch) >= DEAD_LETTER_BATCH
