"""Shard leases in DynamoDB, as the Kinesis Client Library keeps them.

One item per shard says which worker reads it (`owner`), how far it got (`checkpoint`, `sub_sequence`) and which
shards came before it (`parents`). Every write is conditional: two workers never both take a lease, and a worker
that lost one learns it at its next renewal or checkpoint and cannot move the checkpoint. `LeaseTable` is the storage;
`LeaseCoordinator` decides which leases this worker holds. The protocol is described in docs/leases.md.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import enum
import logging
import math
import random
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Self, TypeVar

import aiohttp
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from treasure_engine._dynamodb import DynamoDBClient
from treasure_engine.errors import AuthError, ConfigError, EndpointError, LeaseTableNotFound
from treasure_engine.kinesis import resolve_region

__all__ = [
    "AT_TIMESTAMP",
    "LATEST",
    "SHARD_END",
    "TRIM_HORIZON",
    "Lease",
    "LeaseCoordinator",
    "LeaseTable",
    "LeaseTableState",
]

log = logging.getLogger("treasure_engine.leases")

SHARD_END = "SHARD_END"
"""Checkpoint of a shard read to its end: its children may start."""
TRIM_HORIZON = "TRIM_HORIZON"
LATEST = "LATEST"
AT_TIMESTAMP = "AT_TIMESTAMP"
SENTINELS = frozenset({SHARD_END, TRIM_HORIZON, LATEST, AT_TIMESTAMP})

# Kinesis sequence numbers: decimal, no leading zero, at most 129 digits (56 in practice). Kept as strings.
_SEQUENCE = re.compile(r"0|[1-9][0-9]{0,128}")

# Item attributes. Every expression goes through #placeholders: `owner` and `counter` are DynamoDB reserved words.
_KEY = "shard_id"
_NAMES = {
    "#k": _KEY,
    "#o": "owner",
    "#c": "counter",
    "#cp": "checkpoint",
    "#ss": "sub_sequence",
    "#sw": "owner_switches",
    "#p": "parents",
    "#lu": "last_update",
}

_THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "LimitExceededException",
        "TransactionConflictException",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
_AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "AccessDeniedException",
        "AccessDenied",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "NotAuthorized",
    }
)
_CONDITION_FAILED = "ConditionalCheckFailedException"
_NETWORK_ERRORS = (HTTPClientError, ConnectionError, aiohttp.ClientError, TimeoutError, OSError)
_CONCURRENCY = 16
"""Writes one call (sync_shards, renew_all, rebalance, release_all) keeps in flight at once."""

_T = TypeVar("_T")


@dataclass(slots=True)
class Lease:
    """One shard's lease as last read or written by this worker; a snapshot, never updated in place."""

    shard_id: str
    owner: str | None
    """Worker id of the holder; None when free."""
    counter: int
    """Bumped by every take, renew and release (KCL `leaseCounter`): observers see a live holder by its changes."""
    checkpoint: str
    """A sequence number (decimal string), or one of TRIM_HORIZON, LATEST, AT_TIMESTAMP, SHARD_END."""
    sub_sequence: int = 0
    """Sub-sequence number of the last handled KPL user record of the checkpointed Kinesis record; 0 for a plain
    record; -1 when none of it was handled yet (the consumer checkpoints "everything before this record" so)."""
    parents: tuple[str, ...] = ()
    """Parent shard ids: this shard starts only after each of them reached SHARD_END."""
    owner_switches: int = 0
    """Owner changes since the last checkpoint (KCL `ownerSwitchesSinceCheckpoint`): a shard that keeps moving
    without progress points at a worker that dies on its records."""
    last_update: float = 0.0
    """Unix time of the last write, from the writer's wall clock: for people, never for expiry."""

    @property
    def ended(self) -> bool:
        """The shard was read to its end and checkpointed so."""
        return self.checkpoint == SHARD_END


class LeaseTableState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class _Write(NamedTuple):
    """Outcome of a conditional write: the item after it, or the item that failed the condition."""

    new: dict[str, Any] | None
    old: dict[str, Any] | None
    retried: bool
    """More than one attempt was sent: an earlier one may have been applied, with its answer lost."""


