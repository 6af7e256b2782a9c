"""Bad input at every public door (issue 19, case 10): a typed error, or exit code 2 and one clear line.

Each door gets sizes, keys, types and configs that are wrong. The rule it is held to:

- a wrong *value* raises a subclass of `TreasureEngineError` (`ConfigError`, `InvalidPartitionKey`, ...) whose
  message names what was wrong;
- a wrong Python *type* may also raise `TypeError` (the package's documented convention, as for data that is not
  bytes), but then its message names the argument, not an internal detail ("'int' object is not iterable");
- nothing else: no `AttributeError`, `KeyError`, `OverflowError`, `ZeroDivisionError`, `UnicodeEncodeError`;
- the command line exits with 2 and says what is wrong in one `error:` line, without a traceback.

Doors that break the rule today are marked `finding(...)` (xfail, strict): the test says what should happen,
and turns red once the door is fixed, so the mark comes off with the fix. Only the top-level `treasure_engine`
package and `treasure_engine._core` are imported; the CLI is reached through its console-script entry point
(pyproject's [project.scripts]) or as `python -m treasure_engine`, so module moves do not break this file.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from tests.support.emulators import Kinesalite, create_stream

import treasure_engine as te
from treasure_engine import TreasureEngineError

ROOT = Path(__file__).resolve().parents[2]


def finding(reason: str) -> pytest.MarkDecorator:
    """A door that misbehaves today (listed in the issue's closing note); strict, so a fix shows up."""
    return pytest.mark.xfail(strict=True, reason=reason)


def refused(call: Callable[[], object], *words: str, type_error: bool = False) -> BaseException:
    """`call()` must raise a TreasureEngineError (or, with `type_error`, a TypeError) naming every one of `words`."""
    allowed: tuple[type[BaseException], ...] = (
        (TreasureEngineError, TypeError) if type_error else (TreasureEngineError,)
    )
    try:
        result = call()
    except allowed as e:
        error: BaseException = e
    except BaseException as e:  # what the door should not raise
        pytest.fail(f"untyped {type(e).__module__}.{type(e).__name__}: {e}", pytrace=False)
    else:
        pytest.fail(f"accepted: returned {result!r}", pytrace=False)
    missing = [w for w in words if w.lower() not in str(error).lower()]
    assert not missing, f"{type(error).__name__}({error}) does not name {missing}"
    return error


# --- configs -----------------------------------------------------------------------------------------------------

CONFIGS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "ProducerConfig": (te.ProducerConfig, {"stream": "s"}),
    "ConsumerConfig": (te.ConsumerConfig, {"stream": "s", "application": "app"}),
    "MonitorConfig": (te.MonitorConfig, {}),
    "BreakerConfig": (te.BreakerConfig, {}),
    "DownstreamConfig": (te.DownstreamConfig, {}),
}

# Values no numeric or string field takes; per field, one of them at least must be refused.
ODD_VALUES: list[Any] = [math.nan, math.inf, -1, 2**70, "x", [], {}, True, b"x"]


def _config_cases() -> Iterator[Any]:
    for name, (cls, _) in CONFIGS.items():
        for field in cls.__struct_fields__:
            yield pytest.param(name, field, id=f"{name}.{field}")


@pytest.mark.parametrize(("config", "field"), list(_config_cases()))
def test_config_fields_refuse_odd_values_naming_the_field(config: str, field: str) -> None:
    """Constructed directly (msgspec checks no types then: `_check_types` does), every field refuses what is not
    its type, with an error that names it. Values a field legitimately takes are skipped."""
    cls, base = CONFIGS[config]
    messages = []
    for value in ODD_VALUES:
        try:
            cls(**{**base, field: value})
        except TreasureEngineError as e:
            messages.append(f"{field}={value!r}: {e}")
        except BaseException as e:
            pytest.fail(f"{field}={value!r}: untyped {type(e).__name__}: {e}", pytrace=False)
    assert messages, f"{config}.{field} took every one of {ODD_VALUES}"
    assert all(field in m.partition(": ")[2] for m in messages), messages


@pytest.mark.parametrize("config", [c for c in CONFIGS if hasattr(CONFIGS[c][0], "from_dict")])
@pytest.mark.parametrize("data", [None, [], "stream", 5], ids=["None", "list", "str", "int"])
def test_from_dict_of_not_a_mapping(config: str, data: Any) -> None:
    cls, _ = CONFIGS[config]
    refused(lambda: cls.from_dict(data), "invalid configuration")


