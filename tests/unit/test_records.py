"""The consumer's GetRecords parser (`_core.parse_get_records`) and its `Record`: bodies built here with json and
base64, aggregates made by `_core.kpl_encode` and, independently, by Amazon's `aws-kinesis-agg`."""

from __future__ import annotations

import base64
import functools
import gc
import hashlib
import json
import pickle
import sys
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treasure_engine import InvalidHashKey, MalformedRecord, TreasureEngineError, _core

SHARD = "shardId-000000000007"
MAGIC = b"\xf3\x89\x9a\xc2"

Rec = tuple[bytes, str, str | None]


@functools.cache
def aws_aggregator() -> ModuleType:
    """aws-kinesis-agg's aggregator. Importing the package puts its own directory at the front of sys.path
    (messages_pb2 needs it for `import config_pb2`); put sys.path back."""
    saved = list(sys.path)
    try:
        from aws_kinesis_agg import aggregator  # type: ignore[import-untyped]
    finally:
        sys.path[:] = saved
    module: ModuleType = aggregator
    return module


def aws_encode(records: list[Rec]) -> bytes:
    agg = aws_aggregator().AggRecord()
    for data, key, ehk in records:
        assert agg.add_user_record(key, data, ehk)
    _, _, blob = agg.get_contents()
    assert isinstance(blob, bytes)
    return blob


def seq(n: int) -> str:
    return f"49590338271490256608559692538361571095921575989{n:09d}"


def kinesis(data: bytes, partition_key: str, n: int, explicit_hash_key: str | None = None) -> dict[str, Any]:
    """One Kinesis record of a GetRecords response, as AWS sends it."""
    rec: dict[str, Any] = {
        "SequenceNumber": seq(n),
        "ApproximateArrivalTimestamp": 1_700_000_000.25 + n,
        "Data": base64.b64encode(data).decode(),
        "PartitionKey": partition_key,
        "EncryptionType": "NONE",
    }
    if explicit_hash_key is not None:
        rec["ExplicitHashKey"] = explicit_hash_key
    return rec


def body(records: list[dict[str, Any]], **fields: Any) -> bytes:
    fields.setdefault("NextShardIterator", "AAAAAAAAAAGhIf4")
    fields.setdefault("MillisBehindLatest", 0)
    return json.dumps({"Records": records, **fields}).encode()


def fields(r: _core.Record) -> tuple[bytes, str, str | None, str, int, bool]:
    return (r.data, r.partition_key, r.explicit_hash_key, r.sequence_number, r.sub_sequence_number, r.aggregated)


@pytest.mark.parametrize("encode", [_core.kpl_encode, aws_encode], ids=["kpl_encode", "aws-kinesis-agg"])
def test_plain_and_aggregated_records_in_stream_order(encode: Any) -> None:
    first: list[Rec] = [(b"a1", "k1", None), (b"a2", "k2", "17"), (b"", "k1", None)]
    second: list[Rec] = [(b'{"x": 1}', "\u00e9\U0001f389", str(2**128 - 1))]
    page = _core.parse_get_records(
        body(
            [
                kinesis(b"plain one", "p1", 0),
                kinesis(encode(first), "outer", 1),
                kinesis(b"plain two", "p2", 2, explicit_hash_key="42"),
                kinesis(encode(second), "outer2", 3),
            ]
        ),
        SHARD,
    )
    assert len(page) == 6
    assert page.kinesis_records == 4
    assert page.malformed == []
    assert [fields(r) for r in page.records] == [
        (b"plain one", "p1", None, seq(0), 0, False),
        (b"a1", "k1", None, seq(1), 0, True),
        (b"a2", "k2", "17", seq(1), 1, True),
        (b"", "k1", None, seq(1), 2, True),
        (b"plain two", "p2", "42", seq(2), 0, False),
        (b'{"x": 1}', "\u00e9\U0001f389", str(2**128 - 1), seq(3), 0, True),
    ]
    assert [r.approximate_arrival for r in page.records] == [1_700_000_000.25 + n for n in (0, 1, 1, 1, 2, 3)]
    assert {r.shard_id for r in page.records} == {SHARD}
    assert page.shard_id == SHARD
    assert page.last_sequence_number == seq(3)
    assert page.next_shard_iterator == "AAAAAAAAAAGhIf4"
    assert page.millis_behind_latest == 0
    assert page.child_shards == []
    # The same objects on every access; a new list each time.
    assert page.records is not page.records
    assert all(a is b for a, b in zip(page.records, page.records, strict=True))


