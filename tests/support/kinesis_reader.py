"""Reference Kinesis reader for the tests: reads every record of every shard with boto3 and
de-aggregates KPL aggregates with Amazon's ``aws_kinesis_agg`` (an independent decoder, so the
engine's own codec is checked against it).

``read_all(endpoint_url, stream)`` returns one dict per *user* record:

    shard_id, sequence_number, sub_sequence_number (index within its aggregate; 0 for a plain record),
    aggregated (bool), partition_key, explicit_hash_key (str | None), data (bytes),
    approximate_arrival_timestamp

in stream order per shard; shards in ListShards (shard id) order, so parents come before children
after a split or merge.

Limits: kinesalite returns at most 10,000 records per GetRecords and has no 10 MB cap; iterators
expire after 5 minutes (each one here is used at once). Closed shards end with NextShardIterator
None on kinesalite and AWS; moto never ends a closed shard, so an open-or-not shard is also done
after ``empty_polls`` consecutive empty responses.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import aws_kinesis_agg

# deaggregator must come first: it puts its own directory on sys.path (front!), which
# messages_pb2's top-level `import config_pb2` needs.
from aws_kinesis_agg.deaggregator import iter_deaggregate_records  # isort: skip
from aws_kinesis_agg import messages_pb2  # isort: skip

from .emulators import kinesis_client, list_shards

_MAGIC: bytes = aws_kinesis_agg.MAGIC
_DIGEST = aws_kinesis_agg.DIGEST_SIZE


class AggregateError(AssertionError):
    """A record carries the KPL magic but is not a valid aggregate (bad digest or protobuf), or
    aws_kinesis_agg could not expand all of it (it only prints such errors and drops the rest)."""


def _parse_aggregate(data: bytes) -> Any:
    """The AggregatedRecord if ``data`` is a valid KPL aggregate, None if it is a plain record.
    Raises AggregateError when the magic is there but the rest is broken."""
    if len(data) <= len(_MAGIC) + _DIGEST or not data.startswith(_MAGIC):
        return None
    body, digest = data[len(_MAGIC) : -_DIGEST], data[-_DIGEST:]
    if hashlib.md5(body).digest() != digest:
        raise AggregateError("record starts with the KPL magic but its MD5 digest does not match")
    agg = messages_pb2.AggregatedRecord()
    try:
        agg.ParseFromString(body)
    except Exception as e:  # google.protobuf.message.DecodeError
        raise AggregateError(f"record starts with the KPL magic but is not an AggregatedRecord: {e}") from e
    return agg


def deaggregate(record: dict[str, Any], shard_id: str, *, strict: bool = True) -> list[dict[str, Any]]:
    """Expand one boto3 GetRecords record into user records (see module doc for the keys)."""
    data: bytes = record["Data"]
    agg = _parse_aggregate(data) if strict else None
    seq = record["SequenceNumber"]
    ts = record.get("ApproximateArrivalTimestamp")
    if strict and agg is None:
        return [_user(shard_id, seq, 0, False, record["PartitionKey"], record.get("ExplicitHashKey"), data, ts)]
    # aws_kinesis_agg in its Boto3 mode: plain records come back with data as given (bytes),
    # user records from an aggregate with data re-encoded in base64 and 'aggregated': True.
    out: list[dict[str, Any]] = []
    for r in iter_deaggregate_records([record], data_format="Boto3"):
        k = r["kinesis"]
        if k.get("aggregated"):
            out.append(
                _user(shard_id, seq, int(k["subSequenceNumber"]), True, k["partitionKey"],
                      k.get("explicitHashKey"), base64.b64decode(k["data"]), ts)
            )  # fmt: skip
        else:
            out.append(_user(shard_id, seq, 0, False, k["partitionKey"], record.get("ExplicitHashKey"), k["data"], ts))
    if agg is not None:
        if len(out) != len(agg.records):
            raise AggregateError(
                f"aggregate {seq} in {shard_id} holds {len(agg.records)} records but aws_kinesis_agg expanded"
                f" {len(out)} (bad partition/explicit-hash-key index?)"
            )
        # aws_kinesis_agg 1.2.3 bug: a user record without explicit_hash_key_index (proto2 optional,
        # reads as 0) gets explicit_hash_key_table[0] whenever the table is not empty. Use HasField.
        ehks = agg.explicit_hash_key_table
        for user, mr in zip(out, agg.records, strict=True):
            if mr.HasField("explicit_hash_key_index"):
                if mr.explicit_hash_key_index >= len(ehks):
                    raise AggregateError(f"aggregate {seq} in {shard_id}: explicit hash key index out of range")
                user["explicit_hash_key"] = ehks[mr.explicit_hash_key_index]
            else:
                user["explicit_hash_key"] = None
    return out


def _user(
    shard_id: str, seq: str, sub: int, aggregated: bool, pk: str, ehk: str | None, data: bytes, ts: Any
) -> dict[str, Any]:
    return {
        "shard_id": shard_id,
        "sequence_number": seq,
        "sub_sequence_number": sub,
        "aggregated": aggregated,
        "partition_key": pk,
        "explicit_hash_key": ehk,
        "data": data,
        "approximate_arrival_timestamp": ts,
    }


def iter_shard_records(
    client: Any, stream: str, shard_id: str, *, limit: int = 10000, empty_polls: int = 2
) -> Iterator[dict[str, Any]]:
    """Raw boto3 records of one shard from TRIM_HORIZON until the shard ends (NextShardIterator
    None) or ``empty_polls`` consecutive empty responses."""
    it = client.get_shard_iterator(StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    empties = 0
    while it:
        resp = client.get_records(ShardIterator=it, Limit=limit)
        records = resp["Records"]
        yield from records
        it = resp.get("NextShardIterator")
        if records:
            empties = 0
        else:
            empties += 1
            if empties >= empty_polls:
                break


def count_stream(endpoint_url: str, stream: str) -> dict[str, int]:
    """Counts what the stream holds, without the engine's codec: Kinesis records, user records (aggregates
    expanded with aws-kinesis-agg's protobuf) and distinct payloads. For benchmarks that check every run."""
    client = kinesis_client(endpoint_url, timeout=60)
    records = users = 0
    payloads: set[bytes] = set()
    for shard in list_shards(endpoint_url, stream):
        for rec in iter_shard_records(client, stream, shard["ShardId"]):
            records += 1
            agg = _parse_aggregate(rec["Data"])
            if agg is None:
                users += 1
                payloads.add(rec["Data"])
            else:
                users += len(agg.records)
                payloads.update(r.data for r in agg.records)
    return {"kinesis_records": records, "user_records": users, "distinct_payloads": len(payloads)}