def test_unknown_config_field_names_it() -> None:
    refused(lambda: te.ProducerConfig.from_dict({"stream": "s", "colour": 1}), "colour")
    refused(lambda: te.ProducerConfig(stream="s", colour=1), "colour", type_error=True)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"producer": 5},
        {"producer": {"stream": "s"}, "shutdown_timeout_s": -1},
        {"producer": {"stream": "s", "linger_ms": "soon"}},
        {"producer": {"stream": "s"}, "monitor": {"port": 70000}},
    ],
    ids=["None", "empty", "section-int", "timeout", "linger-str", "monitor-port"],
)  # fmt: skip
def test_engine_config_from_dict(data: Any) -> None:
    refused(lambda: te.EngineConfig.from_dict(data, env={}))


@pytest.mark.parametrize(
    "env",
    [
        {"TREASURE_ENGINE__": "1"},
        {"TREASURE_ENGINE__PRODUCER": "1"},
        {"TREASURE_ENGINE__PRODUCER__LINGER_MS__X": "1"},
        {"TREASURE_ENGINE__PRODUCER__RING_BYTES": "lots"},
        {"TREASURE_ENGINE__NOPE__X": "1"},
    ],
)
def test_engine_config_environment(env: dict[str, str]) -> None:
    refused(lambda: te.EngineConfig.from_dict({"producer": {"stream": "s"}}, env=env))


def _toml_doors(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "bad.toml").write_text("[producer\n")
    (tmp_path / "dir.toml").mkdir()
    return {
        "missing": tmp_path / "missing.toml",
        "binary": tmp_path / "binary.toml",
        "not-toml": tmp_path / "bad.toml",
        "directory": tmp_path / "dir.toml",
    }


@pytest.mark.parametrize("kind", ["missing", "binary", "not-toml", "directory"])
def test_engine_config_from_toml_names_the_file(tmp_path: Path, kind: str) -> None:
    path = _toml_doors(tmp_path)[kind]
    refused(lambda: te.EngineConfig.from_toml(path), path.name)
    refused(lambda: te.Engine.from_toml(path), path.name)


def test_engine_config_from_toml_nul_in_path() -> None:
    refused(lambda: te.EngineConfig.from_toml("a\x00b.toml"), "config")


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("Producer", lambda: te.Producer(None)),  # type: ignore[arg-type]
        ("Producer", lambda: te.Producer(te.ConsumerConfig(stream="s", application="app"))),  # type: ignore[arg-type]
        ("Consumer", lambda: te.Consumer(None, None)),  # type: ignore[arg-type]
        ("Engine", lambda: te.Engine(None)),  # type: ignore[arg-type]
        ("Monitor", lambda: te.Monitor({})),  # type: ignore[arg-type]
        ("CircuitBreaker", lambda: te.CircuitBreaker("b", {})),  # type: ignore[arg-type]
    ],
    ids=["producer-none", "producer-consumer-config", "consumer-none", "engine-none", "monitor-dict", "breaker-dict"],
)
def test_a_config_of_the_wrong_kind_names_it(name: str, make: Callable[[], object]) -> None:
    refused(make, "config", type_error=True)


def test_consumer_handler_must_be_async() -> None:
    config = te.ConsumerConfig(stream="s", application="app")
    refused(lambda: te.Consumer(config, lambda records: None), "async")  # type: ignore[arg-type, return-value]
    refused(lambda: te.Consumer(config, None), "async")  # type: ignore[arg-type]


# --- alerts, breakers, downstreams ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"name": "a", "expr": "((("}, "malformed"),
        ({"name": "", "expr": "dlq_entries > 1"}, "name"),
        ({"name": "a", "expr": "dlq_entries > 1", "for_s": -1}, "for_s"),
        ({"name": "a", "expr": "no_such_metric > 1"}, "no_such_metric"),
    ],
)
def test_alert_rule(kwargs: dict[str, Any], word: str) -> None:
    refused(lambda: te.AlertRule(**kwargs), word)


@pytest.mark.parametrize(
    "make",
    [
        lambda: te.CircuitBreaker(""),
        lambda: te.breakers.get(""),
        lambda: te.CircuitBreaker(None),  # type: ignore[arg-type]
    ],
    ids=["empty", "registry-empty", "none"],
)  # fmt: skip
def test_breaker_name(make: Callable[[], object]) -> None:
    try:
        refused(make, "name", type_error=True)
    finally:
        te.breakers.remove("")


@pytest.mark.parametrize(
    "base_url",
    [
        "",
        "ftp://x",
        None,
    ],
    ids=["empty", "ftp", "none"],
)  # fmt: skip
def test_downstream_base_url(base_url: Any) -> None:
    refused(lambda: te.Downstream(base_url), "base_url", type_error=True)


