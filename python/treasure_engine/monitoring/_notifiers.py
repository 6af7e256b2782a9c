"""Notifiers of alert transitions: the Alertmanager-compatible webhook."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from treasure_engine.monitoring._rules import Alert, AlertState

log = logging.getLogger("treasure_engine.alerts")


_ZERO_TIME = "0001-01-01T00:00:00Z"


def _rfc3339(t: float | None) -> str:
    if t is None:
        return _ZERO_TIME
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alertmanager_payload(
    alerts: Sequence[Alert], *, receiver: str = "treasure_engine", external_url: str = ""
) -> dict[str, Any]:
    """The JSON body Alertmanager's webhook receiver posts (version 4), for alerts of one group (one rule)."""
    items: list[dict[str, Any]] = [
        {
            "status": "firing" if a.state is AlertState.FIRING else "resolved",
            "labels": dict(a.labels),
            "annotations": dict(a.annotations),
            "startsAt": _rfc3339(a.fired_at or a.active_since),
            "endsAt": _rfc3339(a.resolved_at) if a.state is AlertState.RESOLVED else _ZERO_TIME,
            "generatorURL": f"{external_url}/status" if external_url else "",
            "fingerprint": a.fingerprint,
        }
        for a in alerts
    ]
    common_labels = _common([i["labels"] for i in items])
    group_labels = {"alertname": alerts[0].name} if alerts else {}
    return {
        "version": "4",
        "groupKey": "{}:{" + ",".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}",
        "truncatedAlerts": 0,
        "status": "firing" if any(i["status"] == "firing" for i in items) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": _common([i["annotations"] for i in items]),
        "externalURL": external_url,
        "alerts": items,
    }


def _common(dicts: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not dicts:
        return {}
    first = dict(dicts[0])
    return {k: v for k, v in first.items() if all(d.get(k) == v for d in dicts[1:])}


class WebhookNotifier:
    """Posts Alertmanager-shaped JSON to a URL from a background task: a bounded queue (the oldest payload is
    dropped when it is full), a timeout per post, and bounded retries with exponential backoff on connection
    errors, timeouts, 429 and 5xx. `notify` never blocks."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        queue_size: int = 1000,
        receiver: str = "treasure_engine",
        external_url: Callable[[], str] | str = "",
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.receiver = receiver
        self._external_url = external_url
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=queue_size)
        self._wakeup: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.retries = 0

    def _external(self) -> str:
        return self._external_url() if callable(self._external_url) else self._external_url

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="treasure-engine-webhook")

    def notify(self, alerts: Sequence[Alert]) -> None:
        """Queues one post for `alerts` (one group); returns at once."""
        if not alerts:
            return
        payload = alertmanager_payload(alerts, receiver=self.receiver, external_url=self._external())
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            log.warning("alert webhook queue full: the oldest notification is dropped", extra={"url": self.url})
        self._queue.append(payload)
        if self._wakeup is not None:
            self._wakeup.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            payload = self._queue[0]
            await self._post(payload)
            if self._queue and self._queue[0] is payload:
                self._queue.popleft()
            if not self._queue and self._drained is not None:
                self._drained.set()

    async def _post(self, payload: dict[str, Any]) -> None:
        body = msgspec.json.encode(payload)
        for attempt in range(1, self.max_attempts + 1):
            retry = True
            try:
                async with self._session.post(
                    self.url, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    if 200 <= response.status < 300:
                        self.sent += 1
                        return
                    retry = response.status == 429 or response.status >= 500
                    problem = f"HTTP {response.status}"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection refused, reset, timeout: all worth a retry
                problem = f"{type(e).__name__}: {e}"
            if not retry or attempt == self.max_attempts:
                self.failed += 1
                log.error(
                    "alert webhook %s: gave up after %d attempt(s): %s",
                    self.url,
                    attempt,
                    problem,
                    extra={"url": self.url, "status": payload.get("status")},
                )
                return
            self.retries += 1
            delay = min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))

    async def stop(self, drain_s: float = 2.0) -> None:
        """Gives the queued posts up to `drain_s` to go out, then stops."""
        task = self._task
        if task is not None:
            if self._queue and not task.done():
                self._drained = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), drain_s)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
