"""The KPL aggregate codec (`_core.kpl_encode` / `kpl_decode`) against Amazon's `aws-kinesis-agg`: each side
decodes what the other encodes, and corrupt input never crashes the decoder."""

from __future__ import annotations

import base64
import functools
import hashlib
import sys
from types import ModuleType

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treasure_engine import MalformedRecord, _core

MAGIC = b"\xf3\x89\x9a\xc2"

Rec = tuple[bytes, str, str | None]


@functools.cache
def aws_agg() -> tuple[ModuleType, ModuleType, ModuleType]:
    """(deaggregator, aggregator, messages_pb2) of aws-kinesis-agg. Importing them puts the package's own
    directory at the front of sys.path (messages_pb2 needs it for `import config_pb2`); put sys.path back."""
    saved = list(sys.path)
    try:
        from aws_kinesis_agg import aggregator, deaggregator, messages_pb2
    finally:
        sys.path[:] = saved
    return deaggregator, aggregator, messages_pb2


def aws_decode(blob: bytes, outer_key: str = "outer") -> list[Rec]:
    """De-aggregates with aws-kinesis-agg as Lambda would hand it a record."""
    deaggregator, _, _ = aws_agg()
    lambda_record = {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "sequenceNumber": "49590338271490256608559692538361571095921575989136588898",
            "partitionKey": outer_key,
            "approximateArrivalTimestamp": 1_700_000_000.0,
            "data": base64.b64encode(blob),
        }
    }
    out = []
    for r in deaggregator.deaggregate_records([lambda_record]):
        k = r["kinesis"]
        assert k.get("aggregated") is True
        out.append((base64.b64decode(k["data"]), k["partitionKey"], k.get("explicitHashKey")))
    return out


def aws_encode(records: list[Rec]) -> bytes:
    _, aggregator, _ = aws_agg()
    agg = aggregator.AggRecord()
    for data, key, ehk in records:
        assert agg.add_user_record(key, data, ehk)
    _, _, blob = agg.get_contents()
    assert isinstance(blob, bytes)
    return blob


def same_ignoring_unset_ehk(ours: list[Rec], theirs: list[Rec]) -> None:
    """aws-kinesis-agg 1.2.3 gives a record without an explicit hash key the table's entry 0 whenever the
    table is not empty (proto2 optional read as 0): compare EHKs only where the record had one."""
    assert len(ours) == len(theirs)
    for (d1, k1, e1), (d2, k2, e2) in zip(ours, theirs, strict=True):
        assert (d1, k1) == (d2, k2)
        if e1 is not None:
            assert e2 == e1
        elif e2 is not None:
            assert any(e == e2 for _, _, e in ours)


KEYS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=256)
EHKS = st.none() | st.integers(0, 2**128 - 1).map(str)
RECORDS = st.lists(
    st.tuples(st.binary(max_size=2000), st.sampled_from(["k", "🎉", "é" * 256]) | KEYS, EHKS),
    min_size=1,
    max_size=40,
)
COMPAT = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMPAT
@given(records=RECORDS)
def test_ours_decodes_with_aws(records: list[Rec]) -> None:
    blob = _core.kpl_encode(records)
    assert _core.kpl_is_aggregated(blob)
    same_ignoring_unset_ehk(records, aws_decode(blob))
    assert _core.kpl_decode(blob) == records


@COMPAT
@given(records=RECORDS)
def test_aws_decodes_with_ours(records: list[Rec]) -> None:
    blob = aws_encode(records)
    assert _core.kpl_is_aggregated(blob)
    assert _core.kpl_decode(blob) == records


@COMPAT
@given(records=RECORDS)
def test_byte_identical_to_aws(records: list[Rec]) -> None:
    # Both write protobuf's canonical encoding of the same tables in first-seen order.
    assert _core.kpl_encode(records) == aws_encode(records)


@pytest.mark.parametrize(
    "records",
    [
        [(b"", "k", None)],
        [(b"", "k", None), (b"", "k", None)],
        [(b"x" * n, "k" * m, None) for n in (127, 128, 16383, 16384) for m in (127, 128)],
        [(b"a", "k", "0"), (b"b", "k", str(2**128 - 1)), (b"c", "k2", None), (b"d", "k", "0")],
        [(b"big", "🎉" * 256, str(2**127))],
        [(bytes(range(256)) * 4000, "k", None)],  # ~1 MB of data in one record
        [(b"%d" % i, f"key-{i % 200}", None) for i in range(1000)],  # indexes past one varint byte
    ],
    ids=["one-empty", "two-empty", "varint-edges", "ehk-table", "max-key", "1MB", "wide-tables"],
)
def test_edge_cases_both_ways(records: list[Rec]) -> None:
    ours = _core.kpl_encode(records)
    assert _core.kpl_decode(ours) == records
    same_ignoring_unset_ehk(records, aws_decode(ours))
    theirs = aws_encode(records)
    assert _core.kpl_decode(theirs) == records
    assert ours == theirs