def test_batch_result() -> None:
    refused(lambda: te.BatchResult(failed=[1]), "record", type_error=True)  # type: ignore[list-item]
    refused(lambda: te.BatchResult(failed=5), "failed", type_error=True)  # type: ignore[arg-type]


# --- the dead-letter queue, the segment log ------------------------------------------------------------------------


def _letter(**kw: Any) -> Any:
    fields: dict[str, Any] = {
        "data": b"x", "partition_key": "k", "source": "producer", "stream": "s", "attempts": 1,
        "error_type": "E", "error_message": "m", "first_failure_at": time.time(), "dead_lettered_at": time.time(),
    }  # fmt: skip
    return te.DeadLetter(**{**fields, **kw})


@pytest.fixture
def dlq(tmp_path: Path) -> Iterator[Any]:
    q = te.DeadLetterQueue(tmp_path / "dlq", fsync="never")
    q.put([_letter()])
    yield q
    q.close()


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"fsync": "sometimes"}, "fsync"),
        ({"segment_bytes": 0}, "segment_bytes"),
        ({"segment_bytes": -1}, "segment_bytes"),
        ({"retention_s": math.nan}, "retention_s"),
        ({"app_name": "a/b"}, "app_name"),
    ],
)
def test_dead_letter_queue_options(tmp_path: Path, kwargs: dict[str, Any], word: str) -> None:
    refused(lambda: te.DeadLetterQueue(tmp_path / "q", **kwargs), word)


def test_dead_letter_queue_missing_is_log_not_found(tmp_path: Path) -> None:
    q = te.DeadLetterQueue(tmp_path / "nothing-here")
    refused(lambda: q.stats(), "no dead-letter queue")
    q.close()


def test_dead_letter_get_unknown_id_is_key_error(dlq: Any) -> None:
    """Documented: `get` raises KeyError for an id it does not hold (the mapping convention)."""
    with pytest.raises(KeyError):
        dlq.get(10**6)
    with pytest.raises(KeyError):
        dlq.get(-1)


@pytest.mark.parametrize(
    ("call", "word"),
    [
        (lambda q: q.get("x"), "id"),
        (lambda q: q.put([1]), "deadletter"),
        (lambda q: q.stats(window_s=0), "window_s"),
        (lambda q: q.stats(window_s=-1), "window_s"),
        (lambda q: list(q.entries(filter=te.DeadLetterFilter(since="x"))), "since"),
        (lambda q: q.purge("x"), "before"),
    ],
    ids=["get-str", "put-int", "stats-window-0", "stats-window-neg", "filter-since-str", "purge-str"],
)  # fmt: skip
def test_dead_letter_queue_calls(dlq: Any, call: Callable[[Any], object], word: str) -> None:
    refused(lambda: call(dlq), word, type_error=True)


async def test_dead_letter_redrive_options(dlq: Any) -> None:
    async def sink(letters: Any) -> None:
        return None

    for kwargs, word in (({"rate": 0}, "rate"), ({"rate": -1}, "rate"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(TreasureEngineError, match=word):
            await dlq.redrive(sink, **kwargs)


def test_dead_letter_filter_source() -> None:
    refused(lambda: te.DeadLetterFilter(source="nope"), "source")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"fsync": "x"}, "fsync"),
        ({"segment_bytes": 0}, "segment_bytes"),
        ({"max_frame_bytes": 0}, "max_frame_bytes"),
        ({"max_frame_bytes": -1}, "max_frame_bytes"),
        ({"fsync_interval_ms": -1}, "fsync_interval_ms"),
    ],
)
def test_segment_log_options(tmp_path: Path, kwargs: dict[str, Any], word: str) -> None:
    refused(lambda: te.SegmentLog(str(tmp_path / "log"), **kwargs), word)


def test_segment_log_paths(tmp_path: Path) -> None:
    refused(lambda: te.SegmentLog(""), "segment log")
    refused(lambda: te.LogReader(str(tmp_path / "absent")), "does not exist")
    refused(lambda: te.LogReader(str(tmp_path), -1), "start")


@pytest.fixture
def segment_log(tmp_path: Path) -> Iterator[Any]:
    log = te.SegmentLog(str(tmp_path / "log"), fsync="never", max_frame_bytes=16)
    log.append(b"x")
    yield log
    log.close()


