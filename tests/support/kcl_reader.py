"""A reader that applies the Java KCL's rule for de-aggregated records, independent of the engine.

The KCL (``AggregatorUtil.deaggregate``) checks every user record of a KPL aggregate against the hash key range
of the shard it was read from (the user record's hash is its explicit hash key, or MD5(partition key) as a
big-endian 128-bit integer) and drops the *whole* aggregate when any of them falls outside. A producer that
aggregated for a parent shard and had the aggregate land in a child after a split loses those events for
every KCL consumer, although the reference reader (``kinesis_reader.read_all``) sees them all.

``read_kcl(endpoint_url, stream)`` reads every shard with boto3 from TRIM_HORIZON to its end, parents before
children (by lineage: ParentShardId and AdjacentParentShardId), de-aggregates with Amazon's aws_kinesis_agg
(through ``kinesis_reader.deaggregate``), and returns a ``KclRead``: the user records kept, in that order,
and counts of what was skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .emulators import kinesis_client, list_shards
from .kinesis_reader import deaggregate, iter_shard_records


def user_record_hash(partition_key: str, explicit_hash_key: str | None) -> int:
    """The hash key Kinesis (and the KCL) give a user record."""
    if explicit_hash_key is not None:
        return int(explicit_hash_key)
    return int.from_bytes(hashlib.md5(partition_key.encode("utf-8")).digest(), "big")


def lineage_order(shards: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``shards`` ordered so that every shard comes after its parent and adjacent parent (when they are listed);
    otherwise in shard-id order."""
    by_id = {s["ShardId"]: s for s in shards}
    out: list[dict[str, Any]] = []
    done: set[str] = set()

    def visit(shard_id: str, path: frozenset[str]) -> None:
        if shard_id in done:
            return
        if shard_id in path:
            raise AssertionError(f"shard lineage has a cycle through {shard_id}")
        shard = by_id[shard_id]
        for parent in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")):
            if parent is not None and parent in by_id:
                visit(parent, path | {shard_id})
        done.add(shard_id)
        out.append(shard)

    for shard_id in sorted(by_id):
        visit(shard_id, frozenset())
    return out


@dataclass
class KclRead:
    """What a KCL consumer would get from the stream."""

    kept: list[dict[str, Any]] = field(default_factory=list)
    """User records kept, as ``kinesis_reader`` returns them: shards in lineage order, stream order within."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """User records in skipped aggregates, in the same order."""
    shard_order: list[str] = field(default_factory=list)
    kinesis_records: int = 0
    """Kinesis records read (an aggregate counts once)."""
    aggregates: int = 0
    skipped_aggregates: int = 0
    skipped_records: int = 0
    """User records in skipped aggregates (in range or not)."""
    out_of_range_records: int = 0
    """User records whose hash is outside the hash key range of the shard they were read from."""
    skipped_by_shard: dict[str, int] = field(default_factory=dict)
    """User records skipped, per shard read from."""

    def __str__(self) -> str:
        return (
            f"shards={self.shard_order} kinesis_records={self.kinesis_records} aggregates={self.aggregates} "
            f"kept={len(self.kept)} skipped_aggregates={self.skipped_aggregates} "
            f"skipped_records={self.skipped_records} out_of_range_records={self.out_of_range_records} "
            f"skipped_by_shard={self.skipped_by_shard}"
        )


def read_kcl(endpoint_url: str, stream: str, *, limit: int = 10000, empty_polls: int = 2) -> KclRead:
    """Reads ``stream`` as a KCL consumer would (see the module doc)."""
    client = kinesis_client(endpoint_url, timeout=60)
    result = KclRead()
    for shard in lineage_order(list_shards(endpoint_url, stream)):
        sid = shard["ShardId"]
        result.shard_order.append(sid)
        lo, hi = int(shard["HashKeyRange"]["StartingHashKey"]), int(shard["HashKeyRange"]["EndingHashKey"])
        for rec in iter_shard_records(client, stream, sid, limit=limit, empty_polls=empty_polls):
            result.kinesis_records += 1
            users = deaggregate(rec, sid)
            if not any(u["aggregated"] for u in users):
                # A plain record: Kinesis routed it by its own hash, so the KCL takes it as it is.
                result.kept.extend(users)
                continue
            result.aggregates += 1
            outside = sum(
                1 for u in users if not lo <= user_record_hash(u["partition_key"], u["explicit_hash_key"]) <= hi
            )
            if outside:
                result.out_of_range_records += outside
                result.skipped_aggregates += 1
                result.skipped_records += len(users)
                result.skipped.extend(users)
                result.skipped_by_shard[sid] = result.skipped_by_shard.get(sid, 0) + len(users)
            else:
                result.kept.extend(users)
    return result