def test_tags_and_field_order_accepted() -> None:
    """Any valid encoding decodes: tags (field 4) skipped, tables after the records."""
    _, _, messages_pb2 = aws_agg()
    agg = messages_pb2.AggregatedRecord()
    r = agg.records.add()
    r.partition_key_index = 1
    r.data = b"payload"
    tag = r.tags.add()
    tag.key = "t"
    tag.value = "v"
    r2 = agg.records.add()
    r2.partition_key_index = 0
    r2.explicit_hash_key_index = 0
    r2.data = b""
    records_part = agg.SerializeToString()
    tables = messages_pb2.AggregatedRecord()
    tables.partition_key_table.extend(["p0", "p1"])
    tables.explicit_hash_key_table.append("99")
    body = records_part + tables.SerializeToString()  # concatenated protobuf messages merge
    blob = MAGIC + body + hashlib.md5(body).digest()
    assert _core.kpl_decode(blob) == [(b"payload", "p1", None), (b"", "p0", "99")]


def wrap(body: bytes) -> bytes:
    return MAGIC + body + hashlib.md5(body).digest()


VALID = _core.kpl_encode([(b"hello", "k1", None), (b"world", "k2", "123"), (b"", "k1", None)])


def test_empty_aggregate_is_not_an_aggregate() -> None:
    blob = _core.kpl_encode([])
    assert blob == MAGIC + hashlib.md5(b"").digest()
    assert not _core.kpl_is_aggregated(blob)
    with pytest.raises(MalformedRecord):
        _core.kpl_decode(blob)


@pytest.mark.parametrize("blob", [b"", b"\xf3", MAGIC, b"plain data", b"\x00" + VALID[1:], VALID[:20]])
def test_not_aggregated(blob: bytes) -> None:
    assert not _core.kpl_is_aggregated(blob)
    with pytest.raises(MalformedRecord):
        _core.kpl_decode(blob)


@pytest.mark.parametrize("at", range(len(MAGIC), len(VALID)))
def test_flipped_byte_is_malformed(at: int) -> None:
    blob = bytearray(VALID)
    blob[at] ^= 0x01
    assert _core.kpl_is_aggregated(bytes(blob))
    with pytest.raises(MalformedRecord, match="KPL"):
        _core.kpl_decode(bytes(blob))


@pytest.mark.parametrize("keep", range(21, len(VALID)))
def test_truncated_is_malformed(keep: int) -> None:
    with pytest.raises(MalformedRecord):
        _core.kpl_decode(VALID[:keep])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x1a\x02\x08\x00", "without data"),  # record: pk index, no data
        (b"\x1a\x02\x1a\x00", "without partition_key_index"),
        (b"\x1a\x04\x08\x05\x1a\x00", "index out of range"),  # pk index 5, empty table
        (b"\x0a\x01k\x1a\x06\x08\x00\x10\x00\x1a\x00", "index out of range"),  # ehk index 0, no ehk table
        (b"\x0a\x02\xff\xfe\x1a\x04\x08\x00\x1a\x00", "UTF-8"),
        (b"\x0a\x05k", "past the end"),
        (b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "varint"),
        (b"\x0b", "wire type"),  # group start
        (b"\x00", "field number 0"),
    ],
)
def test_malformed_bodies_with_valid_digest(body: bytes, why: str) -> None:
    with pytest.raises(MalformedRecord, match=why):
        _core.kpl_decode(wrap(body))


@settings(max_examples=300, deadline=None)
@given(
    blob=st.binary(max_size=200) | st.binary(max_size=200).map(wrap) | st.binary(max_size=200).map(lambda b: MAGIC + b)
)
def test_decode_never_crashes(blob: bytes) -> None:
    try:
        out = _core.kpl_decode(blob)
    except MalformedRecord:
        return
    assert _core.kpl_is_aggregated(blob)
    for data, key, ehk in out:
        assert isinstance(data, bytes)
        assert isinstance(key, str)
        assert ehk is None or isinstance(ehk, str)


@settings(max_examples=200, deadline=None)
@given(records=RECORDS, data=st.data())
def test_mutated_aggregate_never_crashes(records: list[Rec], data: st.DataObject) -> None:
    blob = bytearray(_core.kpl_encode(records))
    body = blob[4:-16]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    mutated = wrap(bytes(body[:cut]))  # digest fixed up: the protobuf parser itself is exercised
    try:
        out = _core.kpl_decode(mutated)
    except MalformedRecord:
        return
    assert all(isinstance(k, str) for _, k, _ in out)


@settings(max_examples=100, deadline=None)
@given(records=RECORDS)
def test_seal_offline_aggregates_decode_with_aws(records: list[Rec]) -> None:
    """What the batcher sends: every aggregate in a sealed body de-aggregates with aws-kinesis-agg."""

    events = [(d, k) for d, k, _ in records]
    bodies = _core.seal_offline("s", [("shardId-000000000000", 0, 2**128 - 1)], events, aggregation_max_bytes=8192)
    seen: list[tuple[bytes, str]] = []
    for body in bodies:
        for r in orjson.loads(body)["Records"]:
            data = base64.b64decode(r["Data"])
            if _core.kpl_is_aggregated(data):
                seen += [(d, k) for d, k, _ in aws_decode(data, r["PartitionKey"])]
            else:
                seen.append((data, r["PartitionKey"]))
    assert seen == events


def test_aws_import_restores_sys_path() -> None:
    before = list(sys.path)
    aws_agg()
    assert sys.path == before
