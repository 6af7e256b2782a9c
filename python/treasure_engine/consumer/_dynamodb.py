"""The DynamoDB plumbing of the lease table: one aiobotocore session per event loop, and writes kept to a
bounded number in flight."""

from __future__ import annotations

import asyncio
import builtins
import weakref
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from aiobotocore.session import AioSession, get_session

T = TypeVar("T")


CONCURRENCY = 16
"""Writes one call (sync_shards, renew_all, rebalance, release_all) keeps in flight at once."""


_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AioSession] = weakref.WeakKeyDictionary()


def session_for_loop() -> AioSession:
    """One botocore session per event loop: it caches the service model (~0.1 s to load) and the credentials,
    whose refresh lock belongs to one loop."""
    loop = asyncio.get_running_loop()
    session = _SESSIONS.get(loop)
    if session is None:
        session = _SESSIONS[loop] = get_session()
    return session


async def gather_bounded(aws: Sequence[Awaitable[T]], limit: int = CONCURRENCY) -> builtins.list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with sem:
            return await aw

    return list(await asyncio.gather(*(one(aw) for aw in aws)))
