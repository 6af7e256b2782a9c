"""`durability="wal"`: a producer process killed with SIGKILL mid-burst, three times, restarted on the same state
directory, delivers every event for which `submit` had returned (ids counted in kinesalite).

The endpoint is kinesalite behind the fault proxy with added latency, so requests are in flight at each kill.

And a WAL on a full disk: segments are allocated up front, so the submit whose segment finds no room raises
LogError (an OSError with the errno), never a SIGBUS in the submitting thread.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.support.emulators import Kinesalite
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.kinesis_reader import read_all

from treasure_engine import ConfigError, ProducerConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PER_RUN = 20_000
KILL_AFTER = (3_000, 9_000, 15_000)


def _child(endpoint: str, stream: str, state_dir: Path, first: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.wal_child", endpoint, stream, str(state_dir), str(first), str(count)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_sigkill_three_times_loses_no_returned_submit(
    fault_proxy: ThreadedFaultProxy, kinesalite: Kinesalite, kinesalite_stream: str, tmp_path: Path
) -> None:
    fault_proxy.set(latency=0.05)
    rng = random.Random(7)
    returned: list[int] = []
    per_run: list[int] = []  # ids each killed run reported as returned
    first = 0
    for kill_after in KILL_AFTER:
        before = len(returned)
        child = _child(fault_proxy.endpoint_url, kinesalite_stream, tmp_path, first, PER_RUN)
        assert child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
            for _ in range(kill_after):
                line = child.stdout.readline()
                assert line, "the child ended early"
                returned.append(int(line))
            # Let it run on (submitting, sending, moving its WAL cursor) for a moment, then kill it.
            time.sleep(rng.uniform(0.02, 0.15))
            os.kill(child.pid, signal.SIGKILL)
            # Ids it printed before the kill landed count as returned too.
            returned.extend(int(x) for x in child.stdout.read().split() if x.isdigit())
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
            if child.stderr is not None:
                child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        per_run.append(len(returned) - before)
        first += PER_RUN
    assert list((tmp_path / "wal").iterdir()), "the WAL is there to replay"
    # A last, clean run replays what the killed ones left and flushes.
    last = _child(fault_proxy.endpoint_url, kinesalite_stream, tmp_path, first, 0)
    out, err = last.communicate(timeout=120)
    assert last.returncode == 0, err
    assert out.split()[-1] == "done"
    assert int(out.split()[-2]) > 0, "the last run replayed what the third kill left"

    delivered = Counter(int(r["data"].split(b":", 1)[0]) for r in read_all(kinesalite.endpoint_url, kinesalite_stream))
    missing = set(returned) - set(delivered)
    assert not missing, f"{len(missing)} event(s) whose submit returned were lost, e.g. {sorted(missing)[:10]}"
    # Each kill landed mid-burst: the run had not returned from every submit yet.
    assert all(k <= n < PER_RUN for k, n in zip(KILL_AFTER, per_run, strict=True)), per_run
    # At-least-once, and no more: an event is sent by the process that took it and replayed at most once by
    # each later one (a cursor that went backwards, or a replay repeated within a process, would break this).
    assert max(delivered.values()) <= 1 + len(KILL_AFTER)


def test_wal_and_spill_do_not_combine() -> None:
    with pytest.raises(ConfigError, match="durability"):
        ProducerConfig(stream="s", durability="wal", overflow="spill")


# Run in a child process, so that a SIGBUS (or a resource limit) ends the child, not the test run. argv: the WAL's
# parent directory and "rlimit" when it is not a small tmpfs (the largest file is then 1 MiB, SIGXFSZ ignored).
FULL_DISK_CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    from treasure_engine import LogError, _core

    root, mode = sys.argv[1], sys.argv[2]
    no_room = os.strerror(28 if mode == "tmpfs" else 27)  # ENOSPC on a full disk, EFBIG past RLIMIT_FSIZE
    if mode == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    shards = [("shardId-000000000000", 0, (1 << 128) - 1)]
    # A first segment larger than the disk: the pipeline does not start.
    try:
        _core.Pipeline("s", shards, wal_dir=root + "/big", wal_segment_bytes=2 << 20)
    except LogError as e:
        print("open", isinstance(e, OSError), "allocate segment" in str(e), no_room in str(e))
    # An event whose frame needs a segment of its own, larger than the disk: that submit raises, the next is taken.
    p = _core.Pipeline(
        "s", shards, wal_dir=root + "/wal", wal_segment_bytes=128 << 10, wal_fsync="never",
        ring_bytes=16 << 20, max_record_bytes=2 << 20, max_request_bytes=2 << 20, max_buffered_bytes=8 << 20,
    )
    p.submit(b"before", "k")
    try:
        p.submit(b"x" * 1_500_000, "k")
    except LogError as e:
        print("submit", "allocate segment" in str(e), no_room in str(e))
    p.submit(b"after", "k")
    s = p.stats()
    print("accepted", s["accepted"], "refused", s["refused"], "wal_errors", s["wal_errors"])
    p.shutdown(True)
    """
)


def _mount_tmpfs(path: Path, size: str) -> bool:
    """Mounts a tmpfs of `size` on `path` when this process may (root); false otherwise."""
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False)
    return done.returncode == 0


def test_full_disk_is_a_log_error_when_a_segment_is_allocated(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount_tmpfs(disk, "1m")
    try:
        child = subprocess.run(
            [sys.executable, "-c", FULL_DISK_CHILD, str(disk), "tmpfs" if mounted else "rlimit"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=True)
    assert child.returncode == 0, (child.returncode, child.stderr)  # -SIGBUS (-7) if a page could not be backed
    lines = child.stdout.split("\n")
    assert "open True True True" in lines, child.stdout
    assert "submit True True" in lines, child.stdout
    # The refused event is counted where the monitor looks (storage_errors_total{store="wal"}, storage_failing).
    assert "accepted 2 refused 1 wal_errors 1" in lines, child.stdout