def test_paging_fields_at_shard_end() -> None:
    page = _core.parse_get_records(
        json.dumps(
            {
                "Records": [],
                "NextShardIterator": None,
                "MillisBehindLatest": 12,
                "ChildShards": [
                    {
                        "ShardId": "shardId-000000000009",
                        "ParentShards": [SHARD, "shardId-000000000008"],
                        "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "1"},
                    }
                ],
                "SomethingNew": {"ignored": [1, 2, 3]},
            }
        ).encode(),
        SHARD,
    )
    assert len(page) == 0
    assert page.records == []
    assert page.lanes(3) == [[], [], []]
    assert page.next_shard_iterator is None
    assert page.millis_behind_latest == 12
    assert page.child_shards == [("shardId-000000000009", [SHARD, "shardId-000000000008"])]
    assert page.kinesis_records == 0
    assert page.last_sequence_number is None
    assert "shard_end=True" in repr(page)
    # Absent optional fields read as None.
    page = _core.parse_get_records(b'{"Records":[]}', SHARD)
    assert (page.next_shard_iterator, page.millis_behind_latest, page.child_shards) == (None, None, [])


def test_escaped_json_strings() -> None:
    data = b"\xfb\xff\xfe"  # base64 "+//+": a JSON encoder may write "\/"
    raw = json.dumps(
        {
            "Records": [
                {
                    "Data": base64.b64encode(data).decode(),
                    "PartitionKey": 'k"\u00e9\n\U0001f600',
                    "SequenceNumber": "12",
                    "ApproximateArrivalTimestamp": 1.5,
                }
            ]
        },
        ensure_ascii=True,
    ).replace("/", "\\/")
    assert "\\/" in raw
    assert "\\ud83d" in raw
    (r,) = _core.parse_get_records(raw.encode(), SHARD).records
    assert r.data == data
    assert r.partition_key == 'k"\u00e9\n\U0001f600'
    assert r.approximate_arrival == 1.5


def test_body_may_be_any_bytes_like() -> None:
    raw = body([kinesis(b"x", "k", 0)])
    for b in (raw, bytearray(raw), memoryview(raw)):
        assert [r.data for r in _core.parse_get_records(b, SHARD).records] == [b"x"]
    with pytest.raises(TypeError, match="bytes-like"):
        _core.parse_get_records(raw.decode(), SHARD)  # type: ignore[arg-type]


def test_lanes_group_by_key_and_keep_order() -> None:
    keys = [f"user-{i % 37}" for i in range(500)]
    chunks: list[list[Rec]] = [[(b"%d" % i, keys[i], None) for i in range(j, j + 50)] for j in range(0, 500, 50)]
    page = _core.parse_get_records(
        body([kinesis(_core.kpl_encode(chunk), "outer", n) for n, chunk in enumerate(chunks)]), SHARD
    )
    records = page.records
    assert len(records) == 500
    for n in (1, 2, 4, 7, 64):
        lanes = page.lanes(n)
        assert len(lanes) == n
        assert sorted((r for lane in lanes for r in lane), key=records.index) == records
        lane_of_key: dict[str, int] = {}
        for i, lane in enumerate(lanes):
            positions = [records.index(r) for r in lane]
            assert positions == sorted(positions), "order kept within a lane"
            for r in lane:
                assert lane_of_key.setdefault(r.partition_key, i) == i, "a key always goes to one lane"
            assert all(any(r is x for x in records) for r in lane), "the page's own Record objects"
    assert page.lanes(1) == [records]
    assert sum(1 for lane in page.lanes(64) if not lane) > 0  # 37 keys cannot fill 64 lanes
    # Stable: the same key lands in the same lane on another page.
    other = _core.parse_get_records(body([kinesis(b"x", "user-5", 0)]), SHARD)
    index = next(i for i, lane in enumerate(page.lanes(4)) if any(r.partition_key == "user-5" for r in lane))
    assert other.lanes(4)[index][0].partition_key == "user-5"


@pytest.mark.parametrize("n", [0, -1, 2**32])
def test_lanes_refuse_a_bad_count(n: int) -> None:
    page = _core.parse_get_records(body([kinesis(b"x", "k", 0)]), SHARD)
    with pytest.raises(ValueError, match="n must be"):
        page.lanes(n)


