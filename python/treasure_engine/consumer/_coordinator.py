"""The lease coordinator: renews the worker's leases, takes expired ones and balances shards across
workers, children only after their parents reached SHARD_END."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence

from treasure_engine.consumer._dynamodb import gather_bounded
from treasure_engine.consumer._leases import Lease, LeaseTable
from treasure_engine.errors import ConfigError, EndpointError

log = logging.getLogger("treasure_engine.leases")


class LeaseCoordinator:
    """Decides which leases this worker holds: renews them, takes expired ones, balances to
    ceil(leases / live workers) by taking from the most loaded worker, and never takes a child shard before all
    its parents are checkpointed at SHARD_END.

    It has no task of its own. Call `renew_all()` every `lease_duration_s / 3` and `rebalance()` every
    `lease_duration_s / 2` or so (from separate tasks: they may overlap), and stop reading a shard as soon as either
    reports it lost or `checkpoint()` returns False. Expiry is judged on this worker's `clock` only: a lease is
    expired when its counter has not changed for `lease_duration_s` since this worker last saw it change, so
    clocks of different hosts are never compared.
    """

    def __init__(
        self,
        table: LeaseTable,
        *,
        lease_duration_s: float = 10.0,
        max_leases: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not lease_duration_s > 0:
            raise ConfigError(f"lease_duration_s: must be > 0, got {lease_duration_s!r}")
        if max_leases is not None and (isinstance(max_leases, bool) or max_leases < 1):
            raise ConfigError(f"max_leases: must be None or >= 1, got {max_leases!r}")
        self.table = table
        self.lease_duration_s = lease_duration_s
        self.max_leases = max_leases
        self._clock = clock
        self._rng = rng or random.Random()
        self._held: dict[str, Lease] = {}
        self._renewed_at: dict[str, float] = {}
        """Our clock when each held lease was last taken or renewed."""
        self._renewing = asyncio.Lock()
        """Overlapping renew_all calls would fail each other's conditions: they take turns."""
        self._seen: dict[str, tuple[str | None, int, float]] = {}
        """Per lease: (owner, counter) as last read, and our clock when that pair last changed."""
        self._released = False
        """release_all() ran: nothing is taken any more."""

    @property
    def worker_id(self) -> str:
        return self.table.worker_id

    def held(self) -> dict[str, Lease]:
        """The leases this worker holds now (latest copies after take, renew and checkpoint)."""
        return dict(self._held)

    def note_lost(self, shard_id: str) -> None:
        """Forgets a held lease without writing to the table (it will expire for the others)."""
        self._drop(shard_id)

    async def renew_all(self) -> set[str]:
        """Renews every held lease; returns the shard ids lost.

        A lease is lost when the renewal's condition failed (someone took it), or when DynamoDB could not be
        reached for a whole `lease_duration_s` since its last renewal: by then the others may take it.
        """
        async with self._renewing:
            leases = list(self._held.values())
            results = await gather_bounded([self._renew_one(lease) for lease in leases])
        return {lease.shard_id for lease, kept in zip(leases, results, strict=True) if not kept}

    async def _renew_one(self, lease: Lease) -> bool:
        """Renews one lease; False when it was held and is lost now."""
        sid = lease.shard_id
        try:
            renewed = await self.table.renew(lease)
        except EndpointError as e:
            age = self._clock() - self._renewed_at.get(sid, -math.inf)
            if age < self.lease_duration_s:
                log.warning("lease renewal failed; kept for now", extra={"shard_id": sid, "error": str(e)})
                return True
            if self._drop(sid, lease.counter):
                log.warning("lease lost: not renewed in time", extra={"shard_id": sid, "error": str(e)})
                return False
            return True
        if renewed is None:
            if self._drop(sid, lease.counter):
                log.info("lease lost", extra={"shard_id": sid, "worker": self.worker_id})
                return False
            return True  # dropped meanwhile (a rebalance saw it go), or taken anew since this renewal began
        self._renewed_at[sid] = self._clock()
        self._merge(renewed, counter_only=True)
        return True

    async def checkpoint(self, shard_id: str, sequence: str, sub_sequence: int = 0) -> bool:
        """Checkpoints a held lease; False (and the lease dropped from `held()`) when this worker lost it.

        Checkpointing SHARD_END finishes the shard: the lease is released at once (no owner, never taken again)
        and leaves `held()`, and its children become eligible.
        """
        lease = self._held.get(shard_id)
        if lease is None:
            return False
        updated = await self.table.checkpoint(lease, sequence, sub_sequence)
        if updated is None:
            log.info("lease lost at checkpoint", extra={"shard_id": shard_id, "worker": self.worker_id})
            self._drop(shard_id, lease.counter)
            return False
        self._merge(updated, counter_only=False)
        if updated.ended:
            current = self._held.get(shard_id, updated)
            self._drop(shard_id)
            try:
                await self.table.release(current)
            except EndpointError as e:
                # Harmless: nobody takes an ended lease, and its owner expires for the others.
                log.warning("could not release an ended lease", extra={"shard_id": shard_id, "error": str(e)})
        return True

    async def release(self, shard_id: str) -> bool:
        """Gives one held lease back (e.g. after its reader failed) and drops it from `held()`.

        True when it was released; False when it was not held or already taken. This worker may take it again
        at a later rebalance, like any other free lease.
        """
        lease = self._held.get(shard_id)
        if lease is None:
            return False
        self._drop(shard_id)
        return await self.table.release(lease)

    async def release_all(self) -> None:
        """Graceful shutdown: gives every held lease back so other workers take them at their next rebalance.

        Final: afterwards `rebalance()` takes nothing, and a take still in flight is given back as it lands.
        """
        self._released = True
        leases = list(self._held.values())
        self._held.clear()
        self._renewed_at.clear()

        async def release(lease: Lease) -> None:
            try:
                await self.table.release(lease)
            except EndpointError as e:
                log.warning("could not release lease", extra={"shard_id": lease.shard_id, "error": str(e)})

        await gather_bounded([release(lease) for lease in leases])
        if leases:
            log.info("leases released", extra={"worker": self.worker_id, "count": len(leases)})

    async def rebalance(self) -> tuple[set[str], set[str]]:
        """One cycle: read the table, take expired leases, steal toward balance. Returns (gained, lost) shard ids."""
        leases = await self.table.list()
        now = self._clock()
        by_id = {lease.shard_id: lease for lease in leases}
        lost = self._observe(leases, now)

        def expired(lease: Lease) -> bool:
            return lease.owner is None or now - self._seen[lease.shard_id][2] >= self.lease_duration_s

        def eligible(lease: Lease) -> bool:
            # A parent without a lease (trimmed away, never recorded) counts as ended.
            return not lease.ended and all(p not in by_id or by_id[p].ended for p in lease.parents)

        candidates = [lease for lease in leases if eligible(lease)]
        live = {lease.owner for lease in leases if lease.owner is not None and not expired(lease)}
        live.add(self.worker_id)
        target = math.ceil(len(candidates) / len(live))
        if self.max_leases is not None:
            target = min(target, self.max_leases)

        gained: set[str] = set()
        need = 0 if self._released else target - len(self._held)
        if need > 0:
            free = [lease for lease in candidates if lease.shard_id not in self._held and expired(lease)]
            self._rng.shuffle(free)
            gained |= await self._take_all(free[:need], now)
            need = 0 if self._released else target - len(self._held)
        if need > 0:
            gained |= await self._steal(candidates, expired, target, need, now)
        if gained:
            log.info(
                "leases taken",
                extra={"worker": self.worker_id, "shards": sorted(gained), "held": len(self._held), "target": target},
            )
        return gained, lost

    async def _steal(
        self, candidates: Sequence[Lease], expired: Callable[[Lease], bool], target: int, need: int, now: float
    ) -> set[str]:
        loads: dict[str, builtins.list[Lease]] = {}
        for lease in candidates:
            if lease.owner is not None and lease.owner != self.worker_id and not expired(lease):
                loads.setdefault(lease.owner, []).append(lease)
        if not loads:
            return set()
        # The most loaded worker; ties broken at random so that thieves spread over equal victims.
        top = max(len(v) for v in loads.values())
        victim = self._rng.choice(sorted(w for w, v in loads.items() if len(v) == top))
        surplus = top - target
        if surplus <= 0:
            return set()
        victims = list(loads[victim])
        self._rng.shuffle(victims)
        return await self._take_all(victims[: min(need, surplus)], now)

    async def _take_all(self, leases: Sequence[Lease], now: float) -> set[str]:
        results = await gather_bounded([self.table.take(lease) for lease in leases])
        if self._released:  # release_all() ran meanwhile
            await gather_bounded([self.table.release(t) for t in results if t is not None])
            return set()
        gained: set[str] = set()
        for taken in results:
            if taken is None:
                continue  # another worker won it
            self._held[taken.shard_id] = taken
            self._renewed_at[taken.shard_id] = now
            self._seen[taken.shard_id] = (taken.owner, taken.counter, now)
            gained.add(taken.shard_id)
        return gained

    def _observe(self, leases: Sequence[Lease], now: float) -> set[str]:
        """Records which (owner, counter) pairs changed since the last scan, and drops held leases the table
        shows in other hands; returns those lost."""
        present = set()
        for lease in leases:
            present.add(lease.shard_id)
            seen = self._seen.get(lease.shard_id)
            if seen is None or (seen[0], seen[1]) != (lease.owner, lease.counter):
                self._seen[lease.shard_id] = (lease.owner, lease.counter, now)
        for sid in set(self._seen) - present:
            del self._seen[sid]
        lost: set[str] = set()
        by_id = {lease.shard_id: lease for lease in leases}
        for sid, mine in list(self._held.items()):
            current = by_id.get(sid)
            if current is None or current.owner != self.worker_id:
                # The scan may predate our own take of it; a lease only leaves our hands through a higher counter.
                if current is not None and current.counter <= mine.counter:
                    continue
                log.info("lease lost", extra={"shard_id": sid, "worker": self.worker_id})
                self._drop(sid)
                lost.add(sid)
        return lost

    def _merge(self, update: Lease, *, counter_only: bool) -> None:
        """Folds a write's result into the held copy, each write only for the fields it sets: renewals and
        checkpoints may run concurrently, and their answers may arrive in either order."""
        held = self._held.get(update.shard_id)
        if held is None:
            return
        counter = max(held.counter, update.counter)
        if counter_only:
            self._held[update.shard_id] = dataclasses.replace(held, counter=counter, last_update=update.last_update)
        else:
            self._held[update.shard_id] = dataclasses.replace(update, counter=counter)

    def _drop(self, shard_id: str, counter: int | None = None) -> bool:
        """Forgets a held lease; with `counter`, only the copy a failed write was based on (or an older one), not
        one taken anew meanwhile. True when something was dropped."""
        held = self._held.get(shard_id)
        if held is None or (counter is not None and held.counter > counter):
            return False
        del self._held[shard_id]
        self._renewed_at.pop(shard_id, None)
        return True
