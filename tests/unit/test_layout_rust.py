"""No Rust source file is over 1,200 lines, tests aside (docs/architecture.md, "The Rust crates").

Tests aside means: integration tests (`rust/*/tests/`), unit-test files (`tests.rs`), and every `#[cfg(test)]`
module inside a file. Build outputs and fuzz corpora are not sources.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1200
SKIPPED_DIRS = {"target", "corpus", "artifacts", "tests"}
CFG_TEST = re.compile(r"^(\s*)#\[cfg\(test\)\]\s*$")
MOD_OPEN = re.compile(r"^\s*(pub(\([^)]*\))? )?mod \w+ \{\s*$")


def sources() -> list[Path]:
    return sorted(
        p
        for p in (ROOT / "rust").rglob("*.rs")
        if not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts[:-1]) and p.name != "tests.rs"
    )


def counted_lines(text: str) -> int:
    """Lines of `text` outside its `#[cfg(test)]` modules (an inline module ends at the `}` at its indent)."""
    lines = text.splitlines()
    count = 0
    i = 0
    while i < len(lines):
        cfg = CFG_TEST.match(lines[i])
        if cfg and i + 1 < len(lines) and MOD_OPEN.match(lines[i + 1]):
            end = cfg.group(1) + "}"
            i += 2
            while i < len(lines) and lines[i].rstrip() != end:
                i += 1
            i += 1
            continue
        count += 1
        i += 1
    return count


def test_the_count_leaves_out_test_modules() -> None:
    text = "fn a() {}\n\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() {}\n}\nfn b() {}\n"
    assert counted_lines(text) == 3
    inner = "mod crc {\n    fn f() {}\n\n    #[cfg(test)]\n    mod tests {\n        fn t() {}\n    }\n}\n"
    assert counted_lines(inner) == 4


def test_sources_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in sources()}
    assert "rust/core/src/lib.rs" in names
    assert "rust/py/src/lib.rs" in names
    assert not any("/tests/" in n or n.endswith("/tests.rs") for n in names)


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_rust_file_is_at_most_1200_lines_without_its_tests(path: Path) -> None:
    n = counted_lines(path.read_text())
    assert n <= LIMIT, f"{path.relative_to(ROOT)}: {n} lines without its tests (limit {LIMIT}); split it by concern"