class LeaseTable:
    """One application's lease table (`table_name`), one worker's view of it.

    Every write is conditional. A failed condition is an ordinary answer (None or False): another worker got
    there first. Throttling, 5xx answers and network errors are retried with jittered exponential backoff for at
    most `retry_budget_s` per call, then raised as `EndpointError`; rejected credentials raise `AuthError`.
    `open()` (or `async with`) creates the client; call `ensure_table()` once before the rest.
    """

    def __init__(
        self,
        table_name: str,
        *,
        worker_id: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        create: bool = True,
        request_timeout_s: float = 2.0,
        retry_budget_s: float = 3.0,
        table_active_timeout_s: float = 120.0,
    ) -> None:
        if not table_name or not isinstance(table_name, str):
            raise ConfigError(f"table_name: must be a non-empty string, got {table_name!r}")
        if not worker_id or not isinstance(worker_id, str):
            raise ConfigError(f"worker_id: must be a non-empty string, got {worker_id!r}")
        for name, value in (
            ("request_timeout_s", request_timeout_s),
            ("retry_budget_s", retry_budget_s),
            ("table_active_timeout_s", table_active_timeout_s),
        ):
            if not value > 0:
                raise ConfigError(f"{name}: must be > 0, got {value!r}")
        self.table_name = table_name
        self.worker_id = worker_id
        self.region = resolve_region(region)
        self.endpoint_url = endpoint_url
        self.create = create
        self.request_timeout_s = request_timeout_s
        self.retry_budget_s = retry_budget_s
        self.table_active_timeout_s = table_active_timeout_s
        self._state = LeaseTableState.NEW
        self._client: DynamoDBClient | None = None

    @property
    def state(self) -> LeaseTableState:
        return self._state

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Creates the DynamoDB client (no request is sent). A closed table cannot be reopened."""
        if self._state is LeaseTableState.OPEN:
            return
        if self._state is LeaseTableState.CLOSED:
            raise RuntimeError(f"LeaseTable {self.table_name!r} is closed; make a new one")
        client = DynamoDBClient(
            region=self.region,
            endpoint_url=self.endpoint_url,
            timeout_s=self.request_timeout_s,
            max_connections=_CONCURRENCY * 2,
        )
        self._client = await client.__aenter__()
        self._state = LeaseTableState.OPEN

    async def close(self) -> None:
        """Closes the client; idempotent."""
        client, self._client = self._client, None
        self._state = LeaseTableState.CLOSED
        if client is not None:
            await client.__aexit__(None, None, None)

    def __del__(self) -> None:
        if getattr(self, "_client", None) is not None:
            warnings.warn(
                f"LeaseTable {self.table_name!r} was never closed (call `await table.close()`)",
                ResourceWarning,
                stacklevel=1,
            )

    # --- table ------------------------------------------------------------------------------------------------

    async def ensure_table(self) -> None:
        """Creates the table if it is missing (when `create`), and waits until it is usable.

        Another worker creating it at the same moment is fine. With `create=False` a missing table raises
        `LeaseTableNotFound` (an `EndpointError`) naming it.
        """
        status = await self._table_status()
        if status is None:
            if not self.create:
                raise LeaseTableNotFound(
                    f"lease table {self.table_name!r} does not exist in {self.region} "
                    "(create=False: create it, or let the worker create it)"
                )
            try:
                await self._call(
                    "create_table",
                    TableName=self.table_name,
                    AttributeDefinitions=[{"AttributeName": _KEY, "AttributeType": "S"}],
                    KeySchema=[{"AttributeName": _KEY, "KeyType": "HASH"}],
                    BillingMode="PAY_PER_REQUEST",
                )
                log.info("lease table created", extra={"table": self.table_name, "region": self.region})
            except ClientError as e:
                if _code(e) != "ResourceInUseException":
                    raise self._error("CreateTable", e) from None
                # Another worker created it first.
        await self._wait_active()

    async def _table_status(self) -> str | None:
        try:
            desc = await self._call("describe_table", TableName=self.table_name)
        except ClientError as e:
            if _code(e) == "ResourceNotFoundException":
                return None
            raise self._error("DescribeTable", e) from None
        return str(desc["Table"]["TableStatus"])

    async def _wait_active(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.table_active_timeout_s
        delay = 0.05
        while True:
            status = await self._table_status()
            if status in ("ACTIVE", "UPDATING"):
                return
            if status in (None, "DELETING", "ARCHIVING", "ARCHIVED", "INACCESSIBLE_ENCRYPTION_CREDENTIALS"):
                raise EndpointError(f"lease table {self.table_name!r} is {status or 'gone'}")
            if loop.time() + delay > deadline:
                raise EndpointError(
                    f"lease table {self.table_name!r} still {status} after {self.table_active_timeout_s}s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # --- items ------------------------------------------------------------------------------------------------

    async def sync_shards(self, shards: Iterable[tuple[str, Sequence[str]]], initial_checkpoint: str) -> int:
        """Adds a lease for each (shard_id, parent ids) not yet in the table; returns how many this call created.

        A shard whose parent has a lease (already, or from this call) starts at TRIM_HORIZON whatever
        `initial_checkpoint` says: everything written to it after the reshard must be read, and it is read only
        after the parent ends. `initial_checkpoint` applies to shards without a known parent. Creation is
        conditional on the item not existing, so workers syncing at once create each lease once.
        """
        _check_checkpoint(initial_checkpoint, "initial_checkpoint")
        wanted = [(sid, tuple(parents)) for sid, parents in shards]
        existing = {lease.shard_id for lease in await self.list()}
        known = existing | {sid for sid, _ in wanted}
        new: dict[str, tuple[str, ...]] = {}
        for sid, parents in wanted:
            if sid not in existing:
                new.setdefault(sid, parents)
        now = time.time()

        async def put(sid: str, parents: tuple[str, ...]) -> bool:
            start = TRIM_HORIZON if any(p in known for p in parents) else initial_checkpoint
            item: dict[str, Any] = {
                _KEY: {"S": sid},
                "counter": {"N": "0"},
                "checkpoint": {"S": start},
                "sub_sequence": {"N": "0"},
                "owner_switches": {"N": "0"},
                "parents": {"L": [{"S": p} for p in parents]},
                "last_update": {"N": _num(now)},
            }
            try:
                await self._call(
                    "put_item",
                    TableName=self.table_name,
                    Item=item,
                    ConditionExpression="attribute_not_exists(#k)",
                    ExpressionAttributeNames={"#k": _KEY},
                )
            except ClientError as e:
                if _code(e) == _CONDITION_FAILED:
                    return False  # another worker created it first
                raise self._error("PutItem", e) from None
            return True

        created = await _gather_bounded([put(sid, parents) for sid, parents in new.items()])
        count = sum(created)
        if count:
            log.info("leases created", extra={"table": self.table_name, "leases_created": count})
        return count

    async def list(self) -> builtins.list[Lease]:
        """Every lease, by a strongly consistent scan (all pages), in shard-id order."""
        leases: builtins.list[Lease] = []
        args: dict[str, Any] = {"TableName": self.table_name, "ConsistentRead": True}
        while True:
            try:
                page = await self._call("scan", **args)
            except ClientError as e:
                raise self._error("Scan", e) from None
            leases.extend(_lease_of(item) for item in page.get("Items", ()))
            start = page.get("LastEvaluatedKey")
            if not start:
                break
            args["ExclusiveStartKey"] = start
        leases.sort(key=lambda lease: lease.shard_id)
        return leases

    async def get(self, shard_id: str) -> Lease | None:
        """One lease by a consistent read; None if there is none."""
        try:
            resp = await self._call(
                "get_item", TableName=self.table_name, Key={_KEY: {"S": shard_id}}, ConsistentRead=True
            )
        except ClientError as e:
            raise self._error("GetItem", e) from None
        item = resp.get("Item")
        return _lease_of(item) if item else None

    async def take(self, lease: Lease) -> Lease | None:
        """Makes this worker the owner, if the lease is still as `lease` shows it (same owner, same counter).

        None when the condition failed: someone renewed, took or released it since `lease` was read.
        """
        switched = lease.owner != self.worker_id
        values: dict[str, Any] = {
            ":me": {"S": self.worker_id},
            ":c": {"N": str(lease.counter)},
            ":one": {"N": "1"},
            ":sw": {"N": "1" if switched else "0"},
            ":zero": {"N": "0"},
            ":now": {"N": _num(time.time())},
        }
        if lease.owner is None:
            condition = "#c = :c AND attribute_not_exists(#o)"
        else:
            condition = "#c = :c AND #o = :prev"
            values[":prev"] = {"S": lease.owner}
        w = await self._update(
            "take",
            lease.shard_id,
            update="SET #o = :me, #c = #c + :one, #sw = if_not_exists(#sw, :zero) + :sw, #lu = :now",
            condition=condition,
            values=values,
        )
        if w.new is not None:
            return _lease_of(w.new)
        if w.retried and w.old is not None and self._is_after_our_bump(w.old, lease.counter):
            return _lease_of(w.old)  # an earlier attempt was applied, its answer lost
        return None

    async def renew(self, lease: Lease) -> Lease | None:
        """Bumps the counter of a lease this worker holds. None when it was taken (or released) meanwhile."""
        w = await self._update(
            "renew",
            lease.shard_id,
            update="SET #c = #c + :one, #lu = :now",
            condition="#o = :me AND #c = :c",
            values={
                ":me": {"S": self.worker_id},
                ":c": {"N": str(lease.counter)},
                ":one": {"N": "1"},
                ":now": {"N": _num(time.time())},
            },
        )
        if w.new is not None:
            return _lease_of(w.new)
        if w.retried and w.old is not None and self._is_after_our_bump(w.old, lease.counter):
            return _lease_of(w.old)
        return None

    async def checkpoint(self, lease: Lease, sequence: str, sub_sequence: int) -> Lease | None:
        """Records how far this worker got; None when it no longer owns the lease.

        Conditional on the owner only, not on the counter as the KCL does: our own renewals bump the counter
        concurrently, and a counter condition would fail them against each other. It is still safe: any other
        worker that took the lease is its owner now, so a worker that lost the lease cannot move its checkpoint.
        The counter is left alone (a checkpoint is no sign of life to the others); the owner-switch count is reset.
        """
        _check_checkpoint(sequence, "sequence")
        if isinstance(sub_sequence, bool) or not isinstance(sub_sequence, int) or sub_sequence < -1:
            raise ConfigError(f"sub_sequence: must be an int >= -1, got {sub_sequence!r}")
        w = await self._update(
            "checkpoint",
            lease.shard_id,
            update="SET #cp = :cp, #ss = :ss, #sw = :zero, #lu = :now",
            condition="#o = :me",
            values={
                ":me": {"S": self.worker_id},
                ":cp": {"S": sequence},
                ":ss": {"N": str(sub_sequence)},
                ":zero": {"N": "0"},
                ":now": {"N": _num(time.time())},
            },
        )
        return _lease_of(w.new) if w.new is not None else None

    async def release(self, lease: Lease) -> bool:
        """Gives the lease up (owner removed, counter bumped) so another worker can take it at once.

        False when this worker did not own it any more.
        """
        w = await self._update(
            "release",
            lease.shard_id,
            update="REMOVE #o SET #c = #c + :one, #lu = :now",
            condition="#o = :me",
            values={":me": {"S": self.worker_id}, ":one": {"N": "1"}, ":now": {"N": _num(time.time())}},
        )
        if w.new is not None:
            return True
        # A retried release whose first attempt was applied finds the lease free: that was us.
        return bool(w.retried and w.old is not None and "owner" not in w.old)

    async def delete(self, shard_id: str) -> None:
        """Removes a lease whatever its state (housekeeping, e.g. for a shard trimmed away); idempotent.

        A worker still holding it loses it at its next renew or checkpoint.
        """
        try:
            await self._call("delete_item", TableName=self.table_name, Key={_KEY: {"S": shard_id}})
        except ClientError as e:
            raise self._error("DeleteItem", e) from None

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _is_after_our_bump(self, old: dict[str, Any], counter: int) -> bool:
        """The item is exactly what our bump of `counter` produced (owner us, counter + 1)."""
        lease = _lease_of(old)
        return lease.owner == self.worker_id and lease.counter == counter + 1

    async def _update(self, what: str, shard_id: str, *, update: str, condition: str, values: dict[str, Any]) -> _Write:
        used = set(re.findall(r"#\w+", update + " " + condition))
        names = {k: v for k, v in _NAMES.items() if k in used}
        attempts: builtins.list[int] = []
        try:
            resp = await self._call(
                "update_item",
                _attempts=attempts,
                TableName=self.table_name,
                Key={_KEY: {"S": shard_id}},
                UpdateExpression=update,
                ConditionExpression=f"attribute_exists(#k) AND {condition}",
                ExpressionAttributeNames={**names, "#k": _KEY},
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as e:
            if _code(e) != _CONDITION_FAILED:
                raise self._error("UpdateItem", e) from None
            old = e.response.get("Item")
            log.debug(
                "lease write refused",
                extra={"op": what, "shard_id": shard_id, "worker": self.worker_id, "owner": _owner_of(old)},
            )
            return _Write(None, old or None, len(attempts) > 1)
        return _Write(resp.get("Attributes"), None, len(attempts) > 1)

    async def _call(self, op: str, *, _attempts: builtins.list[int] | None = None, **kwargs: Any) -> Any:
        """One DynamoDB call, retried on throttling, 5xx and network errors within `retry_budget_s`.

        Other `ClientError`s (a failed condition among them) are raised as they are, for the caller to judge.
        """
        if self._client is None:
            raise RuntimeError(f"LeaseTable {self.table_name!r} is {self._state.value}: call open() first")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_budget_s
        ceiling = 0.05
        attempt = 0
        while True:
            attempt += 1
            if _attempts is not None:
                _attempts.append(attempt)
            try:
                return await self._client.call(op, **kwargs)
            except ClientError as e:
                code = _code(e)
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if code in _AUTH_CODES or status in (401, 403):
                    raise AuthError(f"DynamoDB {op} on {self.table_name!r}: {code or status}: {_message(e)}") from None
                if code not in _THROTTLE_CODES and status < 500:
                    raise
                last = f"{code or status}: {_message(e)}"
            except (NoCredentialsError, PartialCredentialsError) as e:
                raise AuthError(f"DynamoDB {op} on {self.table_name!r}: {e}") from None
            except _NETWORK_ERRORS as e:
                last = f"{type(e).__name__}: {e}"
            # Full jitter: workers throttled together do not retry together.
            pause = random.uniform(0, ceiling)
            if loop.time() + pause > deadline:
                raise EndpointError(
                    f"DynamoDB {op} on {self.table_name!r} failed {attempt} times in {self.retry_budget_s}s: {last}"
                )
            log.debug("dynamodb retry", extra={"op": op, "table": self.table_name, "attempt": attempt, "error": last})
            await asyncio.sleep(pause)
            ceiling = min(ceiling * 2, 1.0)

    def _error(self, op: str, e: ClientError) -> EndpointError:
        code = _code(e)
        if code == "ResourceNotFoundException":
            return LeaseTableNotFound(
                f"lease table {self.table_name!r} not found in {self.region} ({op}): {_message(e)}"
            )
        return EndpointError(f"DynamoDB {op} on {self.table_name!r}: {code}: {_message(e)}")


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
            results = await _gather_bounded([self._renew_one(lease) for lease in leases])
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

        await _gather_bounded([release(lease) for lease in leases])
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
        results = await _gather_bounded([self.table.take(lease) for lease in leases])
        if self._released:  # release_all() ran meanwhile
            await _gather_bounded([self.table.release(t) for t in results if t is not None])
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


# --- helpers --------------------------------------------------------------------------------------------------


async def _gather_bounded(aws: Sequence[Awaitable[_T]], limit: int = _CONCURRENCY) -> builtins.list[_T]:
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[_T]) -> _T:
        async with sem:
            return await aw

    return list(await asyncio.gather(*(one(aw) for aw in aws)))


def _check_checkpoint(value: str, field: str) -> None:
    if not isinstance(value, str) or (value not in SENTINELS and not _SEQUENCE.fullmatch(value)):
        raise ConfigError(f"{field}: not a sequence number nor one of {sorted(SENTINELS)}: {value!r}")


def _lease_of(item: dict[str, Any]) -> Lease:
    def num(name: str, default: str = "0") -> str:
        return str(item.get(name, {}).get("N", default))

    owner = item.get("owner", {}).get("S")
    parents = item.get("parents", {})
    return Lease(
        shard_id=str(item[_KEY]["S"]),
        owner=str(owner) if owner is not None else None,
        counter=int(num("counter")),
        checkpoint=str(item.get("checkpoint", {}).get("S", TRIM_HORIZON)),
        sub_sequence=int(num("sub_sequence")),
        parents=tuple(str(p["S"]) for p in parents.get("L", ())) or tuple(parents.get("SS", ())),
        owner_switches=int(num("owner_switches")),
        last_update=float(num("last_update")),
    )


def _owner_of(item: dict[str, Any] | None) -> str | None:
    if not item:
        return None
    owner = item.get("owner", {}).get("S")
    return str(owner) if owner is not None else None


def _num(value: float) -> str:
    return f"{value:.6f}"


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _message(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Message", "")) or str(e)
