"""docs/reliability.md: every row of its tables names a test, and every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows() -> list[str]:
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Fault")]


def named_tests(cell: str) -> list[tuple[Path, str | None]]:
    """``file.py::test`` references of a cell; ``::test`` continues the file named before it."""
    found, current = [], None
    for ref in re.findall(r"`([^`]+\.py(?:::\w+)?|::\w+)`", cell):
        path, _, name = ref.rpartition("::") if "::" in ref else (ref, "", "")
        current = ROOT / "tests" / path if path else current
        found.append((current, name or None))
    return found


def test_every_row_names_a_test_that_exists():
    assert len(rows()) >= 25
    for row in rows():
        tests = named_tests(row.rstrip(" |").split(" | ")[-1])
        assert tests, f"no test named in: {row[:80]}"
        for path, name in tests:
            assert path.is_file(), f"{path} does not exist ({row[:60]})"
            assert name is None or f"def {name}(" in path.read_text(encoding="utf-8"), (path, name)
