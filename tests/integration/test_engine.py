"""The main job end to end: `treasure-engine demo` and `treasure-engine run`, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.emulators import Dynalite, Kinesalite
from tests.support.kinesis_reader import read_all

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "treasure_engine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )


@pytest.mark.parametrize("backend", ["embedded", "kinesalite"])
def test_demo_balances_the_books(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    args = ["demo", "--json", "--duration", "20", "--port", "0", "--report", str(tmp_path / "report.html")]
    if backend == "kinesalite":
        kinesalite: Kinesalite = request.getfixturevalue("kinesalite")
        args += ["--endpoint-url", kinesalite.endpoint_url]
    else:
        request.getfixturevalue("aws_credentials")
    started = time.monotonic()
    done = cli(*args)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    books = json.loads(done.stdout)
    assert books["lost"] == 0
    assert books["produced"] > 10_000
    assert books["delivered_to_rewards_unique"] + books["dead_lettered"] == books["produced"]
    assert books["dead_lettered"] == books["malformed_produced"] > 0
    assert books["refused_by_rewards_during_outage"] > 0
    assert "rewards_down" in books["alerts_fired"], books["alert_events"]
    assert took < 60, f"the demo took {took:.0f} s"
    assert "<svg" in (tmp_path / "report.html").read_text()


def test_demo_bad_arguments_exit_2() -> None:
    done = cli("demo", "--duration", "1")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "--duration" in done.stderr


def _engine_toml(tmp_path: Path, stream: str, app: str, kinesis: str, dynamodb: str) -> Path:
    path = tmp_path / "engine.toml"
    path.write_text(
        f"""
shutdown_timeout_s = 8.0

[producer]
stream = "{stream}"
endpoint_url = "{kinesis}"
region = "us-east-1"
linger_ms = 10.0
state_dir = "{tmp_path / "state"}"
shard_records_per_s = 1e9
shard_bytes_per_s = 1e9

[consumer]
stream = "{stream}"
application = "{app}"
endpoint_url = "{kinesis}"
dynamodb_endpoint_url = "{dynamodb}"
region = "us-east-1"
idle_poll_ms = 100.0
lease_duration_s = 3.0
state_dir = "{tmp_path / "state"}"

[monitor]
port = 0
"""
    )
    return path


def _handled(path: Path) -> Counter[int]:
    if not path.exists():
        return Counter()
    return Counter(
        int(json.loads(line)["id"]) for line in path.read_bytes().splitlines() if line.strip().endswith(b"}")
    )


def test_run_stops_on_sigterm_mid_burst_and_resumes(
    kinesalite: Kinesalite, dynalite: Dynalite, stream_factory: Callable[..., str], tmp_path: Path
) -> None:
    stream = stream_factory(kinesalite.endpoint_url, 2)
    app = f"run-{os.getpid()}-{int(time.time())}"
    config = _engine_toml(tmp_path, stream, app, kinesalite.endpoint_url, dynalite.endpoint_url)
    n = 60_000
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"id": i, "hunter": f"h{i % 500}"}) + "\n" for i in range(n)))
    out = tmp_path / "handled.out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TREASURE_TEST_OUT": str(out)}
    handler = "tests.support.handlers:append_to_file"
    argv = [sys.executable, "-m", "treasure_engine", "run", "--config", str(config),
            "--handler", handler, "--input", str(events), "--key-field", "hunter"]  # fmt: skip

    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(_handled(out)) < 2_000:  # mid-burst: the consumer is handling
            assert time.monotonic() < deadline, "nothing handled"
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stdout, stderr = first.communicate(timeout=30)
        stopped_in = time.monotonic() - sent
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stderr[-2000:]
    assert stopped_in < 10, f"stopped in {stopped_in:.1f} s"
    print(f"first run stopped {stopped_in:.2f} s after SIGTERM")

    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while set(_handled(out)) != set(range(n)):
            assert time.monotonic() < deadline, f"{n - len(set(_handled(out)))} ids never handled"
            assert second.poll() is None, second.communicate()
            time.sleep(0.1)
        second.send_signal(signal.SIGTERM)
        stdout2, stderr2 = second.communicate(timeout=30)
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()
    assert second.returncode == 0, stderr2[-2000:]
    handled = _handled(out)
    assert set(handled) == set(range(n))
    # The restart went on from the checkpoints: at most one round per shard was handled twice.
    duplicates = sum(c - 1 for c in handled.values())
    assert duplicates <= 2 * 100, duplicates
    # And the input went on after the last line submitted: every line is in the stream exactly once.
    in_stream = Counter(json.loads(r["data"])["id"] for r in read_all(kinesalite.endpoint_url, stream))
    assert in_stream == Counter(range(n))
    assert "submitted" in stdout + stdout2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[producer]\nstream = \n", "not valid TOML"),
        ("[producer]\nstream = 's'\ncolour = 1\n", "colour"),
        ("[nothing]\n", "nothing"),
        ("shutdown_timeout_s = 1.0\n", "configure [producer], [consumer] or both"),
        ("[consumer]\nstream = 's'\napplication = 'app'\n", "--handler"),
        ("handler = 'nomodule_xyz:f'\n[consumer]\nstream = 's'\napplication = 'app'\n", "cannot import"),
    ],
)
def test_run_bad_config_is_one_line_and_exit_2(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(text)
    done = cli("run", "--config", str(path), timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_run_unreachable_endpoint_is_one_line_and_exit_2(tmp_path: Path, aws_credentials: dict[str, str]) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(
        "[producer]\nstream = 's'\nendpoint_url = 'http://127.0.0.1:9'\nregion = 'us-east-1'\nrequest_timeout_s = 2.0\n"
    )
    done = cli("run", "--config", str(path), timeout=90)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
