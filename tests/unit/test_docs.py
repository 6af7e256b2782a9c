"""The configuration reference documents exactly the options that exist."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from treasure_engine import ProducerConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_producer_option_documented_and_vice_versa() -> None:
    section = DOC.read_text().split("## ProducerConfig", 1)[1]
    documented = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, re.M))
    fields = {f.name: f for f in msgspec.structs.fields(ProducerConfig)}
    assert set(documented) == set(fields)
    for name, f in fields.items():
        expected = "required" if f.required else repr(f.default)
        assert documented[name] == expected, f"docs/configuration.md: default of {name}"
