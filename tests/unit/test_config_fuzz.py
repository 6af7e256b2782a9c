"""Hypothesis fuzzes the config loader and the command line's argument parsing (issue 19, fuzzing).

- Every config struct's `from_dict`, `EngineConfig.from_dict` with environment overrides, and
  `EngineConfig.from_toml` on generated files either build a config or raise `ConfigError`; nothing else.
- Direct construction of the config structs, one field at a time, builds one or raises a `TreasureEngineError`
  naming the field.
- `treasure-engine` with generated arguments (commands that fail fast and offline: `run`/`consume` with configs
  that do not load or handlers that do not import, `dlq` on missing or empty queues) exits 0 or 2, and on 2 says
  what is wrong in one `error:` line, with no traceback.

Only `treasure_engine`'s public names are imported; the CLI is the console script's entry point.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import treasure_engine as te
from treasure_engine import ConfigError, TreasureEngineError

# Plausible values (so that some generated configs are valid and the range checks run) and odd ones.
PLAUSIBLE = st.sampled_from(
    [0, 1, 2, 3, 5, 8, 64, 500, 1024, 51_200, 65_536, 1 << 20, 5 << 20, 10 << 20, 1 << 30, 0.0, 0.25, 0.5, 1.0,
     10.0, 300.0, -1, -0.5, "s", "app", "reject", "block", "spill", "memory", "wal", "always", "interval", "never",
     "deliver", "skip", "TRIM_HORIZON", "LATEST", "us-east-1", "http://127.0.0.1:4567", "", True, False, None]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS | PLAUSIBLE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)

CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "ProducerConfig": (te.ProducerConfig, {"stream": "s"}),
    "ConsumerConfig": (te.ConsumerConfig, {"stream": "s", "application": "app"}),
    "MonitorConfig": (te.MonitorConfig, {}),
    "BreakerConfig": (te.BreakerConfig, {}),
    "DownstreamConfig": (te.DownstreamConfig, {}),
}


def section(cls: Any, required: dict[str, Any], *, skip: frozenset[str] = frozenset()) -> st.SearchStrategy[Any]:
    """The required fields (mostly kept), plus one other field (or an unknown one) fuzzed, now and then two: few
    enough that a field's own check is reached before another field's fails."""
    fields = [f for f in cls.__struct_fields__ if f not in skip and f not in required] + ["bogus_field"]
    base = st.fixed_dictionaries({k: st.just(v) | st.just(v) | st.just(v) | VALUES for k, v in required.items()})
    one = st.builds(lambda f, v: {f: v}, st.sampled_from(fields), VALUES)
    extra = one | one | one | st.builds(lambda a, b: {**a, **b}, one, one)
    return st.builds(lambda b, e: {**b, **e}, base, extra)


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", [n for n in CONFIGS if hasattr(CONFIGS[n][0], "from_dict")])
@FUZZ
@given(data=st.data())
def test_from_dict_builds_or_raises_config_error(name: str, data: st.DataObject) -> None:
    cls, required = CONFIGS[name]
    d = data.draw(section(cls, required))
    try:
        config = cls.from_dict(d)
    except ConfigError:
        return
    assert isinstance(config, cls)


def _fields() -> list[Any]:
    return [
        pytest.param(name, field, id=f"{name}.{field}")
        for name, (cls, _) in CONFIGS.items()
        for field in cls.__struct_fields__
    ]


@pytest.mark.parametrize(("name", "field"), _fields())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
@example(value=5)  # always tried: a non-iterable once broke alert_labels, retry_statuses, retry_methods (F1/F2)
def test_each_field_builds_or_raises_a_typed_error(name: str, field: str, value: Any) -> None:
    """One field at a time, so that its own check is reached: constructed directly and through `from_dict`."""
    cls, required = CONFIGS[name]
    data = {**required, field: value}
    error: TreasureEngineError | None = None
    try:
        config = cls(**data)
    except TreasureEngineError as e:
        error = e
    if error is None:
        assert isinstance(config, cls)
    else:
        assert field in str(error) or field in required, error
    if hasattr(cls, "from_dict"):
        try:
            config = cls.from_dict(data)
        except ConfigError:
            return
        assert isinstance(config, cls)


ENV_KEYS = st.sampled_from(
    ["TREASURE_ENGINE__PRODUCER__LINGER_MS", "TREASURE_ENGINE__PRODUCER__STREAM", "TREASURE_ENGINE__CONSUMER__STREAM",
     "TREASURE_ENGINE__CONSUMER__APPLICATION", "TREASURE_ENGINE__MONITOR__PORT", "TREASURE_ENGINE__PRODUCER",
     "TREASURE_ENGINE__SHUTDOWN_TIMEOUT_S", "TREASURE_ENGINE__", "TREASURE_ENGINE____X", "TREASURE_ENGINE__A__B__C",
     "TREASURE_ENGINE__HANDLER", "OTHER_VARIABLE"]
)  # fmt: skip
ENGINE = st.fixed_dictionaries(
    {},
    optional={
        "producer": section(te.ProducerConfig, {"stream": "s"}) | VALUES,
        "consumer": section(te.ConsumerConfig, {"stream": "s", "application": "app"}) | VALUES,
        "monitor": section(te.MonitorConfig, {}) | VALUES,
        "handler": VALUES,
        "shutdown_timeout_s": VALUES,
        "bogus_section": VALUES,
    },
)


@FUZZ
@given(data=ENGINE, env=st.dictionaries(ENV_KEYS, st.text(max_size=16), max_size=3))
def test_engine_config_from_dict_with_environment(data: dict[str, Any], env: dict[str, str]) -> None:
    try:
        config = te.EngineConfig.from_dict(data, env=env)
    except ConfigError:
        return
    assert isinstance(config, te.EngineConfig)


def toml_value(v: Any) -> str | None:
    """`v` as a TOML value, None where TOML has none (null, non-string keys)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v) if -(2**63) <= v < 2**63 else None
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string, but for lone surrogates
    if isinstance(v, list):
        items = [toml_value(x) for x in v]
        return None if None in items else "[" + ", ".join(i for i in items if i is not None) + "]"
    if isinstance(v, dict):
        pairs = [(json.dumps(k), toml_value(x)) for k, x in v.items()]
        return None if any(x is None for _, x in pairs) else "{" + ", ".join(f"{k} = {x}" for k, x in pairs) + "}"
    return None


