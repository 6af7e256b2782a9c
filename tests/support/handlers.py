"""Handlers for `treasure-engine consume --handler tests.support.handlers:...` in the CLI tests."""

from __future__ import annotations

import os

from treasure_engine import Record


async def append_to_file(records: list[Record]) -> None:
    """Appends each record's data, one per line, to the file named by $TREASURE_TEST_OUT."""
    with open(os.environ["TREASURE_TEST_OUT"], "ab") as out:  # noqa: ASYNC230 - a test file, a few KB
        out.write(b"".join(r.data + b"\n" for r in records))


def not_async(records: list[Record]) -> None:
    """A handler the CLI must refuse: it is not async."""
