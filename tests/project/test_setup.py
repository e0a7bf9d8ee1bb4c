"""make setup on a fresh machine (issue 14, item 8): without an NVIDIA GPU, torch comes from the
CPU index (TORCH_INDEX_URL); an unreachable index falls back at once, saying so; the last line
names the installed build. pip and nvidia-smi are stand-ins that record what they were asked."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH_PIN = next(x for x in (REPO / "requirements.txt").read_text().splitlines() if x.startswith("torch=="))

# A stand-in python: `-m venv DIR` makes DIR/bin/python (itself); `-m pip ...` logs its arguments
# and fails for an index named in FAIL_INDEX; `-c ...` answers like the real torch check would.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1 $2" = "-m pip" ]; then
    echo "pip ${*:3}" >> "$LOG"
    if [ -n "${FAIL_INDEX:-}" ] && [[ " $* " == *" --index-url $FAIL_INDEX "* ]]; then exit 1; fi
    exit 0
fi
if [ "$1" = "-c" ]; then echo "setup: torch 2.13.0+cpu, CPU build"; exit 0; fi
exit 9
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def setup_run(tmp_path):
    python = _exe(tmp_path / "fakepython", FAKE_PYTHON)
    bindir = tmp_path / "bin"
    bindir.mkdir()

    def run(gpu: bool = False, venv: Path | None = None, **env_extra):
        if gpu:
            _exe(bindir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-x)'\n")
        log = tmp_path / "pip.log"
        log.unlink(missing_ok=True)
        env = {"PATH": f"{bindir}{os.pathsep}/usr/bin:/bin", "LOG": str(log), "HOME": str(tmp_path), **env_extra}
        proc = subprocess.run(
            [str(REPO / "scripts" / "setup-venv.sh"), str(venv or tmp_path / "venv"), str(python)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc, log.read_text().splitlines() if log.exists() else []

    return run


def test_no_gpu_installs_torch_from_the_cpu_index_first(setup_run):
    proc, pip = setup_run()
    assert proc.returncode == 0, proc.stderr
    assert pip[0] == "pip install -q --upgrade pip"
    assert pip[1] == (
        f"pip install -q --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu {TORCH_PIN}"
    )
    assert pip[2] == "pip install -q -r requirements.txt" and len(pip) == 3
    assert proc.stdout.strip().splitlines()[-1] == "setup: torch 2.13.0+cpu, CPU build"


def test_unreachable_index_falls_back_to_the_default_one_with_one_line(setup_run):
    proc, pip = setup_run(TORCH_INDEX_URL="http://127.0.0.1:9/cpu", FAIL_INDEX="http://127.0.0.1:9/cpu")
    assert proc.returncode == 0, proc.stderr
    assert pip[1].endswith(f"--index-url http://127.0.0.1:9/cpu {TORCH_PIN}") and "--retries 0" in pip[1]
    assert pip[2] == f"pip install -q {TORCH_PIN}"
    said = [line for line in proc.stdout.splitlines() if "did not answer" in line]
    assert len(said) == 1 and "TORCH_INDEX_URL=http://127.0.0.1:9/cpu" in said[0]


def test_an_nvidia_gpu_gets_the_default_cuda_build(setup_run):
    proc, pip = setup_run(gpu=True)
    assert proc.returncode == 0, proc.stderr
    assert pip[1] == f"pip install -q {TORCH_PIN}" and not any("--index-url" in x for x in pip)
    assert "NVIDIA GPU answers" in proc.stdout


def test_make_setup_uses_the_script():
    proc = subprocess.run(
        ["make", "-n", "-B", "-C", str(REPO), ".venv/.installed", "RUNTIME=local"], capture_output=True, text=True
    )
    assert "scripts/setup-venv.sh .venv python3" in proc.stdout, proc.stdout


@pytest.mark.parametrize("gpu", [False, True])
def test_a_disk_too_small_for_the_venv_is_refused_in_one_line_before_pip(setup_run, small_disk, gpu):
    disk = small_disk("2m")
    (disk / "notes.txt").write_bytes(b"the user's\n")
    proc, pip = setup_run(gpu=gpu, venv=disk / "env" / ".venv")
    assert proc.returncode == 1 and pip == [], (proc.stdout, pip)
    said = proc.stderr.strip().splitlines()
    assert len(said) == 1 and f"MB free on the disk of {disk}" in said[0] and "VENV" in said[0], said
    need = int(said[0].split("needs about ")[1].split()[0])
    assert need == (7000 if gpu else 2600)
    assert sorted(p.name for p in disk.iterdir()) == ["notes.txt"]
    assert (disk / "notes.txt").read_bytes() == b"the user's\n"
