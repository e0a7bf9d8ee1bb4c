"""The README as a newcomer reads it (issue 28): the quick start, then "your own data", then `make evaluate`, in
that order in a fresh project, each doing what the README says. The commands are taken from README.md itself,
so editing one there changes what this runs. `make <target>` runs `python -m app <target>` (checked with
`make -n`); the venv `make` would build is this one. The own-data lines use the default MODEL_NAME, a hub model
that cannot be fetched offline: the project's .env names the tiny model instead, as a user trying it offline
would."""

import json
import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[list[str]]:
    """Every `make ...` line of README.md's bash blocks, as argv without the comment."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("make ")]
    return lines


def _pick(commands: list[list[str]], target: str, has: str = "") -> list[str]:
    found = [c for c in commands if c[1] == target and (not has or any(has in a for a in c))]
    assert found, f"README.md has no `make {target}` line{f' with {has}' if has else ''}"
    return found[0]


def _alpaca(path: Path, n: int = 40) -> Path:
    path.parent.mkdir(parents=True)
    rows = [{"instruction": f"计算 {a} 加 {a + 3} 等于多少？", "input": "", "output": f"{2 * a + 3}"} for a in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_quick_start_then_your_own_data_then_evaluate(tmp_path, run_app):
    commands = _readme_commands()
    quick = _pick(commands, "train", "MODEL_NAME=tiny")
    answer = _pick(commands, "predict-custom")
    own_info, own_train = _pick(commands, "info", "DATA_PATH="), _pick(commands, "train", "DATA_PATH=")
    evaluate = _pick(commands, "evaluate")
    journey = [quick, answer, own_info, own_train, evaluate]
    for argv in journey:  # each target is `python -m app <target>`, with the line's settings passed on
        dry = subprocess.run(
            ["make", "-n", "-o", ".venv/.installed", "-C", str(REPO), *argv[1:], "RUNTIME=local"],
            capture_output=True,
            text=True,
        )
        assert dry.returncode == 0 and f"-m app {argv[1]}" in dry.stdout, (argv, dry.stdout, dry.stderr)

    data = own_train[[a.split("=")[0] for a in own_train].index("DATA_PATH")].split("=", 1)[1]
    _alpaca(tmp_path / data)
    (tmp_path / ".env").write_text("MODEL_NAME=tiny\n", encoding="utf-8")
    runs = {}
    for argv in journey:
        proc = run_app(argv[1:], tmp_path)
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
        runs[" ".join(argv[1:3])] = proc

    quick_run, own_run = tmp_path / "models" / "tiny-lora", tmp_path / "models" / "tiny-lora-mine-train"
    assert (quick_run / "summary.json").is_file() and (own_run / "summary.json").is_file()
    assert json.loads((own_run / "train_config.json").read_text())["DATA_PATH"] == data
    assert "adapter models/tiny-lora" in runs[" ".join(answer[1:3])].stderr
    assert "predicted peak" in runs[" ".join(own_info[1:3])].stdout
    scored = runs["evaluate"].stderr
    assert re.search(rf"evaluating the \d+ records models/tiny-lora-mine-train held out of {re.escape(data)}", scored)
    assert re.search(r"exact match [\d.]+, ROUGE-L [\d.]+, BLEU-4 [\d.]+, loss [\d.]+ on \d+ samples", scored), scored
    assert "F1" not in scored  # no triplet score for instruction data
    report = json.loads((own_run / "eval" / "report.json").read_text())
    assert report["scored_as"] != "triplets" and report["n_samples"] >= 1
