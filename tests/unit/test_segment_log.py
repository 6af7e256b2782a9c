"""`SegmentLog` and `LogReader` from Python: round trips, reopen and recovery, cursors, the lock held against another
process, damage reported (not raised), I/O failures as `LogError` (an `OSError`), file modes, and the exceptions.

The format and the recovery rules are tested in depth in Rust (rust/core/tests/log.rs); these tests check what the
binding adds: argument checking, the exception mapping, the GIL-free calls and the Python protocols."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import treasure_engine
from treasure_engine import (
    ConfigError,
    Corruption,
    LogError,
    LogLocked,
    LogNotFound,
    LogReader,
    RecordTooLarge,
    SegmentLog,
    TreasureEngineError,
    _core,
)

HEADER = 16  # segment header: the first frame of a log is at position 16
FRAME = 12  # frame header: sync, length, CRC32C


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def test_round_trip_with_positions(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = SegmentLog(path, fsync="never")
    assert (log.path, log.start, log.end, log.recovery) == (str(path), HEADER, HEADER, None)
    first = log.append(b"alpha")
    second = log.append(bytearray(b"be"))
    third = log.append(memoryview(b"xgammax")[1:-1])
    many = log.append_many([b"", b"delta", bytearray(b"e")])
    assert first == HEADER
    assert second == first + FRAME + 5
    assert third == second + FRAME + 2
    assert many == [third + FRAME + 5, third + 2 * FRAME + 5, third + 3 * FRAME + 10]
    assert log.end == many[-1] + FRAME + 1
    log.flush()
    expected = [
        (first, b"alpha"),
        (second, b"be"),
        (third, b"gamma"),
        (many[0], b""),
        (many[1], b"delta"),
        (many[2], b"e"),
    ]
    reader = LogReader(path)
    assert list(reader) == expected
    assert reader.position == log.end
    assert reader.corruptions == []
    stats = log.stats()
    assert stats["appended_frames"] == 6
    assert stats["appended_bytes"] == 18
    assert (stats["segments"], stats["buffered_bytes"], stats["failed"]) == (1, 0, 0)
    log.close()


def test_payloads_must_be_bytes_like(tmp_path: Path) -> None:
    with SegmentLog(tmp_path / "log", fsync="never") as log:
        with pytest.raises(TypeError, match="not str"):
            log.append("text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not int"):
            log.append(7)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not int"):
            log.append_many(b"bytes, not a list of them")  # type: ignore[arg-type]
        assert log.end == HEADER


def test_reader_sees_flushed_frames_and_resumes_from_a_position(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with SegmentLog(path, fsync="never") as log:
        reader = LogReader(path)
        log.append(b"one")
        assert list(reader) == []  # still in the writer's buffer
        log.flush()
        assert list(reader) == [(HEADER, b"one")]
        assert list(reader) == []
        positions = log.append_many([b"two", b"three", b"four"])
        log.commit()
        assert reader.read(2) == [(positions[0], b"two"), (positions[1], b"three")]
        assert reader.position == positions[2]
        assert reader.read(10) == [(positions[2], b"four")]
        assert reader.read(10) == []
        # From a position an append returned, or from inside a frame (starts at the next one).
        assert [p for p, _ in LogReader(path, positions[1])] == positions[1:]
        assert [p for p, _ in LogReader(path, positions[1] + 1)] == positions[2:]
        assert LogReader(path, start=0).read(0) == []


def test_reopen_continues_at_the_end_and_reports_a_cut_tail(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with SegmentLog(path, fsync="always") as log:
        log.append(b"kept")
        end = log.end
    with SegmentLog(path) as log:
        assert log.recovery is None
        assert log.end == end
    segment = segments(path)[0]
    with segment.open("ab") as f:
        f.write(segment.read_bytes()[HEADER : HEADER + 14])  # a torn copy of the first frame
    with SegmentLog(path) as log:
        recovery = log.recovery
        assert recovery is not None
        assert recovery["truncated_bytes"] == 14
        assert recovery["position"] == end
        assert recovery["segment"] == str(segment)
        assert "torn" in recovery["reason"]
        assert log.append(b"after") == end
    assert [payload for _, payload in LogReader(path)] == [b"kept", b"after"]


def test_cursors_persist_and_bad_names_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with SegmentLog(path, fsync="always") as log:
        assert log.cursor("consumer") is None
        log.set_cursor("consumer", 1234)
        assert log.cursor("consumer") == 1234
        for bad in ["", "..", "a/b", "x.tmp", "n" * 65, "é"]:
            with pytest.raises(ConfigError, match="cursor name"):
                log.set_cursor(bad, 1)
        with pytest.raises(ConfigError, match="position"):
            log.set_cursor("consumer", -1)
    with SegmentLog(path) as log:
        assert log.cursor("consumer") == 1234
        (path / "cursors" / "consumer").write_bytes(b"\x00" * 12)  # checksum does not match
        with pytest.raises(LogError, match="corrupt"):
            log.cursor("consumer")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


LOCK_PROBE = """
    import sys
    from treasure_engine import LogLocked, SegmentLog
    try:
        SegmentLog(sys.argv[1])
    except LogLocked as e:
        print("locked:", e)
    else:
        print("opened")
