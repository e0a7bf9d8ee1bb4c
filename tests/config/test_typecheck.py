"""The type gate can fail: mypy, run with the project's own configuration (pyproject.toml [tool.mypy]),
reports a misspelt setting name wherever a ``Setting`` is taken (``cfg.get``, ``... in cfg.explicit``,
``cfg.replace``) and a None where a value is required, and passes the same code spelt right. A plain ``str``
would let ``"MAX_SEQ_LENN" in cfg.explicit`` be False, silently."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (requirements-dev.txt; `make lint` installs it)")

REPO = Path(__file__).resolve().parents[2]
SNIPPET = """from app.config import Config, default_output_dir

cfg = Config()
value = cfg.get("{name}")
told = "{name}" in cfg.explicit
again = cfg.replace({{"{name}": 64}})
out = default_output_dir({model}, "lora")
"""
# line of the snippet -> what mypy must say about it when misspelt
EXPECTED = {
    4: r'Argument 1 to "get" of "Config" has incompatible type "Literal\[\'MAX_SEQ_LENN\'\]"',
    5: r'Unsupported operand types for in \("str" and "SettingNames"\)',
    6: r'Dict entry 0 has incompatible type "Literal\[\'MAX_SEQ_LENN\'\]"',
    7: r'Argument 1 to "default_output_dir" has incompatible type "None"; expected "str"',
}


def test_mypy_flags_a_misspelt_setting_and_a_missing_value(tmp_path):
    (tmp_path / "bad.py").write_text(SNIPPET.format(name="MAX_SEQ_LENN", model="None"), encoding="utf-8")
    (tmp_path / "good.py").write_text(SNIPPET.format(name="MAX_SEQ_LEN", model='"tiny"'), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")]
        + ["--cache-dir", str(tmp_path / "cache"), str(tmp_path / "bad.py"), str(tmp_path / "good.py")],
        cwd=REPO,  # where `app` is found; the cache goes to tmp_path, nothing is written here
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = re.findall(r"^(.*?):(\d+): error: (.*)$", run.stdout, flags=re.M)
    assert run.returncode == 1, run.stdout + run.stderr
    assert not [e for e in errors if Path(e[0]).name != "bad.py"], run.stdout  # spelt right: clean
    said = {int(line): text for _, line, text in errors}
    assert sorted(said) == sorted(EXPECTED), run.stdout
    for line, pattern in EXPECTED.items():
        assert re.search(pattern, said[line]), (line, said[line])