@pytest.mark.parametrize(
    ("call", "word", "type_error"),
    [
        (lambda log: log.append(b"x" * 17), "max_frame_bytes", False),
        (lambda log: log.append("x"), "payload", True),
        (lambda log: log.append_many([1]), "payload", True),
        (lambda log: log.cursor(""), "cursor", False),
        (lambda log: log.set_cursor("../x", 0), "cursor", False),
        (lambda log: log.set_cursor("c", -1), "position", False),
        (lambda log: log.delete_before(-1), "position", False),
    ],
    ids=["too-large", "str", "many-int", "cursor-empty", "cursor-dotdot", "set-cursor-neg", "delete-before-neg"],
)  # fmt: skip
def test_segment_log_calls(segment_log: Any, call: Callable[[Any], object], word: str, type_error: bool) -> None:
    refused(lambda: call(segment_log), word, type_error=type_error)


def test_log_reader_read_negative(segment_log: Any, tmp_path: Path) -> None:
    reader = te.LogReader(str(tmp_path / "log"))
    refused(lambda: reader.read(-1), "max")


def test_closed_segment_log_is_a_log_error(tmp_path: Path) -> None:
    log = te.SegmentLog(str(tmp_path / "log"))
    refused(lambda: te.SegmentLog(str(tmp_path / "log")), "locked")
    log.close()
    refused(lambda: log.append(b"x"), "closed")


# --- the producer's submit -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def producer(kinesalite: Kinesalite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A started producer (BackgroundProducer: its own loop thread) on kinesalite."""
    create_stream(kinesalite.endpoint_url, "bad-input", 1)
    config = te.ProducerConfig(
        stream="bad-input",
        endpoint_url=kinesalite.endpoint_url,
        region="us-east-1",
        state_dir=str(tmp_path_factory.mktemp("producer")),
    )
    p = te.Producer.background(config)
    try:
        yield p
    finally:
        p.close(timeout=10)


SUBMIT_CASES = [
    pytest.param(b"x", "", None, "partition key", False, id="key-empty"),
    pytest.param(b"x", "k" * 257, None, "257 characters", False, id="key-257"),
    pytest.param(b"x", "\u00e9" * 257, None, "257 characters", False, id="key-257-multibyte"),
    pytest.param(b"x", "\ud800", None, "partition key", False, id="key-lone-surrogate"),
    pytest.param(b"x", None, None, "partition_key", True, id="key-none"),
    pytest.param(b"x", b"k", None, "partition_key", True, id="key-bytes"),
    pytest.param("x", "k", None, "data", True, id="data-str"),
    pytest.param(None, "k", None, "data", True, id="data-none"),
    pytest.param(b"x" * (1024 * 1024), "k", None, "max_record_bytes", False, id="data-over-1mib"),
    pytest.param(b"x", "k", "", "explicit hash key", False, id="ehk-empty"),
    pytest.param(b"x", "k", "-1", "explicit hash key", False, id="ehk-negative"),
    pytest.param(b"x", "k", str(2**128), "explicit hash key", False, id="ehk-2**128"),
    pytest.param(b"x", "k", "0x10", "explicit hash key", False, id="ehk-hex"),
    pytest.param(b"x", "k", " 1", "explicit hash key", False, id="ehk-space"),
    pytest.param(b"x", "k", "0" * 40, "explicit hash key", False, id="ehk-40-digits"),
    pytest.param(b"x", "k", -1, "explicit", True, id="ehk-int-negative"),
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize(("data", "key", "ehk", "word", "type_error"), SUBMIT_CASES)
def test_submit(producer: Any, data: Any, key: Any, ehk: Any, word: str, type_error: bool) -> None:
    refused(lambda: producer.submit(data, key, ehk), word, type_error=type_error)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("events", "word", "type_error"),
    [
        (5, "submit_many", True),
        ([(b"x",)], "submit_many", True),
        ([(b"x", "k", None, 1)], "submit_many", True),
        ([None], "submit_many", True),
        ([{"data": b"x", "partition_key": "k"}], "submit_many", True),
        ([(b"x", "k"), (b"y", "")], "partition key", False),
        ([(b"x", "k", "abc")], "explicit hash key", False),
    ],
    ids=["not-iterable", "short-tuple", "long-tuple", "none", "dict", "bad-key-second", "bad-ehk"],
)  # fmt: skip
def test_submit_many(producer: Any, events: Any, word: str, type_error: bool) -> None:
    refused(lambda: producer.submit_many(events), word, type_error=type_error)


@pytest.mark.integration
def test_flush_timeout(producer: Any) -> None:
    refused(lambda: producer.flush(timeout="x"), "timeout", type_error=True)
    refused(lambda: producer.flush(timeout=-1), "timeout")


def test_submit_before_start_and_after_close() -> None:
    p = te.Producer(te.ProducerConfig(stream="s"))
    refused(lambda: p.submit(b"x", "k"), "not running")


