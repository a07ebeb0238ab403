"""The README's test command is what CI runs: keep the two in sync."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return next(line for line in reversed(lines) if line.strip() and not line.startswith("#"))


def test_ci_runs_the_readme_test_command():
    ci = _ci_command().replace("python3 -m pip install -q", "pip install").replace("python3 -m pytest", "pytest")
    assert ci in (ROOT / "README.md").read_text(), f"README must show the CI test command: {ci}"