"""


def test_the_lock_holds_against_another_process(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with SegmentLog(path, fsync="never"):
        child = _python(LOCK_PROBE, str(path))
        assert child.returncode == 0, child.stderr
        assert child.stdout.startswith("locked:"), child.stdout
        assert str(path) in child.stdout
        assert f"pid {os.getpid()}" in child.stdout
        # In this process too: the lock belongs to the open file, not to the process.
        with pytest.raises(LogLocked, match=f"pid {os.getpid()}"):
            SegmentLog(path)
    child = _python(LOCK_PROBE, str(path))
    assert child.stdout.strip() == "opened", child.stderr


def test_damage_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with SegmentLog(path, fsync="never") as log:
        positions = log.append_many([b"a" * 20, b"b" * 20, b"c" * 20])
    segment = segments(path)[0]
    data = bytearray(segment.read_bytes())
    data[positions[1] + FRAME + 3] ^= 0xFF
    segment.write_bytes(bytes(data))

    reader = LogReader(path)
    assert list(reader) == [(positions[0], b"a" * 20), (positions[2], b"c" * 20)]
    [damage] = reader.corruptions
    assert isinstance(damage, Corruption)
    assert (damage.segment, damage.position, damage.length) == (str(segment), positions[1], FRAME + 20)
    assert damage.reason == "checksum mismatch"
    assert repr(damage) == (
        f"Corruption(segment={str(segment)!r}, position={positions[1]}, length=32, reason='checksum mismatch')"
    )


def test_incomplete_tail_waits_unless_strict(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with SegmentLog(path, fsync="never") as log:
        log.append(b"whole")
    segment = segments(path)[0]
    with segment.open("ab") as f:
        f.write(segment.read_bytes()[HEADER : HEADER + 7])
    live = LogReader(path)
    assert [p for p, _ in live] == [HEADER]
    assert live.corruptions == []
    strict = LogReader(path, strict_tail=True)
    assert [p for p, _ in strict] == [HEADER]
    assert [(c.position, c.length, c.reason) for c in strict.corruptions] == [(HEADER + 17, 7, "truncated frame")]


READ_ONLY_PROBE = """
    import errno, os, sys
    from treasure_engine import LogError, LogReader, SegmentLog
    if os.geteuid() == 0:  # root ignores file modes: become nobody, who owns the files
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    try:
        SegmentLog(sys.argv[1])
    except LogError as e:
        assert isinstance(e, OSError), type(e)
        print("refused", errno.errorcode[e.errno], e.filename)
    print("read", [payload for _, payload in LogReader(sys.argv[1])])