# --- the command line ----------------------------------------------------------------------------------------------


def _main() -> Callable[[list[str]], int]:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "treasure-engine"]
    main: Callable[[list[str]], int] = ep.load()
    return main


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The console script's `main(argv)` in this process: its exit code (argparse's SystemExit included), stderr."""
    try:
        code = _main()(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    return code, capsys.readouterr().err


def assert_usage_error(code: int, err: str, *words: str) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for w in words:
        assert w in errors[0], (w, errors[0])


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "producer.toml").write_text('[producer]\nstream = "s"\nendpoint_url = "http://127.0.0.1:1"\n')
    (tmp_path / "consumer.toml").write_text('[consumer]\nstream = "s"\napplication = "app"\n')
    (tmp_path / "bad.toml").write_text("[producer\n")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")
    (tmp_path / "empty-dir").mkdir()
    return tmp_path


CLI_CASES = [
    ([], "required"),
    (["bogus"], "invalid choice"),
    (["demo", "--duration", "1"], "--duration"),
    (["demo", "--rate", "x"], "--rate"),
    (["demo", "--rate", "0"], "--rate"),
    (["demo", "--port", "70000"], "--port"),
    (["demo", "--shards", "0"], "--shards"),
    (["run"], "--config"),
    (["run", "--config", "missing.toml"], "missing.toml"),
    (["run", "--config", "bad.toml"], "bad.toml"),
    (["run", "--config", "binary.toml"], "binary.toml"),
    (["run", "--config", "empty-dir"], "empty-dir"),
    (["run", "--config", "producer.toml", "--input", "missing.jsonl"], "missing.jsonl"),
    (["run", "--config", "consumer.toml", "--handler", "nocolon"], "--handler"),
    (["run", "--config", "consumer.toml", "--handler", ":"], "--handler"),
    (["run", "--config", "consumer.toml", "--handler", "json:dumps"], "async"),
    (["run", "--config", "consumer.toml", "--handler", "no_such_module_xyz:f"], "no_such_module_xyz"),
    (["consume", "--config", "missing.toml", "--handler", "m:f"], "missing.toml"),
    (["consume", "--config", "consumer.toml", "--handler", "nocolon"], "--handler"),
    (["consume", "--config", "producer.toml", "--handler", "m:f"], "producer"),
    (["dlq"], "verb"),
    (["dlq", "list"], "path"),
    (["dlq", "list", "missing"], "missing"),
    (["dlq", "list", "empty-dir", "--limit", "-1"], "--limit"),
    (["dlq", "list", "empty-dir", "--limit", "x"], "--limit"),
    (["dlq", "list", "empty-dir", "--filter", "bogus"], "--filter"),
    (["dlq", "list", "empty-dir", "--filter", "since=garbage"], "garbage"),
    (["dlq", "list", "empty-dir", "--filter", "source=elsewhere"], "source"),
    (["dlq", "show", "empty-dir", "x"], "id"),
    (["dlq", "show", "empty-dir", "-1"], "-1"),
    (["dlq", "show", "empty-dir", str(10**25)], "no entry"),
    (["dlq", "stats", "missing"], "missing"),
    (["dlq", "verify", "missing"], "missing"),
    (["dlq", "purge", "empty-dir", "--before", "garbage"], "garbage"),
    (["dlq", "purge", "empty-dir"], "--before"),
    (["dlq", "redrive", "empty-dir", "--stream", "s", "--rate", "-1"], "--rate"),
    (["dlq", "redrive", "empty-dir", "--stream", "", "--endpoint-url", "http://127.0.0.1:1"], "stream"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "word"), CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_bad_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, files: Path, argv: list[str], word: str
) -> None:
    monkeypatch.chdir(files)
    code, err = cli(capsys, *argv)
    assert_usage_error(code, err, word)


@pytest.mark.parametrize("duration", ["nan", "inf"])
def test_cli_demo_duration_not_finite(duration: str, tmp_path: Path) -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "treasure_engine", "demo", "--duration", duration, "--port", "0", "--json"],
            capture_output=True, text=True, timeout=4, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"--duration {duration}: still running after 4 s", pytrace=False)
    assert_usage_error(proc.returncode, proc.stderr, "--duration")


def test_cli_as_a_process_exits_2_with_one_line(files: Path) -> None:
    """The same door as a process (`python -m treasure_engine`): exit status 2, one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "treasure_engine", "run", "--config", "bad.toml"],
        capture_output=True, text=True, timeout=60, cwd=files, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert_usage_error(proc.returncode, proc.stderr, "bad.toml")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
