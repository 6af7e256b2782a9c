"""HTTP test servers in processes of their own (their timers stay true while the test's event loop is busy).

The child side: `serve(app)` listens on a free port of 127.0.0.1, prints ``LISTENING <port>`` and serves until
its stdin closes (the parent stopped it, or died). The parent side: `ServerProcess` starts ``python -m MODULE
ARGS...`` in the repository root, reads the port into ``.url`` and stops the child on ``stop()`` or on exit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from aiohttp import web

_ROOT = Path(__file__).resolve().parents[2]


async def _serve(app: web.Application) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await runner.cleanup()


def serve(app: web.Application) -> None:
    """Serves `app` (see the module doc) on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(_serve(app))
    else:
        uvloop.run(_serve(app))


class ServerProcess:
    """``python -m module *args`` as a child server (see the module doc)."""

    def __init__(self, module: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"{module} did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