"""


def test_read_only_directory_raises_log_error() -> None:
    # Not under pytest's tmp_path: nobody must be able to reach the directory.
    base = Path(tempfile.mkdtemp(prefix="te-log-ro-"))
    try:
        base.chmod(0o755)
        path = base / "log"
        with SegmentLog(path, fsync="never") as log:
            log.append(b"before")
        entries = [*path.iterdir(), path]
        for entry in entries:
            if os.geteuid() == 0:
                os.chown(entry, 65534, 65534)
            entry.chmod(0o555 if entry == path else 0o444)
        child = _python(READ_ONLY_PROBE, str(path))
        assert child.returncode == 0, child.stderr
        assert child.stdout.splitlines() == [f"refused EACCES {path / 'LOCK'}", "read [b'before']"]
    finally:
        (base / "log").chmod(0o700)
        shutil.rmtree(base)


def test_io_failure_is_an_os_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(LogError) as info:
        SegmentLog(blocker / "log")
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(OSError, match="Not a directory"):
        SegmentLog(blocker)


def test_missing_directory_is_log_not_found(tmp_path: Path) -> None:
    with pytest.raises(LogNotFound) as info:
        LogReader(tmp_path / "nope")
    assert isinstance(info.value, LogError)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "nope")


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "log"
    with SegmentLog(path, fsync="never", segment_bytes=64) as log:
        log.append_many([b"x" * 40, b"y" * 40])  # two segments
        log.set_cursor("c", 16)
    assert path.stat().st_mode & 0o777 == 0o700
    assert (path / "cursors").stat().st_mode & 0o777 == 0o700
    files = [path / "LOCK", path / "cursors" / "c", *segments(path)]
    assert len(files) == 4
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_close_is_idempotent_and_later_calls_raise(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = SegmentLog(path, fsync="interval", fsync_interval_ms=3_600_000)
    log.append(b"flushed by close")
    log.close()
    log.close()
    assert "closed" in repr(log)
    with pytest.raises(LogError, match="closed"):
        log.append(b"late")
    with pytest.raises(LogError, match="closed"):
        log.commit()
    with pytest.raises(LogError, match="closed"):
        _ = log.end
    assert list(LogReader(path)) == [(HEADER, b"flushed by close")]
    with SegmentLog(path):  # the lock went with close
        pass


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"fsync": "sometimes"}, "fsync"),
        ({"fsync_interval_ms": 0}, "fsync_interval_ms"),
        ({"fsync_interval_ms": -5}, "fsync_interval_ms"),
        ({"segment_bytes": -1}, "segment_bytes"),
        ({"segment_bytes": 10}, "segment_bytes"),
        ({"retention_bytes": -1}, "retention_bytes"),
        ({"retention_s": -1.0}, "retention_s"),
        ({"retention_s": float("nan")}, "retention_s"),
        ({"max_frame_bytes": 0}, "max_frame_bytes"),
        ({"max_frame_bytes": 2**31}, "max_frame_bytes"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SegmentLog(tmp_path / "log", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "log").exists()


def test_bad_reader_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="start"):
        LogReader(tmp_path, -1)
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        LogReader(tmp_path, max_frame_bytes=0)


def test_payload_over_the_limit_is_record_too_large(tmp_path: Path) -> None:
    with SegmentLog(tmp_path / "log", fsync="never", max_frame_bytes=8) as log:
        assert log.append(b"12345678") == HEADER
        with pytest.raises(RecordTooLarge, match="max_frame_bytes=8"):
            log.append(b"123456789")
        with pytest.raises(RecordTooLarge):
            log.append_many([b"ok", b"123456789"])
        assert log.end == HEADER + FRAME + 8


def test_retention_and_delete_before(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with SegmentLog(path, fsync="never", segment_bytes=128, retention_bytes=300) as log:
        positions = [log.append(bytes([i]) * 90) for i in range(6)]  # one frame per segment
        log.flush()
        assert len(segments(path)) == 6
        assert log.enforce_retention() == 4 * 118  # six segments of 118 bytes, down to two (236 <= 300)
        assert log.start == positions[4]
        assert log.enforce_retention() == 0
        assert log.delete_before(log.end) == 118  # never the active segment
        assert [p for p, _ in LogReader(path, 0)] == [positions[5]]
        assert log.stats()["deleted_segments"] == 5


def test_interval_policy_syncs_in_the_background(tmp_path: Path) -> None:
    with SegmentLog(tmp_path / "log", fsync="interval", fsync_interval_ms=5) as log:
        log.append(b"x")
        log.commit()  # flushed now, fsynced by the flusher thread
        deadline = time.monotonic() + 10
        while log.stats()["fsyncs"] == 0:
            assert time.monotonic() < deadline, log.stats()
            time.sleep(0.005)
        assert log.stats()["synced"] == log.end


def test_threads_append_and_commit_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = SegmentLog(path, fsync="always", segment_bytes=4096)
    written: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(100):
            payload = f"{t}:{i}".encode()
            position = log.append(payload)
            with lock:
                written.append((position, payload))
            if i % 10 == 0:
                log.commit()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    reader = LogReader(path)
    assert list(reader) == sorted(written)
    assert reader.corruptions == []


def test_log_exceptions() -> None:
    assert issubclass(LogError, TreasureEngineError)
    assert issubclass(LogError, OSError)
    assert not issubclass(LogError, ValueError)
    for name in ["LogError", "LogLocked", "LogNotFound"]:
        exc = getattr(treasure_engine, name)
        assert getattr(_core, name) is exc
        assert exc.__module__ == "treasure_engine"
        assert exc.__doc__
        assert issubclass(exc, LogError)
    again = pickle.loads(pickle.dumps(LogError(errno.ENOSPC, "disk full", "/x/00000000000000000000.seg")))
    assert type(again) is LogError
    assert (again.errno, again.strerror, again.filename) == (errno.ENOSPC, "disk full", "/x/00000000000000000000.seg")
    locked = pickle.loads(pickle.dumps(LogLocked("held by pid 1")))
    assert type(locked) is LogLocked
    assert locked.args == ("held by pid 1",)
