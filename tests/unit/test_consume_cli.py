"""`treasure-engine consume`: bad input is one line on stderr and exit code 2; the config checks name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from treasure_engine import ConfigError, ConsumerConfig
from treasure_engine.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "consumer.toml"
    path.write_text(text)
    return str(path)


GOOD = 'stream = "s"\napplication = "app"\n'


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("nomodule_xyz:handle", "cannot import handler module"),
        ("tests.support.handlers:missing", "has no attribute"),
        ("tests.support.handlers:not_async", "must be an async function"),
        ("no-colon", "expected module:function"),
    ],
)
def test_bad_handler(capsys: pytest.CaptureFixture[str], tmp_path: Path, handler: str, message: str) -> None:
    code, err = run(capsys, "consume", "--config", write(tmp_path, GOOD), "--handler", handler)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stream = \n", "cannot read config"),
        ('stream = "s"\n', "application"),
        (GOOD + "parallelism = 0\n", "parallelism"),
        (GOOD + "colour = 1\n", "colour"),
        ('[consumer]\nstream = "s"\napplication = "app"\nbatch_size = "ten"\n', "batch_size"),
    ],
)
def test_bad_config(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str) -> None:
    code, err = run(
        capsys, "consume", "--config", write(tmp_path, text), "--handler", "tests.support.handlers:append_to_file"
    )
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, "consume", "--config", str(tmp_path / "nope.toml"), "--handler", "x:y")
    assert code == 2
    assert "not found" in err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("application", "a b"),
        ("batch_size", 0),
        ("batch_size", 10_001),
        ("max_attempts", 0),
        ("lease_duration_s", 0.5),
        ("get_records_limit", 20_000),
        ("backoff_max_s", 0.01),
        ("start_timestamp", 5.0),
        ("out_of_range_aggregates", "drop"),
        ("out_of_range_aggregates", "SKIP"),
        ("out_of_range_aggregates", None),
    ],
)
def test_config_out_of_range_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ConsumerConfig(**{"stream": "s", "application": "app", field: value})  # type: ignore[arg-type]


def test_at_timestamp_needs_a_timestamp() -> None:
    with pytest.raises(ConfigError, match="start_timestamp"):
        ConsumerConfig(stream="s", application="app", start_at="AT_TIMESTAMP")
    assert ConsumerConfig(stream="s", application="app", start_at="AT_TIMESTAMP", start_timestamp=1.0).start_timestamp


def test_out_of_range_aggregates_is_deliver_unless_told() -> None:
    assert ConsumerConfig(stream="s", application="app").out_of_range_aggregates == "deliver"
    assert (
        ConsumerConfig(stream="s", application="app", out_of_range_aggregates="skip").out_of_range_aggregates == "skip"
    )
    data = {"stream": "s", "application": "app", "out_of_range_aggregates": "skip"}
    assert ConsumerConfig.from_dict(data).out_of_range_aggregates == "skip"
    with pytest.raises(ConfigError, match="out_of_range_aggregates"):
        ConsumerConfig.from_dict({**data, "out_of_range_aggregates": "drop"})


@pytest.mark.parametrize("command", ["consume", "run"])
def test_the_handler_module_is_found_in_the_current_directory_and_in_app_dir(tmp_path: Path, command: str) -> None:
    """`treasure-engine consume --handler rewards:handle`, as the README writes it, with rewards.py in the current
    directory: the console script does not put that directory on the import path, so the CLI does (and
    `--app-dir` names another). A non-async `handle` proves the module was imported (the next check refuses it)."""
    script = Path(sys.executable).with_name("treasure-engine")
    app = tmp_path / "app"
    app.mkdir()
    (app / "rewards_mod_xyz.py").write_text("def handle(records):\n    return None\n")
    config = tmp_path / "engine.toml"
    config.write_text('[consumer]\nstream = "s"\napplication = "app"\n' if command == "run" else GOOD)
    argv = [str(script), command, "--config", str(config), "--handler", "rewards_mod_xyz:handle"]

    def cli(*extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv, *extra], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)

    for proc in (cli(cwd=app), cli("--app-dir", str(app), cwd=tmp_path)):
        assert proc.returncode == 2, proc.stderr
        assert "must be an async function" in proc.stderr, proc.stderr
    missing = cli(cwd=tmp_path)  # not in the current directory, nor on the path
    assert missing.returncode == 2
    assert "cannot import handler module 'rewards_mod_xyz'" in missing.stderr
    bad_dir = cli("--app-dir", str(tmp_path / "nope"), cwd=tmp_path)
    assert bad_dir.returncode == 2
    assert "is not a directory" in bad_dir.stderr
    assert len(bad_dir.stderr.strip().splitlines()) == 1