def corrupt_md5(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0xFF])


def truncated(blob: bytes) -> bytes:
    """The protobuf cut short, with a digest that matches it: only the protobuf is wrong."""
    proto = blob[len(MAGIC) : -16][:-3]
    return MAGIC + proto + hashlib.md5(proto).digest()


def test_broken_aggregates_are_reported_in_place() -> None:
    good = _core.kpl_encode([(b"g0", "k0", None), (b"g1", "k1", None)])
    bad_md5, cut = corrupt_md5(good), truncated(good)
    page = _core.parse_get_records(
        body(
            [
                kinesis(b"before", "p0", 0),
                kinesis(bad_md5, "outer-a", 1),
                kinesis(good, "outer-b", 2),
                kinesis(cut, "outer-c", 3),
                kinesis(b"after", "p1", 4),
            ]
        ),
        SHARD,
    )
    assert [(r.data, r.sequence_number, r.sub_sequence_number) for r in page.records] == [
        (b"before", seq(0), 0),
        (b"g0", seq(2), 0),
        (b"g1", seq(2), 1),
        (b"after", seq(4), 0),
    ]
    first, second = page.malformed
    assert isinstance(first, _core.BadRecord)
    assert (first.data, first.partition_key, first.sequence_number) == (bad_md5, "outer-a", seq(1))
    assert (first.sub_sequence_number, first.shard_id, first.position) == (0, SHARD, 1)
    assert first.approximate_arrival == 1_700_000_001.25
    assert "MD5 mismatch" in first.reason
    assert (second.data, second.partition_key, second.sequence_number) == (cut, "outer-c", seq(3))
    assert second.position == 3
    assert second.reason.startswith("malformed input: KPL aggregate:")
    assert page.kinesis_records == 5
    assert page.last_sequence_number == seq(4)
    assert "position=1" in repr(first)

    # A consumer can rebuild the stream order from the positions.
    merged: list[Any] = list(page.records)
    for bad in reversed(page.malformed):
        merged.insert(bad.position, bad)
    assert [x.sequence_number for x in merged] == [seq(0), seq(1), seq(2), seq(2), seq(3), seq(4)]


def test_data_that_is_not_base64_is_a_bad_record() -> None:
    raw = body([{"Data": "not base64!", "PartitionKey": "k", "SequenceNumber": "9"}, kinesis(b"ok", "k", 1)])
    page = _core.parse_get_records(raw, SHARD)
    assert [r.data for r in page.records] == [b"ok"]
    (bad,) = page.malformed
    assert (bad.data, bad.position, bad.approximate_arrival) == (b"not base64!", 0, 0.0)
    assert "base64" in bad.reason


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "EOF"),
        (b"<html>502 Bad Gateway</html>", "expected value"),
        (b"[]", "GetRecords response object"),
        (b'{"NextShardIterator": "x"}', "missing field `Records`"),
        (b'{"Records": {}}', "array of Kinesis records"),
        (b'{"Records": [{"Data": "", "PartitionKey": "k"}]}', "missing field `SequenceNumber`"),
        (b'{"Records": [{"Data": 1, "PartitionKey": "k", "SequenceNumber": "1"}]}', "invalid type"),
        (b'{"Records": []} {}', "trailing characters"),
        (b'{"__type": "ExpiredIteratorException", "message": "Iterator expired"}', "missing field `Records`"),
    ],
)
def test_a_body_that_is_not_a_get_records_response_raises(raw: bytes, why: str) -> None:
    with pytest.raises(MalformedRecord, match=why) as info:
        _core.parse_get_records(raw, SHARD)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TreasureEngineError)
    assert "GetRecords response" in str(info.value)


def test_records_outlive_their_page() -> None:
    page = _core.parse_get_records(
        body([kinesis(_core.kpl_encode([(b"d%d" % i, f"k{i}", None) for i in range(100)]), "o", 0)]), SHARD
    )
    lanes = page.lanes(3)
    last = page.records[-1]
    del page
    gc.collect()
    assert (last.data, last.partition_key, last.sub_sequence_number) == (b"d99", "k99", 99)
    assert sorted(r.data for lane in lanes for r in lane) == sorted(b"d%d" % i for i in range(100))


