"""The event loop (uvloop when installed): `run()` for the command line, and a loop on a daemon thread for the
`background()` wrappers that let threaded services (WSGI, Flask) drive the engine's async parts with blocking
calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from treasure_engine.errors import FlushTimeout

T = TypeVar("T")


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's, or asyncio's where uvloop is missing (the one place that falls back)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a `new_loop()`: the command line and the demo run their coroutines so."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


class LoopThread:
    """Runs a loop on a daemon thread named `name`; `call()` runs a coroutine there and waits for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def call(self, aw: Awaitable[Any], timeout: float | None) -> Any:
        """The result of `aw` run on the loop; `FlushTimeout` when it takes `timeout` (plus a grace of 5 s, for
        calls that keep to `timeout` themselves)."""

        async def run() -> Any:
            return await aw

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return future.result(None if timeout is None else timeout + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise FlushTimeout(f"{self.name} did not answer in time") from None

    def stop(self) -> None:
        """Stops the loop and joins the thread (after the last `call`)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
