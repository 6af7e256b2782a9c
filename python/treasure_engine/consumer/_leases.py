"""Shard leases in DynamoDB, as the Kinesis Client Library keeps them.

One item per shard says which worker reads it (`owner`), how far it got (`checkpoint`, `sub_sequence`) and which
shards came before it (`parents`). Every write is conditional: two workers never both take a lease, and a worker
that lost one learns it at its next renewal or checkpoint and cannot move the checkpoint. `LeaseTable` is the storage;
`LeaseCoordinator` decides which leases this worker holds. The protocol is described in docs/leases.md.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import logging
import random
import re
import time
import warnings
from collections.abc import Iterable, Sequence
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

from treasure_engine._aws import AUTH_ERRORS, CONDITION_FAILED, THROTTLE_ERRORS, TRANSIENT_ERRORS
from treasure_engine.consumer._dynamodb import CONCURRENCY, DynamoDBClient, gather_bounded
from treasure_engine.errors import AuthError, ConfigError, EndpointError, LeaseTableNotFound
from treasure_engine.kinesis import resolve_region

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


RETRY_ERRORS = THROTTLE_ERRORS | TRANSIENT_ERRORS
"""DynamoDB calls retried within the retry budget (as is any 5xx)."""


_NETWORK_ERRORS = (HTTPClientError, ConnectionError, aiohttp.ClientError, TimeoutError, OSError)


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
            max_connections=CONCURRENCY * 2,
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
                if _code(e) == CONDITION_FAILED:
                    return False  # another worker created it first
                raise self._error("PutItem", e) from None
            return True

        created = await gather_bounded([put(sid, parents) for sid, parents in new.items()])
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
            if _code(e) != CONDITION_FAILED:
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
                if code in AUTH_ERRORS or status in (401, 403):
                    raise AuthError(f"DynamoDB {op} on {self.table_name!r}: {code or status}: {_message(e)}") from None
                if code not in RETRY_ERRORS and status < 500:
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
