"""Comments and docstrings say why, never a measurement, a date, an issue number or a fact about the
machines the project is developed on: those go stale the day they are written and belong in a
results file that a command writes (benchmarks/results/README.md lists them).

Only comments and docstrings are read: Python through tokenize (comments) and ast (docstrings), C++
and CUDA through a small scanner of // and /* */ comments that skips string and character literals.
A number in code, a tolerance, a tensor's size or a vendor's peak in a table of data, is not
scanned. Each failure names file:line, what matched and which rule it broke.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON_ROOTS = ("fastgpt", "kernels", "benchmarks")
NATIVE_ROOT = "csrc"
NATIVE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")

_NUMBER = r"(?<![\w.])\d+(?:[.,]\d+)?"
_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
# (rule, pattern): a line of a comment or docstring that matches any of these fails.
RULES: list[tuple[str, re.Pattern]] = [
    ("a measured time", re.compile(
        _NUMBER + r"\s*(?:ms|µs|us|ns|s|secs?|seconds?|minutes?|mins?|hours?)(?![\w/])")),
    ("a measured rate", re.compile(
        _NUMBER + r"\s*(?:[KMGT]i?B/s|[GT]FLOP/s|[GT]FLOPS|tokens/s|tok/s|it/s|steps/s)", re.IGNORECASE)),
    ("a measured speed ratio", re.compile(
        _NUMBER + r"\s*[×x]\s+(?:faster|slower|quicker|the speed|its speed|speed-?up)", re.IGNORECASE)),
    ("a measured speed ratio", re.compile(
        r"(?:speed-?up|faster|slower)\s+(?:of|by)\s+(?:about\s+)?" + _NUMBER + r"\s*[×x%]", re.IGNORECASE)),
    ("a measured speed ratio", re.compile(
        _NUMBER + r"\s*[×x]\s+(?:the|its|a)\s+(?:[\w-]+\s+){0,2}(?:rate|speed|throughput|bandwidth)\b", re.IGNORECASE)),
    ("a measured cost in percent", re.compile(
        _NUMBER + r"\s*%\s+(?:faster|slower|less|more|cheaper|dearer|overhead|speed-?up"
        r"|of (?:the|a|an|its) (?:\S+ ){0,2}(?:step|time|run|cycles|call))\b", re.IGNORECASE)),
    ("a date", re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")),
    ("a date", re.compile(r"\b" + _MONTH + r"\.?\s+(?:\d{1,2},?\s+)?20\d\d\b")),
    ("an issue number", re.compile(r"\b(?:issues?|PR|pull request)\s*#?\d+", re.IGNORECASE)),
    ("a fact about the dev machines", re.compile(
        r"\b\d+-core\b|\bon this machine\b|\bdev(?:elopment)? machines?\b|\bour (?:CPU |GPU |dev )?machines?\b"
        r"|\blent (?:GPU|machine)", re.IGNORECASE)),
    # case-sensitive, so that a results folder's name (benchmarks/results/cpu-xeon-amx/) may be cited
    ("a fact about the dev machines", re.compile(r"\bXeon\b|\bEPYC\b")),
]

# file (relative to the repository) -> {line text fragment: why it may stay}. Empty on purpose:
# a hit is rewritten, not excused; add an entry only with its reason.
ALLOWED: dict[str, dict[str, str]] = {}


def python_files() -> list[Path]:
    return sorted(p for root in PYTHON_ROOTS for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


def native_files() -> list[Path]:
    return sorted(p for p in (REPO / NATIVE_ROOT).rglob("*") if p.suffix in NATIVE_SUFFIXES)


def python_comment_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every comment and every line of every docstring in a Python source."""
    lines = source.splitlines()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            found += [(n, lines[n - 1]) for n in range(first.lineno, first.end_lineno + 1)]
    return sorted(found)


def native_comment_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of every // and /* */ comment in a C++ or CUDA source;
    string and character literals are skipped, so a "//" inside one is not a comment."""
    found: list[tuple[int, str]] = []
    i, line, n = 0, 1, len(source)
    while i < n:
        c = source[i]
        if c == "\n":
            line += 1
        elif c in "\"'":
            j = i + 1
            while j < n and source[j] != c and source[j] != "\n":
                j += 2 if source[j] == "\\" else 1
            i = j
        elif source.startswith("//", i):
            end = source.find("\n", i)
            end = n if end < 0 else end
            found.append((line, source[i:end]))
            i = end
            continue
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for k, text in enumerate(source[i:end].split("\n")):
                found.append((line + k, text))
            line += source.count("\n", i, end)
            i = end
            continue
        i += 1
    return found


def violations(path: Path, commented: list[tuple[int, str]]) -> list[str]:
    relative = path.relative_to(REPO).as_posix()
    allowed = ALLOWED.get(relative, {})
    out = []
    for number, text in commented:
        if any(fragment in text for fragment in allowed):
            continue
        for rule, pattern in RULES:
            match = pattern.search(text)
            if match:
                out.append(f"{relative}:{number}: {rule}: {match.group(0)!r} in {text.strip()!r}")
                break
    return out


def all_violations() -> list[str]:
    found = []
    for path in python_files():
        found += violations(path, python_comment_lines(path.read_text(encoding="utf-8")))
    for path in native_files():
        found += violations(path, native_comment_lines(path.read_text(encoding="utf-8")))
    return found


def test_comments_and_docstrings_quote_no_measurement_date_issue_or_machine():
    found = all_violations()
    assert not found, f"{len(found)} comment line(s) to rewrite (say why; point to the results file):\n" + "\n".join(found)


@pytest.mark.parametrize("text", [
    "# 951 against 345 µs on this machine", "# 2.2x faster than sdpa", "# runs at 28 GB/s",
    "# measured 2026-12-03", "# see issue 17", "# issue #17's targets", "# on the 2-core Xeon",
    "# the dev machine's L3", "# takes 12.4 ms in bf16", "# a lent GPU comes for minutes", "# 5% faster", "# (Dec 2026)",
    "# 1.3 TFLOP/s on one core", "# 300 tokens/s", "# AMX is ~10x the float32 rate", "# 11% of a `shakespeare-char` step",
])
def test_each_rule_catches_what_it_is_for(text):
    assert violations(REPO / "x.py", [(1, text)]), text


@pytest.mark.parametrize("text", [
    "# tolerance 1e-5, atol 2e-3", "# (B, H, T, D) = (4, 6, 1024, 64)", "# 64-row blocks", "# 2x the forward's FLOPs",
    "# backward 2.5x forward", "# a 2-stage pipeline", "# 1/ln(2)", "# timeout_s seconds, from the budget table",
    "# at most 32 rows", "# the 8 MiB stack", "# sm_80 and sm_90", "# x4 unrolled", "# 16x16 tiles",
    "# a bf16 GEMM on this CPU", "# 75% of the tile's products", "# 90% train, 10% val",
    "# its results: benchmarks/results/cpu-epyc-avx2/",
])
def test_legitimate_facts_pass(text):
    assert not violations(REPO / "x.py", [(1, text)]), text


def test_the_native_scanner_skips_string_literals_and_spans_block_comments():
    source = 'auto s = "// 5 ms";\n/* first\n   12 ms here */ int x; // 3 us\n'
    assert [n for n, _ in native_comment_lines(source)] == [2, 3, 3]
