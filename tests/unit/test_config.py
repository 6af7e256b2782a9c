"""ProducerConfig: defaults, validation naming the field, immutability, and what it hands to `_core`."""

from __future__ import annotations

import inspect
from typing import Any

import msgspec
import pytest

from treasure_engine import ConfigError, ProducerConfig, _core

KiB = 1024
MiB = 1024 * KiB
ONE_SHARD = [("shardId-000000000000", 0, 2**128 - 1)]


def test_defaults() -> None:
    c = ProducerConfig(stream="s")
    assert c.stream == "s"
    assert c.region is None
    assert c.endpoint_url is None
    assert c.aggregate is True
    assert c.aggregation_max_bytes == 51_200
    assert c.linger_ms == 50.0
    assert c.ring_bytes == 64 * MiB
    assert c.overflow == "reject"
    assert c.block_timeout_s == 1.0
    assert c.ordered is False
    assert c.max_attempts == 10
    assert c.record_ttl_s == 300.0
    assert c.max_in_flight == 8
    assert c.max_record_bytes == 1 * MiB
    assert c.max_request_records == 500
    assert c.max_request_bytes == 5 * MiB
    assert c.shard_records_per_s == 1000.0
    assert c.shard_bytes_per_s == 1.0 * MiB
    assert c.max_buffered_bytes is None
    assert c.buffered_bytes_limit == 8 * MiB  # an eighth of the 64 MiB ring
    assert c.request_timeout_s == 10.0
    assert c.backoff_base_s == 0.1
    assert c.backoff_max_s == 5.0
    assert c.shard_refresh_s == 60.0


def test_stream_is_required_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        ProducerConfig()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ProducerConfig("s")  # type: ignore[misc]