def test_pickle_equality_and_hash() -> None:
    page = _core.parse_get_records(
        body([kinesis(_core.kpl_encode([(b"a", "k", "5"), (b"b", "k", None)]), "o", 0), kinesis(b"c", "k", 1)]),
        SHARD,
    )
    records = page.records
    for r in records:
        back = pickle.loads(pickle.dumps(r))
        assert type(back) is _core.Record
        assert back == r
        assert hash(back) == hash(r)
        assert fields(back) == fields(r)
        assert (back.shard_id, back.approximate_arrival) == (r.shard_id, r.approximate_arrival)
    assert records[0] != records[1]  # same sequence number, another sub-sequence number
    assert len({*records, *page.records}) == 3
    # Same sequence numbers on another shard are other records.
    elsewhere = _core.parse_get_records(body([kinesis(b"c", "k", 1)]), "shardId-000000000008").records[0]
    assert elsewhere != records[2]
    assert records[2] == _core.Record(b"other bytes", "other key", seq(1), SHARD)
    assert records[0] != "not a record"


def test_constructor_for_users_tests() -> None:
    r = _core.Record(b"payload", "key", "1", "shardId-0")
    assert fields(r) == (b"payload", "key", None, "1", 0, False)
    assert (r.shard_id, r.approximate_arrival) == ("shardId-0", 0.0)
    r = _core.Record(
        bytearray(b"x"),
        "key",
        "2",
        "shardId-0",
        sub_sequence_number=3,
        explicit_hash_key="7",
        approximate_arrival=1.5,
        aggregated=True,
    )
    assert fields(r) == (b"x", "key", "7", "2", 3, True)
    assert pickle.loads(pickle.dumps(r)) == r
    with pytest.raises(TypeError):
        _core.Record("text", "key", "1", "shardId-0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sub_sequence_number"):
        _core.Record(b"", "key", "1", "shardId-0", sub_sequence_number=-1)


def test_repr_is_concise() -> None:
    r = _core.Record(b"x" * 100_000, "key", "1", SHARD, sub_sequence_number=2)
    text = repr(r)
    assert len(text) < 200
    assert text.startswith("Record(")
    assert "'key'" in text
    assert "sub_sequence_number=2" in text
    assert "<100000 bytes>" in text
    page = _core.parse_get_records(body([kinesis(b"x", "k", 0)]), SHARD)
    assert repr(page).startswith("GetRecordsPage(")
    assert "records=1" in repr(page)


# --- the shard's hash-key range ----------------------------------------------------------------------------

LOWER = (0, 2**127 - 1)
"""The first shard of two even ones."""


def md5_hash(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode()).digest(), "big")


def key_in(lower: bool, tag: str) -> str:
    """A partition key whose MD5 (as Kinesis routes) falls in the lower half of the key space, or the upper."""
    return next(f"{tag}-{i}" for i in range(10_000) if (md5_hash(f"{tag}-{i}") <= LOWER[1]) == lower)


@pytest.mark.parametrize("encode", [_core.kpl_encode, aws_encode], ids=["kpl_encode", "aws-kinesis-agg"])
def test_aggregates_straying_out_of_the_shard_range_are_counted_or_skipped(encode: Any) -> None:
    inside, outside = key_in(True, "in"), key_in(False, "out")
    stray: list[Rec] = [
        (b"s0", inside, None),
        (b"s1", outside, None),
        (b"s2", inside, str(2**127)),  # its key is in, its explicit hash key out
        (b"s3", outside, "5"),  # and the reverse: in
    ]
    fine: list[Rec] = [(b"f0", inside, None), (b"f1", outside, "0")]
    raw = body(
        [
            kinesis(b"plain", outside, 0),  # plain records are never checked
            kinesis(encode(stray), inside, 1),
            kinesis(encode(fine), inside, 2),
            kinesis(encode([(b"last", outside, None)]), inside, 3),
        ]
    )
    every = [b"plain", b"s0", b"s1", b"s2", b"s3", b"f0", b"f1", b"last"]

    page = _core.parse_get_records(raw, SHARD, hash_key_range=LOWER)  # "deliver" is the default
    assert [r.data for r in page.records] == every
    # Every record of an aggregate with one outside (s1, s2, last): those the KCL skips, and the ones a
    # repairing producer sent again.
    assert page.out_of_range_records == 5
    assert page.skipped_out_of_range_records == 0

    page = _core.parse_get_records(raw, SHARD, hash_key_range=LOWER, out_of_range_aggregates="skip")
    assert [(r.data, r.sequence_number, r.sub_sequence_number) for r in page.records] == [
        (b"plain", seq(0), 0),
        (b"f0", seq(2), 0),
        (b"f1", seq(2), 1),
    ]
    assert page.out_of_range_records == 0
    assert page.skipped_out_of_range_records == 5
    # The skipped aggregate is the page's last record: the checkpoint still covers it.
    assert page.kinesis_records == 4
    assert (page.last_sequence_number, page.last_sub_sequence_number) == (seq(3), 0)

    # Without a range, or with the whole key space, nothing strays.
    for page in (
        _core.parse_get_records(raw, SHARD, out_of_range_aggregates="skip"),
        _core.parse_get_records(raw, SHARD, hash_key_range=(0, 2**128 - 1), out_of_range_aggregates="skip"),
    ):
        assert [r.data for r in page.records] == every
        assert (page.out_of_range_records, page.skipped_out_of_range_records) == (0, 0)


