"""The chaos cases' report: each case hands its figures (`tests.support.chaos.Outcome`) to the `chaos_outcome`
fixture; at the end of the session they are printed as one table, and written as Markdown to
``$TREASURE_CHAOS_REPORT`` (default ``target/chaos-report.md``, with a JSON twin beside it).

A case records its figures before it asserts them, so a failing case still shows up in the table.
"""

from __future__ import annotations

import json
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.chaos import FULL, ROOT, ConsumerGroup, Ledger, Outcome, Rig, consumer_settings
from tests.support.emulators import Kinesalite, MotoServer

_OUTCOMES = pytest.StashKey[list[Outcome]]()
HEADER = (
    "case",
    "events",
    "delivered",
    "dead-lettered",
    "lost",
    "duplicates",
    "reordered per key",
    "time to recover",
    "notes",
)


@pytest.fixture
def chaos_outcome(request: pytest.FixtureRequest) -> Callable[[Outcome], Outcome]:
    """``chaos_outcome(outcome)``: adds a case's figures to the session's table (and returns them)."""
    started = time.monotonic()

    def record(outcome: Outcome) -> Outcome:
        outcome.wall_s = time.monotonic() - started
        request.config.stash.setdefault(_OUTCOMES, []).append(outcome)
        return outcome

    return record


def _row(o: Outcome) -> tuple[str, ...]:
    recover = "-" if o.recover_s is None else f"{o.recover_s:.1f} s"
    reordered = str(o.reordered) if o.ordered else f"{o.reordered} (unordered)"
    return (
        o.case, f"{o.events:,}", f"{o.delivered:,}", f"{o.dead_lettered:,}", str(o.lost), f"{o.duplicates:,}",
        reordered, recover, o.notes,
    )  # fmt: skip


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as a Markdown table."""
    rows = [HEADER, *(_row(o) for o in sorted(outcomes, key=lambda o: o.case))]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    outcomes = config.stash.get(_OUTCOMES, [])
    if not outcomes:
        return
    mode = "full (TREASURE_CHAOS=full)" if FULL else "short (CI)"
    text = table(outcomes)
    terminalreporter.write_sep("=", f"chaos cases, {mode} versions")
    terminalreporter.write_line(text)
    path = Path(os.environ.get("TREASURE_CHAOS_REPORT", ROOT / "target" / "chaos-report.md"))
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    path.write_text(
        f"Chaos cases, {mode} versions, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine}\n\n{text}\n"
    )
    path.with_suffix(".json").write_text(json.dumps([o.to_json() for o in outcomes], indent=1))
    terminalreporter.write_line(f"(written to {path})")


@pytest.fixture
def chaos_rig(
    kinesalite: Kinesalite, moto_server: MotoServer, stream_factory: Callable[..., str], tmp_path: Path
) -> Iterator[Callable[..., Rig]]:
    """``chaos_rig(shards, consumers=1, downstream=None, poison=False, reads_via=None, **consumer_settings) -> Rig``:
    a stream of `shards` shards and `consumers` consumer processes already reading it (stopped at teardown),
    through `reads_via` (a fault proxy's URL) when given. With a
    `downstream` URL the handlers post there, and the ledger reads `downstream_dir` (the scripted downstream's
    file should be in it)."""
    groups: list[ConsumerGroup] = []

    def make(
        shards: int,
        consumers: int = 1,
        *,
        downstream: str | None = None,
        poison: bool = False,
        reads_via: str | None = None,
        **kw: Any,
    ) -> Rig:
        stream = stream_factory(kinesalite.endpoint_url, shards, prefix="chaos")
        application = f"chaos-{uuid.uuid4().hex[:12]}"
        directory = tmp_path / "handled"
        kinesis = reads_via or kinesalite.endpoint_url
        settings = consumer_settings(stream, kinesis, moto_server.endpoint_url, application, **kw)
        group = ConsumerGroup(directory, settings, downstream=downstream, poison=poison)
        groups.append(group)
        group.start_all(consumers)
        # With a downstream, what counts is what it accepted (`downstream_dir`: where its file is).
        ledger = Ledger(tmp_path / "downstream" if downstream else directory)
        return Rig(stream, kinesalite.endpoint_url, moto_server.endpoint_url, application, directory, group, ledger)

    yield make
    for group in groups:
        group.__exit__()


@pytest.fixture
def downstream_dir(tmp_path: Path) -> Path:
    """Where a case's scripted downstream keeps what it accepted (the rig's ledger reads it)."""
    path = tmp_path / "downstream"
    path.mkdir()
    return path
