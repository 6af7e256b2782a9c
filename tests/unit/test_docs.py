"""The configuration reference documents exactly the options that exist."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from treasure_engine import BreakerConfig, ConsumerConfig, EngineConfig, MonitorConfig, ProducerConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.mark.parametrize(
    "cls", [ProducerConfig, BreakerConfig, ConsumerConfig, MonitorConfig, EngineConfig], ids=lambda c: c.__name__
)
def test_every_option_documented_and_vice_versa(cls: type[msgspec.Struct]) -> None:
    section = DOC.read_text().split(f"## {cls.__name__}", 1)[1].split("\n## ", 1)[0]
    documented = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, re.M))
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    assert set(documented) == set(fields)
    for name, f in fields.items():
        expected = "required" if f.required else repr(f.default)
        assert documented[name] == expected, f"docs/configuration.md: default of {cls.__name__}.{name}"


def test_readme_figures_are_the_generated_ones() -> None:
    """The README's benchmark table is written by `make bench` (bench/run.py) from the run that wrote
    bench/RESULTS.md; a figure edited by hand in either place shows up as a difference here."""
    root = DOC.parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- bench:targets:begin", 1)[1].split("<!-- bench:targets:end -->", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    assert rows, "README.md has no generated benchmark table: run `make bench`"
    results = (root / "bench" / "RESULTS.md").read_text().split("## Targets", 1)[1].split("\n## ", 1)[0]
    assert rows == [line for line in results.splitlines() if line.startswith("| ")]