def toml_text(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in data.items():
        if not isinstance(value, dict) and (rendered := toml_value(value)) is not None:
            lines.insert(0, f"{json.dumps(key)} = {rendered}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines.extend(f"{json.dumps(k)} = {r}" for k, v in value.items() if (r := toml_value(v)) is not None)
    return "\n".join(lines) + "\n"


@FUZZ
@given(
    content=ENGINE.map(toml_text) | st.text(max_size=200) | st.binary(max_size=64).map(lambda b: b.decode("latin-1"))
)
def test_engine_config_from_toml_builds_or_raises_config_error(content: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "engine.toml"
        try:
            path.write_text(content, encoding="utf-8")
        except UnicodeEncodeError:  # a lone surrogate: write the bytes as Python would not
            path.write_bytes(content.encode("utf-8", "surrogatepass"))
        try:
            config = te.EngineConfig.from_toml(path, env={})
        except ConfigError:
            return
        assert isinstance(config, te.EngineConfig)


# --- the command line ----------------------------------------------------------------------------------------------


def _main() -> Callable[[list[str]], int]:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "treasure-engine"]
    main: Callable[[list[str]], int] = ep.load()
    return main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-fuzz")
    (d / "consumer.toml").write_text('[consumer]\nstream = "s"\napplication = "app"\n')
    (d / "bad.toml").write_text("[consumer\n")
    (d / "binary.toml").write_bytes(b"\xff\xfe")
    (d / "empty-dir").mkdir()
    (d / "file").write_text("not a queue\n")
    return d


WORD = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00:"), max_size=10)
CONFIG_PATH = st.sampled_from(["missing.toml", "bad.toml", "binary.toml", "empty-dir", "consumer.toml"]) | WORD
HANDLER = st.sampled_from(["nocolon", ":", "m:", ":f", "no_such_module_xyz:f", "json:dumps", "json:nope"]) | WORD
QUEUE = st.sampled_from(["missing", "empty-dir", "file", "consumer.toml"]) | WORD
NOISE = st.lists(
    st.sampled_from(["--json", "--all", "--help", "--bogus", "-x", "--limit", "--filter", "--", "-1", "nan"]) | WORD,
    max_size=3,
)
TIME = st.sampled_from(["7d", "30m", "0", "2026-01-01T00:00:00Z", "nan", "-5d", "soon"]) | WORD
FILTER = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["stream", "source", "since", "before", "nope"]), WORD)


def argv_strategy() -> st.SearchStrategy[list[str]]:
    run = st.tuples(
        st.just(["run", "--config"]), CONFIG_PATH.map(lambda p: [p]), HANDLER.map(lambda h: ["--handler", h])
    )
    consume = st.tuples(
        st.just(["consume", "--config"]), CONFIG_PATH.map(lambda p: [p]), HANDLER.map(lambda h: ["--handler", h])
    )
    listing = st.tuples(
        st.just(["dlq", "list"]),
        QUEUE.map(lambda q: [q]),
        st.lists(FILTER, max_size=2).map(lambda fs: [x for f in fs for x in ("--filter", f)]),
    )
    show = st.tuples(
        st.just(["dlq", "show"]), QUEUE.map(lambda q: [q]), (st.integers().map(str) | WORD).map(lambda i: [i])
    )
    simple = st.tuples(st.sampled_from([["dlq", "stats"], ["dlq", "verify"]]), QUEUE.map(lambda q: [q]), st.just([]))
    purge = st.tuples(st.just(["dlq", "purge"]), QUEUE.map(lambda q: [q]), TIME.map(lambda t: ["--before", t]))
    parts = run | consume | listing | show | simple | purge
    return st.tuples(parts, NOISE).map(lambda t: [x for part in t[0] for x in part] + t[1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=argv_strategy())
def test_cli_exits_0_or_2_with_one_error_line(workdir: Path, argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.chdir(workdir), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = _main()(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    text = err.getvalue()
    assert code in (0, 2), (argv, code, text)
    assert "Traceback" not in text, (argv, text)
    if code == 2:
        assert sum("error:" in line for line in text.splitlines()) == 1, (argv, text)
