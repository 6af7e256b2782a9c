"""The public surface of `treasure_engine`: `__all__`, and the exception hierarchy callers catch."""

from __future__ import annotations

import pickle

import pytest

import treasure_engine
from treasure_engine import _core

EXPECTED_ALL = sorted(
    [
        "Alert",
        "AlertRule",
        "AlertState",
        "AuthError",
        "BackgroundEngine",
        "BackgroundProducer",
        "BatchResult",
        "BreakerConfig",
        "BreakerMetrics",
        "BreakerRegistry",
        "BreakerState",
        "BufferFull",
        "CircuitBreaker",
        "CircuitOpen",
        "ConfigError",
        "Consumer",
        "ConsumerConfig",
        "Corruption",
        "DeadLetter",
        "DeadLetterFilter",
        "DeadLetterHook",
        "DeadLetterQueue",
        "DeadLetterStats",
        "Downstream",
        "DownstreamClosed",
        "DownstreamConfig",
        "DownstreamError",
        "DownstreamMetrics",
        "DownstreamOverloaded",
        "DownstreamResponse",
        "DownstreamState",
        "DownstreamTimeout",
        "DownstreamUnavailable",
        "EndpointError",
        "Engine",
        "EngineConfig",
        "FlushTimeout",
        "Handler",
        "InvalidHashKey",
        "InvalidPartitionKey",
        "LagStatus",
        "LeaseTableNotFound",
        "LogError",
        "LogLocked",
        "LogNotFound",
        "LogReader",
        "MalformedRecord",
        "Monitor",
        "MonitorConfig",
        "MonitorState",
        "Overloaded",
        "Producer",
        "ProducerClosed",
        "ProducerConfig",
        "ProducerState",
        "ProducerStats",
        "Record",
        "RecordTooLarge",
        "RedriveReport",
        "SegmentLog",
        "ShardStats",
        "StreamNotFound",
        "TreasureEngineError",
        "VerifyReport",
        "__version__",
        "breakers",
    ]
)

# Exceptions made by the Rust extension (the rest are defined in errors.py).
RUST_ERRORS = [
    "ConfigError",
    "RecordTooLarge",
    "InvalidPartitionKey",
    "InvalidHashKey",
    "MalformedRecord",
    "BufferFull",
    "Overloaded",
    "ProducerClosed",
    "CircuitOpen",
    "LogError",
    "LogLocked",
    "LogNotFound",
]
VALUE_ERRORS = ["ConfigError", "RecordTooLarge", "InvalidPartitionKey", "InvalidHashKey", "MalformedRecord"]


def test_all_is_exactly_the_public_surface() -> None:
    assert treasure_engine.__all__ == EXPECTED_ALL
    assert len(set(treasure_engine.__all__)) == len(treasure_engine.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(treasure_engine, name) is not None


def test_star_import_gives_all() -> None:
    namespace: dict[str, object] = {}
    exec("from treasure_engine import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(EXPECTED_ALL)


def test_version_is_a_string() -> None:
    assert isinstance(treasure_engine.__version__, str)
    assert treasure_engine.__version__


@pytest.mark.parametrize("name", VALUE_ERRORS)
def test_bad_input_errors_are_value_errors(name: str) -> None:
    exc = getattr(treasure_engine, name)
    assert issubclass(exc, treasure_engine.TreasureEngineError)
    assert issubclass(exc, ValueError)
    with pytest.raises(ValueError, match="boom"):
        raise exc("boom")


@pytest.mark.parametrize("name", ["BufferFull", "Overloaded", "ProducerClosed", "CircuitOpen"])
def test_state_errors_are_not_value_errors(name: str) -> None:
    exc = getattr(treasure_engine, name)
    assert issubclass(exc, treasure_engine.TreasureEngineError)
    assert not issubclass(exc, ValueError)


def test_flush_timeout_is_a_timeout_error() -> None:
    assert issubclass(treasure_engine.FlushTimeout, treasure_engine.TreasureEngineError)
    assert issubclass(treasure_engine.FlushTimeout, TimeoutError)


@pytest.mark.parametrize("name", ["AuthError", "StreamNotFound"])
def test_endpoint_errors(name: str) -> None:
    exc = getattr(treasure_engine, name)
    assert issubclass(exc, treasure_engine.EndpointError)
    assert issubclass(exc, treasure_engine.TreasureEngineError)
    assert not issubclass(exc, ValueError)


def test_every_exception_derives_from_the_base() -> None:
    for name in EXPECTED_ALL:
        obj = getattr(treasure_engine, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, treasure_engine.TreasureEngineError), name
    assert issubclass(treasure_engine.TreasureEngineError, Exception)


@pytest.mark.parametrize("name", RUST_ERRORS)
def test_rust_errors_are_the_same_objects_everywhere(name: str) -> None:
    exc = getattr(treasure_engine, name)
    assert getattr(_core, name) is exc
    assert getattr(treasure_engine.errors, name) is exc
    assert exc.__module__ == "treasure_engine"
    assert exc.__qualname__ == name
    assert exc.__doc__


@pytest.mark.parametrize("name", RUST_ERRORS)
def test_rust_errors_pickle(name: str) -> None:
    exc = getattr(treasure_engine, name)
    again = pickle.loads(pickle.dumps(exc("why")))
    assert type(again) is exc
    assert again.args == ("why",)


def test_base_error_is_shared() -> None:
    assert _core.TreasureEngineError is treasure_engine.TreasureEngineError


def test_base_error_module_is_public() -> None:
    assert treasure_engine.TreasureEngineError.__module__ == "treasure_engine"


def test_base_error_pickles() -> None:
    again = pickle.loads(pickle.dumps(treasure_engine.TreasureEngineError("why")))
    assert type(again) is treasure_engine.TreasureEngineError


def test_overloaded_is_a_buffer_full() -> None:
    """Shedding is a refusal for lack of room: code that handles BufferFull handles it too."""
    assert issubclass(treasure_engine.Overloaded, treasure_engine.BufferFull)