def read_all(
    endpoint_url: str,
    stream: str,
    *,
    deaggregate_records: bool = True,
    strict: bool = True,
    limit: int = 10000,
    empty_polls: int = 2,
) -> list[dict[str, Any]]:
    """Every user record in ``stream`` (see module doc). ``strict`` raises AggregateError for a
    record that carries the KPL magic but does not decode fully (aws_kinesis_agg alone would print
    the error and drop or pass the record through). With ``deaggregate_records=False`` each Kinesis
    record is returned as is (sub_sequence_number 0, aggregated False)."""
    client = kinesis_client(endpoint_url, timeout=60)
    out: list[dict[str, Any]] = []
    for shard in list_shards(endpoint_url, stream):
        sid = shard["ShardId"]
        for rec in iter_shard_records(client, stream, sid, limit=limit, empty_polls=empty_polls):
            if deaggregate_records:
                out.extend(deaggregate(rec, sid, strict=strict))
            else:
                seq, pk, ts = (
                    rec["SequenceNumber"],
                    rec["PartitionKey"],
                    rec.get("ApproximateArrivalTimestamp"),
                )
                out.append(_user(sid, seq, 0, False, pk, rec.get("ExplicitHashKey"), rec["Data"], ts))
    return out


def wait_for_count(
    endpoint_url: str, stream: str, count: int, *, timeout: float = 30.0, **kwargs: Any
) -> list[dict[str, Any]]:
    """read_all until at least ``count`` user records are there (or timeout); returns the last read."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_all(endpoint_url, stream, **kwargs)
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.1)