def test_a_page_of_skipped_aggregates_is_empty_but_covers_its_records() -> None:
    outside = key_in(False, "out")
    agg = _core.kpl_encode([(b"a", outside, None), (b"b", outside, None), (b"c", outside, None)])
    page = _core.parse_get_records(
        body([kinesis(agg, "o", 0), kinesis(agg, "o", 1)]),
        SHARD,
        hash_key_range=LOWER,
        out_of_range_aggregates="skip",
    )
    assert len(page) == 0
    assert page.records == []
    assert page.kinesis_records == 2
    assert page.skipped_out_of_range_records == 6
    assert (page.last_sequence_number, page.last_sub_sequence_number) == (seq(1), 2)
    assert "skipped_out_of_range_records=6" in repr(page)


def test_range_check_arguments_are_checked() -> None:
    raw = body([])
    with pytest.raises(ValueError, match="out_of_range_aggregates"):
        _core.parse_get_records(raw, SHARD, out_of_range_aggregates="drop")  # type: ignore[arg-type]
    with pytest.raises(InvalidHashKey):
        _core.parse_get_records(raw, SHARD, hash_key_range=(5, 4))
    with pytest.raises(OverflowError):
        _core.parse_get_records(raw, SHARD, hash_key_range=(0, 2**128))
    with pytest.raises(TypeError):
        _core.parse_get_records(raw, SHARD, LOWER)  # type: ignore[misc]


# A Kinesis record of the property test: plain (data, key, ehk) or an aggregate of such records.
USERS = st.tuples(
    st.binary(max_size=60),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
    st.none() | st.integers(0, 2**128 - 1).map(str),
)
KINESIS = st.lists(st.one_of(USERS, st.lists(USERS, min_size=1, max_size=8)), max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinesis_records=KINESIS, lanes=st.integers(1, 6))
def test_every_user_record_comes_back_in_order(kinesis_records: list[Any], lanes: int) -> None:
    expected = []
    raw = []
    for n, rec in enumerate(kinesis_records):
        if isinstance(rec, list):
            raw.append(kinesis(_core.kpl_encode(rec), "outer", n))
            expected += [(d, k, e, seq(n), i, True) for i, (d, k, e) in enumerate(rec)]
        else:
            d, k, e = rec
            raw.append(kinesis(d, k, n, explicit_hash_key=e))
            expected.append((d, k, e, seq(n), 0, False))
    page = _core.parse_get_records(body(raw), SHARD)
    assert [fields(r) for r in page.records] == expected
    assert page.kinesis_records == len(kinesis_records)
    assert page.last_sequence_number == (seq(len(kinesis_records) - 1) if kinesis_records else None)
    grouped = page.lanes(lanes)
    assert len(grouped) == lanes
    position = {(r.sequence_number, r.sub_sequence_number): i for i, r in enumerate(page.records)}
    merged = sorted(
        (r for lane in grouped for r in lane), key=lambda r: position[r.sequence_number, r.sub_sequence_number]
    )
    assert [fields(r) for r in merged] == expected
    for lane in grouped:
        order = [(r.sequence_number, r.sub_sequence_number) for r in lane]
        assert order == sorted(order)
