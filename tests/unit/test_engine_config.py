"""EngineConfig: TOML sections, environment overrides, and errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from treasure_engine import ConfigError, Engine, EngineConfig

TOML = """
shutdown_timeout_s = 5.0
[producer]
stream = "events"
linger_ms = 50.0
[consumer]
stream = "events"
application = "rewards"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "engine.toml"
    path.write_text(text)
    return path


def test_sections_become_configs(tmp_path: Path) -> None:
    config = EngineConfig.from_toml(write(tmp_path, TOML), env={})
    assert config.producer is not None
    assert config.producer.linger_ms == 50.0
    assert config.consumer is not None
    assert config.consumer.application == "rewards"
    assert config.shutdown_timeout_s == 5.0


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    env = {
        "TREASURE_ENGINE__PRODUCER__LINGER_MS": "20",
        "TREASURE_ENGINE__PRODUCER__AGGREGATE": "false",
        "TREASURE_ENGINE__CONSUMER__APPLICATION": "other-app",
        "TREASURE_ENGINE__CONSUMER__PARALLELISM": "4",
        "TREASURE_ENGINE__SHUTDOWN_TIMEOUT_S": "3.5",
        "UNRELATED": "1",
    }
    config = EngineConfig.from_toml(write(tmp_path, TOML), env=env)
    assert config.producer is not None
    assert config.producer.linger_ms == 20.0
    assert config.producer.aggregate is False
    assert config.consumer is not None
    assert config.consumer.application == "other-app"
    assert config.consumer.parallelism == 4
    assert config.shutdown_timeout_s == 3.5


def test_consumer_out_of_range_aggregates_from_toml_and_environment(tmp_path: Path) -> None:
    config = EngineConfig.from_toml(write(tmp_path, TOML + 'out_of_range_aggregates = "skip"\n'), env={})
    assert config.consumer is not None
    assert config.consumer.out_of_range_aggregates == "skip"
    config = EngineConfig.from_toml(write(tmp_path, TOML), env={})
    assert config.consumer is not None
    assert config.consumer.out_of_range_aggregates == "deliver"
    env = {"TREASURE_ENGINE__CONSUMER__OUT_OF_RANGE_AGGREGATES": "skip"}
    config = EngineConfig.from_toml(write(tmp_path, TOML), env=env)
    assert config.consumer is not None
    assert config.consumer.out_of_range_aggregates == "skip"
    with pytest.raises(ConfigError, match="out_of_range_aggregates"):
        EngineConfig.from_toml(write(tmp_path, TOML + 'out_of_range_aggregates = "drop"\n'), env={})


def test_environment_can_add_a_section(tmp_path: Path) -> None:
    env = {"TREASURE_ENGINE__PRODUCER__STREAM": "from-env"}
    config = EngineConfig.from_toml(write(tmp_path, "shutdown_timeout_s = 2.0\n"), env=env)
    assert config.producer is not None
    assert config.producer.stream == "from-env"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[producer]\nstream = 's'\nlinger_ms = -1.0\n", {}, "linger_ms"),
        ("[producer]\nstream = 's'\nbogus = 1\n", {}, "bogus"),
        ("[producer]\nstream = 's'\n", {"TREASURE_ENGINE__PRODUCER__LINGER_MS": "slow"}, "linger_ms"),
        ("[producer]\nstream = 's'\n", {"TREASURE_ENGINE__PRODUCER": "x"}, "producer"),
        ("[producer]\nstream = 's'\n", {"TREASURE_ENGINE__STREAM__X": "1"}, "stream"),
        ("x = [\n", {}, "not valid TOML"),
        ("", {}, "[producer], [consumer] or both"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EngineConfig.from_toml(write(tmp_path, text), env=env)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        EngineConfig.from_toml(tmp_path / "absent.toml")


def test_consumer_without_handler_is_refused(tmp_path: Path) -> None:
    config = EngineConfig.from_toml(write(tmp_path, TOML), env={})
    with pytest.raises(ConfigError, match="handler"):
        Engine(config)
