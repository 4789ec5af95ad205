"""benchmarks/results/ is the one folder of measurements, and its README.md the index: one table row
per file (the file, what it holds, the command that wrote it). A file nobody listed, or a row whose
file is gone, fails here; so does a row without its command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INDEX = RESULTS / "README.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)\|(.*)\|\s*$")


def index_rows() -> dict[str, tuple[str, str]]:
    """{file relative to benchmarks/results: (what it holds, written by)} from the index's table."""
    rows = {}
    for line in INDEX.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            name, holds, command = match.groups()
            assert name not in rows, f"{name} is listed twice in {INDEX.relative_to(REPO)}"
            rows[name] = (holds.strip(), command.strip())
    return rows


def result_files() -> set[str]:
    return {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*")
            if p.is_file() and p != INDEX and "__pycache__" not in p.parts}


def test_the_index_lists_every_results_file_and_nothing_else():
    listed, present = set(index_rows()), result_files()
    assert not present - listed, f"not in {INDEX.relative_to(REPO)}: {sorted(present - listed)}"
    assert not listed - present, f"listed but missing: {sorted(listed - present)}"


def test_every_row_says_what_the_file_holds_and_which_command_wrote_it():
    for name, (holds, command) in index_rows().items():
        assert holds, f"{name}: what it holds is empty"
        assert "`" in command, f"{name}: no command in {command!r}"


def test_no_results_left_in_the_old_places():
    assert not (REPO / "docs" / "bench").exists(), "docs/bench/ moved to benchmarks/results/"
