"""The lint gate (issue 32): `make lint` runs ruff's rules and format check, then mypy, and .ci/run runs it before
the tests. Here ruff with pyproject.toml's settings reports each kind of problem planted in a scratch project,
and the tree passes the same two checks `make lint` runs (mypy is left to `make lint`: a minute without its cache)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKED = ("app", "tests", "bench", "scripts")  # what `make lint` checks

# The code ruff must report -> a snippet with that problem: every selected family (E, F, W, I, UP, B, BLE).
PLANTED = {
    "I001": "import sys\nimport os\n",  # unsorted
    "UP035": "from typing import List\n",
    "F401": "import json\n",  # unused
    "E501": "NOTE = '" + "x" * 120 + "'\n",
    "W291": "TRAILING = 1 \n",
    "E731": "square = lambda x: x * x\n",
    "B905": "PAIRS = list(zip([1, 2], [3, 4]))\n",
    "BLE001": "\n\ndef quiet(f):\n    try:\n        return f()\n    except Exception:\n        pass\n",
}
BADLY_FORMATTED = "value = {'a':1,'b' : 2}\n"
WELL_FORMATTED = 'value = {"a": 1, "b": 2}\n'


@pytest.fixture
def ruff() -> str:
    """The venv's ruff (requirements-dev.txt's pin, which `make lint` installs)."""
    path = Path(sys.executable).with_name("ruff")
    if not path.is_file():
        pytest.skip(f"ruff is not installed beside {sys.executable}: `make lint` installs requirements-dev.txt")
    return str(path)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def planted(tmp_path) -> Path:
    """A scratch project: this checkout's pyproject.toml and one module with every planted problem."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "planted.py").write_text("".join(PLANTED.values()), encoding="utf-8")
    (tmp_path / "app" / "unformatted.py").write_text(BADLY_FORMATTED, encoding="utf-8")
    (tmp_path / "app" / "tidy.py").write_text(WELL_FORMATTED, encoding="utf-8")
    return tmp_path


def test_the_configured_rules_report_each_planted_problem(ruff, planted):
    proc = _run(ruff, "check", "--no-cache", "--output-format", "json", "app/planted.py", cwd=planted)
    assert proc.returncode == 1, proc.stderr
    found = {(d["code"], d["location"]["row"]) for d in json.loads(proc.stdout)}
    source = "".join(PLANTED.values()).splitlines()
    missing = []
    for code, snippet in PLANTED.items():
        first = next(line for line in snippet.splitlines() if line.strip())
        row = source.index(first) + 1
        lines = range(row, row + len(snippet.strip("\n").splitlines()))
        if not any((code, r) in found for r in lines):
            missing.append(f"{code} ({first.strip()!r}, line {row})")
    assert missing == [], f"pyproject.toml's [tool.ruff.lint] does not report: {missing}; ruff found {sorted(found)}"


def test_the_format_check_reports_a_badly_formatted_file(ruff, planted):
    proc = _run(ruff, "format", "--check", "--no-cache", "app/unformatted.py", "app/tidy.py", cwd=planted)
    assert proc.returncode == 1, proc.stderr
    assert "app/unformatted.py" in proc.stdout and "tidy.py" not in proc.stdout
    assert "1 file would be reformatted, 1 file already formatted" in proc.stdout


def test_the_tree_passes_the_gate(ruff):
    check = _run(ruff, "check", "--no-cache", "--output-format", "concise", *CHECKED, cwd=REPO)
    assert check.returncode == 0, f"ruff check {' '.join(CHECKED)}:\n{check.stdout[-4000:]}{check.stderr}"
    fmt = _run(ruff, "format", "--check", "--no-cache", *CHECKED, cwd=REPO)
    assert fmt.returncode == 0, f"ruff format --check {' '.join(CHECKED)}:\n{fmt.stdout[-4000:]}{fmt.stderr}"


def test_make_lint_runs_both_checks_and_mypy_and_ci_runs_it_before_the_tests():
    from app.cli.reference import make_targets

    runs = {name: what for _, name, _, what in make_targets(REPO / "Makefile")}
    paths = " ".join(CHECKED)
    assert runs["lint"] == (
        f"`python -m ruff check {paths}`; `python -m ruff format --check {paths}`; `python -m mypy`"
    )
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    lint = next(i for i, line in enumerate(ci) if line.startswith("make lint"))
    test = next(i for i, line in enumerate(ci) if "make test" in line and not line.lstrip().startswith(("#", "echo")))
    assert lint < test
