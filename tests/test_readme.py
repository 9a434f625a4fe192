"""The README stays true: CI runs exactly its test command, its numbers are the bench's, its layout names every doc."""

from __future__ import annotations

import re
from itertools import takewhile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("s2reg demo") and "torch==2.13.0" in commands[0]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == readme_commands()[1]


def test_ci_lints_before_it_tests_in_the_readme_environment():
    """Issue 26: ruff and mypy (on the typed package) run after the README's own install and before its tests."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    install, _, test = readme_commands()[1].rpartition(" && ")
    assert test == "python -m pytest -n 2"
    lint = ci.index(install) + 1
    assert lint < len(ci) - 1 and ci[lint] == "python -m ruff check . && python -m mypy s2reg"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{tool}==' in pyproject for tool in ("ruff", "mypy")), "the test extra pins the linters CI runs"


def test_readme_says_how_long_the_suite_takes_and_names_a_quick_subset():
    """Issue 24: the whole suite ran 68 minutes with no word of it; the quick subset leaves out the slow marker."""
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "over an hour" in section and '`python -m pytest -n 2 -m "not slow"`' in section


def headline() -> str:
    """The README's paragraph of measured numbers (the one that cites bench/README.md)."""
    text = (ROOT / "README.md").read_text()
    return next(p for p in text.split("\n\n") if p.startswith("Measured against"))


def test_readme_headline_numbers_come_from_the_bench_tables():
    """Issue 26: every number of the headline (ratios, percentages, sizes, drift) is one bench/README.md reports,
    written the same way, so a re-measured bench that changes one fails here until the README follows."""
    bench = (ROOT / "bench" / "README.md").read_text()
    numbers = re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-\d+)?[x%]?", headline())
    assert len(numbers) >= 10 and "17.6x" in numbers
    missing = [n for n in numbers if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\d])", bench)]
    assert not missing, f"README headline numbers not in bench/README.md: {missing}"


def test_readme_layout_names_every_doc():
    """The Layout list names every document of docs/ and spec/ on its folder's line(s)."""
    block = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```", 2)[1]
    for folder in ("docs", "spec"):
        lines = block.split(f"\n{folder}/", 1)[1].split("\n")
        text = " ".join([lines[0], *takewhile(lambda line: line.startswith(" "), lines[1:])])
        for doc in sorted((ROOT / folder).glob("*.md")):
            assert re.search(rf"\b{re.escape(doc.name)}\b", text), f"README Layout does not name {folder}/{doc.name}"