BAD_VALUES: list[tuple[str, Any]] = [
    ("stream", ""),
    ("stream", 5),
    ("stream", None),
    ("region", 1),
    ("endpoint_url", b"http://x"),
    ("aggregate", 1),
    ("aggregate", "yes"),
    ("aggregate", None),
    ("aggregation_max_bytes", 63),
    ("aggregation_max_bytes", 2 * MiB),
    ("aggregation_max_bytes", 1024.0),
    ("aggregation_max_bytes", True),
    ("linger_ms", "5"),
    ("linger_ms", -1),
    ("linger_ms", 60_001),
    ("linger_ms", None),
    ("linger_ms", True),
    ("ring_bytes", 64 * KiB - 1),
    ("ring_bytes", 0),
    ("ring_bytes", (1 << 40) + 1),
    ("ring_bytes", 1.5 * MiB),
    ("overflow", "drop"),
    ("overflow", "REJECT"),
    ("overflow", None),
    ("block_timeout_s", -0.001),
    ("block_timeout_s", "1"),
    ("ordered", 0),
    ("ordered", "false"),
    ("max_attempts", 0),
    ("max_attempts", -3),
    ("max_attempts", 2.0),
    ("max_attempts", False),
    ("record_ttl_s", 0),
    ("record_ttl_s", -1.0),
    ("max_in_flight", 0),
    ("max_in_flight", 1025),
    ("max_in_flight", "8"),
    ("max_record_bytes", 1023),
    ("max_record_bytes", 10 * MiB + 1),
    ("max_request_records", 0),
    ("max_request_records", 501),
    ("max_request_bytes", 10 * MiB + 1),
    ("max_request_bytes", 1 * MiB - 1),
    ("shard_records_per_s", 0),
    ("shard_records_per_s", -1.0),
    ("shard_records_per_s", "1000"),
    ("shard_bytes_per_s", 0.0),
    ("max_buffered_bytes", "16"),
    ("request_timeout_s", 0),
    ("request_timeout_s", -5),
    ("backoff_base_s", -0.1),
    ("backoff_max_s", 0.05),
    ("shard_refresh_s", 0),
    ("shard_refresh_s", [60]),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_out_of_range_names_the_field(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"stream": "s", field: value}
    with pytest.raises(ConfigError, match=rf"\b{field}\b") as info:
        ProducerConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("invalid configuration: ")


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_from_dict_names_the_field(field: str, value: Any) -> None:
    data: dict[str, Any] = {"stream": "s", field: value}
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        ProducerConfig.from_dict(data)


GOOD_EDGES: list[tuple[str, Any]] = [
    ("linger_ms", 0),
    ("linger_ms", 60_000),
    ("linger_ms", 5),  # an int where a float is expected
    ("ring_bytes", 64 * KiB),
    ("block_timeout_s", 0),
    ("max_attempts", 1),
    ("max_in_flight", 1),
    ("max_in_flight", 1024),
    ("max_request_records", 1),
    ("max_request_records", 500),
    ("max_request_bytes", 1 * MiB),
    ("aggregation_max_bytes", 64),
    ("aggregation_max_bytes", 1 * MiB),
    ("backoff_base_s", 0),
    ("overflow", "block"),
    ("region", "eu-west-1"),
    ("endpoint_url", "http://127.0.0.1:4567"),
]


@pytest.mark.parametrize(("field", "value"), GOOD_EDGES, ids=[f"{f}={v!r}" for f, v in GOOD_EDGES])
def test_edges_accepted(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"stream": "s", field: value}
    assert getattr(ProducerConfig(**kwargs), field) == value


def test_ten_mib_records_configurable() -> None:
    c = ProducerConfig(stream="s", max_record_bytes=10 * MiB, max_request_bytes=10 * MiB)
    assert c.max_record_bytes == 10 * MiB


def test_max_record_over_request_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_request_bytes"):
        ProducerConfig(stream="s", max_record_bytes=2 * MiB, max_request_bytes=1 * MiB)
    with pytest.raises(ConfigError, match="aggregation_max_bytes"):
        ProducerConfig(stream="s", max_record_bytes=4 * KiB, max_request_bytes=4 * KiB)
    ok = ProducerConfig(stream="s", max_record_bytes=4 * KiB, max_request_bytes=4 * KiB, aggregation_max_bytes=4 * KiB)
    assert ok.max_request_bytes == 4 * KiB
    with pytest.raises(ConfigError, match="backoff_max_s"):
        ProducerConfig(stream="s", backoff_base_s=2.0, backoff_max_s=1.0)


def test_from_dict_round_trip() -> None:
    c = ProducerConfig.from_dict({"stream": "orders", "linger_ms": 5, "aggregate": False, "overflow": "block"})
    assert c == ProducerConfig(stream="orders", linger_ms=5.0, aggregate=False, overflow="block")
    assert ProducerConfig.from_dict(msgspec.to_builtins(c)) == c


def test_from_dict_unknown_field() -> None:
    with pytest.raises(ConfigError, match="lingerms"):
        ProducerConfig.from_dict({"stream": "s", "lingerms": 5})


def test_from_dict_missing_stream() -> None:
    with pytest.raises(ConfigError, match="stream"):
        ProducerConfig.from_dict({"linger_ms": 5})


def test_unknown_keyword() -> None:
    with pytest.raises(TypeError):
        ProducerConfig(stream="s", lingerms=5)  # type: ignore[call-arg]


def test_frozen() -> None:
    c = ProducerConfig(stream="s")
    with pytest.raises(AttributeError):
        c.linger_ms = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        c.stream = "t"  # type: ignore[misc]
    assert c.linger_ms == 50.0
    assert hash(c) == hash(ProducerConfig(stream="s"))


def test_replace_revalidates() -> None:
    c = ProducerConfig(stream="s")
    assert msgspec.structs.replace(c, linger_ms=1.0).linger_ms == 1.0
    with pytest.raises(ConfigError, match="linger_ms"):
        msgspec.structs.replace(c, linger_ms=-1.0)


CONFIGS = [
    ProducerConfig(stream="s"),
    ProducerConfig(stream="arn:aws:kinesis:us-east-1:123456789012:stream/s"),
    ProducerConfig(
        stream="s",
        aggregate=False,
        ordered=True,
        linger_ms=0,
        ring_bytes=64 * KiB,
        max_record_bytes=1 * KiB,
        max_request_bytes=1 * MiB,
        aggregation_max_bytes=64,
        max_request_records=1,
        max_attempts=1,
        max_in_flight=1,
        overflow="block",
        block_timeout_s=0,
        backoff_base_s=0,
        backoff_max_s=0,
        max_buffered_bytes=2 * MiB,
    ),
    ProducerConfig(
        stream="s",
        max_record_bytes=5 * MiB,
        max_request_bytes=5 * MiB,
        ring_bytes=64 * MiB,
        max_buffered_bytes=16 * MiB,
    ),
]


@pytest.mark.parametrize(
    ("ring_bytes", "max_request_bytes", "expected"),
    [
        (64 * MiB, 5 * MiB, 8 * MiB),  # an eighth of the ring
        (256 * MiB, 5 * MiB, 16 * MiB),  # capped
        (1 * MiB, 5 * MiB, 8 * MiB),  # at least two requests (of at most 4 MiB each)
        (1 * MiB, 1 * MiB, 2 * MiB),
        (96 * MiB, 1 * MiB, 12 * MiB),
    ],
)
def test_buffered_bytes_limit_follows_the_ring(ring_bytes: int, max_request_bytes: int, expected: int) -> None:
    c = ProducerConfig(
        stream="s", ring_bytes=ring_bytes, max_request_bytes=max_request_bytes, max_record_bytes=64 * KiB
    )
    assert c.buffered_bytes_limit == expected
    assert c.pipeline_kwargs()["max_buffered_bytes"] == expected
    pipeline = _core.Pipeline("s", ONE_SHARD, **c.pipeline_kwargs())  # accepted by Rust
    pipeline.shutdown(True)
    explicit = ProducerConfig(stream="s", ring_bytes=ring_bytes, max_buffered_bytes=3 * MiB, max_record_bytes=64 * KiB)
    assert explicit.buffered_bytes_limit == 3 * MiB


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_pipeline_kwargs_accepted_by_core(config: ProducerConfig) -> None:
    kwargs = config.pipeline_kwargs()
    assert kwargs["stream_is_arn"] is config.stream.startswith("arn:")
    assert kwargs["max_ready_requests"] == config.max_in_flight
    pipeline = _core.Pipeline(config.stream, ONE_SHARD, **kwargs)
    try:
        assert not pipeline.is_closed()
        assert pipeline.stats()["accepted"] == 0
    finally:
        pipeline.shutdown(True)
    assert pipeline.is_closed()


def test_pipeline_kwargs_cover_the_core_signature() -> None:
    kwargs = ProducerConfig(stream="s").pipeline_kwargs()
    # Every keyword the extension takes (besides stream and shards) comes from the config.
    params = inspect.signature(_core.Pipeline).parameters
    # The spill and WAL directories are chosen by the Producer (a free slot under state_dir); segment sizes keep
    # the extension's defaults.
    chosen_by_producer = {"spill_dir", "wal_dir", "spill_segment_bytes", "wal_segment_bytes"}
    assert set(kwargs) == set(params) - {"stream", "shards"} - chosen_by_producer


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ring_bytes": 4096, "max_record_bytes": MiB}, "ring_bytes"),
        ({"max_buffered_bytes": 1024}, "max_buffered_bytes"),
        ({"max_ready_requests": 0}, "max_ready_requests"),
        ({"linger_ms": -1.0}, "linger_ms"),
        ({"record_ttl_s": float("nan")}, "record_ttl_s"),
        ({"overflow": "drop"}, "overflow"),
        ({"shard_records_per_s": float("inf")}, "shard_records_per_s"),
        ({"max_request_records": 501}, "max_request_records"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_core_refuses_bad_kwargs_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _core.Pipeline("s", ONE_SHARD, **kwargs)


@pytest.mark.parametrize(
    "shards",
    [
        [],
        [("a", 10, 5)],
        [("a", 0, 10), ("b", 10, 20)],
    ],
)
def test_core_refuses_bad_shard_maps(shards: list[tuple[str, int, int]]) -> None:
    with pytest.raises(ConfigError, match="shards"):
        _core.Pipeline("s", shards)


def test_core_refuses_empty_stream() -> None:
    with pytest.raises(ConfigError, match="stream"):
        _core.Pipeline("", ONE_SHARD)


def test_shed_when_critical_sets_the_critical_level_in_bytes() -> None:
    off = ProducerConfig(stream="s", ring_bytes=1 << 20).pipeline_kwargs()
    on = ProducerConfig(stream="s", ring_bytes=1 << 20, shed_when_critical=True, critical_backlog=0.5).pipeline_kwargs()
    assert off["shed_at_bytes"] == 0
    assert on["shed_at_bytes"] == 1 << 19
    with pytest.raises(ConfigError, match="critical_backlog"):
        ProducerConfig(stream="s", critical_backlog=0.0)
