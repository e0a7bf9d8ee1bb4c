"""make setup-gguf (issue 29): llama.cpp is optional and pinned (requirements-gguf.txt); a missing cmake or
compiler is one line before anything is installed; the converter scripts come from the same version's sdist
and are renamed into place whole, never half-extracted; a rerun with everything in place does nothing. The
venv's python is a stand-in that logs what it is asked (pip is not run), and the sdist a small tarball with
the real one's layout (LLAMA_CPP_SDIST)."""

import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "setup-gguf.sh"
PINS = [x for x in (REPO / "requirements-gguf.txt").read_text().splitlines() if x and not x.startswith("#")]
VERSION = next(x.split("==")[1] for x in PINS if x.startswith("llama-cpp-python=="))
BASH = "/bin/bash"

# `-m pip ...` and `-c ...` are logged with the build settings pip would pass to cmake, and succeed.
FAKE_PYTHON = """#!/bin/bash
echo "CMAKE_ARGS=$CMAKE_ARGS JOBS=$CMAKE_BUILD_PARALLEL_LEVEL python $*" >> "$LOG"
"""
CONVERTER = {
    "convert_hf_to_gguf.py": "# hf\n",
    "convert_lora_to_gguf.py": "# lora\n",
    "LICENSE": "MIT\n",
    "conversion/__init__.py": "# models\n",
    "gguf-py/gguf/__init__.py": "# gguf\n",
}


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (p.read_text() if p.is_file() else "/") for p in sorted(root.rglob("*"))}


@pytest.fixture
def gguf(tmp_path):
    """run(path_dirs, **env) -> (proc, python calls); tools(cmake_version, compiler) -> a bin dir; sdist(leave_out)
    -> a tarball laid out as llama-cpp-python's, its vendored llama.cpp holding the converter and other files."""
    venv = tmp_path / "venv"
    _exe(venv / "bin" / "python", FAKE_PYTHON)
    log = tmp_path / "python.log"

    class Gguf:
        share = venv / "share" / "llama.cpp"

        @staticmethod
        def tools(cmake: str | None = "3.25.1", compiler: str | None = "c++") -> Path:
            bindir = tmp_path / f"bin-{cmake}-{compiler}"
            bindir.mkdir(exist_ok=True)
            if cmake:
                _exe(bindir / "cmake", f"#!/bin/sh\necho 'cmake version {cmake}'\necho\n")
            if compiler:
                _exe(bindir / compiler, "#!/bin/sh\nexit 0\n")
            return bindir

        @staticmethod
        def sdist(leave_out: str = "", name: str = "sdist.tar.gz") -> Path:
            path = tmp_path / name
            top = f"llama_cpp_python-{VERSION}"
            files = {
                f"{top}/vendor/llama.cpp/{k}": v for k, v in CONVERTER.items() if not k.startswith(leave_out or "-")
            }
            files.update({f"{top}/pyproject.toml": "", f"{top}/vendor/llama.cpp/src/llama.cpp": "int x;\n"})
            with tarfile.open(path, "w:gz") as tar:
                for member, text in files.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(text.encode())
                    tar.addfile(info, io.BytesIO(text.encode()))
            return path

        @staticmethod
        def run(*path_dirs: Path, **env_extra):
            log.unlink(missing_ok=True)
            env = {"PATH": os.pathsep.join(map(str, path_dirs)), "LOG": str(log), "HOME": str(tmp_path), **env_extra}
            proc = subprocess.run(
                [BASH, str(SCRIPT), str(venv)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
            )
            return proc, log.read_text().splitlines() if log.exists() else []

    Gguf.venv = venv
    return Gguf


@pytest.mark.parametrize(
    "cmake, compiler, named",
    [
        (None, None, "needs cmake and a C++ compiler (c++, g++ or clang++), not found"),
        (None, "g++", "needs cmake, not found"),
        ("3.25.1", None, "needs a C++ compiler (c++, g++ or clang++), not found"),
        ("3.16.3", "clang++", "needs cmake >= 3.21 (found 3.16.3), not found"),
    ],
)
def test_a_missing_toolchain_is_one_line_and_nothing_is_installed(gguf, cmake, compiler, named):
    """Only the stand-in tools are on PATH (not /usr/bin, which may hold the real ones)."""
    before = _tree(gguf.venv)
    proc, calls = gguf.run(gguf.tools(cmake, compiler))
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert named in proc.stderr
    assert "Debian/Ubuntu: sudo apt-get install cmake g++; elsewhere: cmake >= 3.21 and a C++17 compiler" in proc.stderr
    assert calls == [] and _tree(gguf.venv) == before  # pip never ran, the venv is as it was


# no multimodal library, and no AMX (ggml's AMX kernels die with SIGILL on this machine's Xeon)
DEFAULT_ARGS = (
    "-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
)


def test_installs_the_pins_and_the_converter_whole_then_a_rerun_does_nothing(gguf):
    proc, calls = gguf.run(gguf.tools(), "/usr/bin", "/bin", LLAMA_CPP_SDIST=str(gguf.sdist()))
    assert proc.returncode == 0, proc.stderr
    jobs = str(
        len(os.sched_getaffinity(0))
    )  # every core (as nproc counts them) unless CMAKE_BUILD_PARALLEL_LEVEL is given
    assert calls == [
        f"CMAKE_ARGS={DEFAULT_ARGS} JOBS={jobs} python -m pip install -r {REPO / 'requirements-gguf.txt'}",
        f"CMAKE_ARGS={DEFAULT_ARGS} JOBS={jobs} python -c import llama_cpp",
    ]
    assert _tree(gguf.share) == {
        **{k: v for k, v in CONVERTER.items()},
        "conversion": "/",
        "gguf-py": "/",
        "gguf-py/gguf": "/",
        "VERSION": f"llama-cpp-python=={VERSION}\n",
    }
    assert sorted(p.name for p in gguf.share.parent.iterdir()) == ["llama.cpp"]  # no temp dir left
    assert re.search(rf"llama-cpp-python {VERSION} and its converter \(.*\) installed in \d+ s$", proc.stdout)

    again, calls = gguf.run(gguf.tools(), "/usr/bin", "/bin")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith("are in place; nothing to do")
    assert [c for c in calls if "pip" in c] == []


def test_other_cmake_args_rebuild_without_the_wheel_cache(gguf):
    """pip's wheel cache is keyed on the sdist, not on CMAKE_ARGS: a CUDA build must neither take a CPU wheel
    (cached, or in --find-links) nor keep the installed one."""
    assert gguf.run(gguf.tools(), "/usr/bin", "/bin", LLAMA_CPP_SDIST=str(gguf.sdist()))[0].returncode == 0
    proc, calls = gguf.run(
        gguf.tools(),
        "/usr/bin",
        "/bin",
        LLAMA_CPP_SDIST=str(gguf.sdist()),
        CMAKE_ARGS="-DGGML_CUDA=on",
        CMAKE_BUILD_PARALLEL_LEVEL="3",
    )
    assert proc.returncode == 0, proc.stderr
    pip = [c for c in calls if " -m pip " in c]
    assert pip == [
        f"CMAKE_ARGS=-DGGML_CUDA=on JOBS=3 python -m pip install --no-cache-dir --no-binary "
        f"llama-cpp-python --force-reinstall --no-deps llama-cpp-python=={VERSION}",
        f"CMAKE_ARGS=-DGGML_CUDA=on JOBS=3 python -m pip install --no-cache-dir --no-binary "
        f"llama-cpp-python -r "
        f"{REPO / 'requirements-gguf.txt'}",
    ]
    assert f"built with CMAKE_ARGS={DEFAULT_ARGS}; rebuilding it" in proc.stdout


def test_a_rerun_replaces_an_older_converter_whole(gguf):
    assert gguf.run(gguf.tools(), "/usr/bin", "/bin", LLAMA_CPP_SDIST=str(gguf.sdist()))[0].returncode == 0
    (gguf.share / "VERSION").write_text("llama-cpp-python==0.0.1\n")
    (gguf.share / "conversion" / "gone.py").write_text("# only in the older copy\n")
    proc, _ = gguf.run(gguf.tools(), "/usr/bin", "/bin", LLAMA_CPP_SDIST=str(gguf.sdist()))
    assert proc.returncode == 0, proc.stderr
    assert (gguf.share / "VERSION").read_text() == f"llama-cpp-python=={VERSION}\n"
    assert sorted(_tree(gguf.share)) == sorted([*CONVERTER, "conversion", "gguf-py", "gguf-py/gguf", "VERSION"])
    assert sorted(p.name for p in gguf.share.parent.iterdir()) == ["llama.cpp"]


@pytest.mark.parametrize("damage", ["no conversion/", "truncated"])
def test_a_bad_sdist_leaves_the_previous_converter_as_it_was(gguf, damage):
    assert gguf.run(gguf.tools(), "/usr/bin", "/bin", LLAMA_CPP_SDIST=str(gguf.sdist()))[0].returncode == 0
    (gguf.share / "VERSION").write_text("llama-cpp-python==0.0.1\n")  # an older copy: the rerun replaces it
    before = _tree(gguf.share)
    if damage == "truncated":
        bad = gguf.sdist(name="bad.tar.gz")
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad = gguf.sdist(leave_out="conversion/", name="bad.tar.gz")
    proc, _ = gguf.run(gguf.tools(), "/usr/bin", "/bin", LLAMA_CPP_SDIST=str(bad))
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and f"setup-gguf: {bad} is not llama-cpp-python" in proc.stderr
    assert _tree(gguf.share) == before
    assert sorted(p.name for p in gguf.share.parent.iterdir()) == ["llama.cpp"]  # no half-extracted temp dir


def test_a_bad_sdist_on_a_first_install_leaves_no_converter(gguf):
    proc, _ = gguf.run(gguf.tools(), "/usr/bin", "/bin", LLAMA_CPP_SDIST=str(gguf.sdist(leave_out="gguf-py/")))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert list((gguf.venv / "share").iterdir()) == [] and not (gguf.venv / ".gguf-installed").exists()


def test_requirements_are_pinned():
    assert [p.split("==")[0] for p in PINS] == ["llama-cpp-python", "gguf", "sentencepiece", "requests"]
    assert all(re.fullmatch(r"[a-z-]+==[0-9.]+", p) for p in PINS), PINS


def test_make_setup_gguf_runs_the_script_locally_and_ci_runs_it_before_the_tests():
    local = subprocess.run(
        ["make", "-n", "-C", str(REPO), "setup-gguf", "RUNTIME=local", "VENV=/nonexistent/v"],
        capture_output=True,
        text=True,
    )
    assert "scripts/setup-gguf.sh /nonexistent/v" in local.stdout, local.stdout + local.stderr
    docker = subprocess.run(
        ["make", "-n", "-C", str(REPO), "setup-gguf", "RUNTIME=docker"], capture_output=True, text=True
    )
    assert "has llama.cpp already" in docker.stdout and "setup-gguf.sh" not in docker.stdout
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.* setup-gguf ", makefile, re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert 0 <= ci.find("make setup-gguf") < ci.find("make test")


def test_the_images_build_llama_cpp_in_the_deps_stage_only():
    """The build tools stay in the deps stage; the final image gets the venv (binding + converter) and the
    OpenMP runtime libggml links to; the build context lets the script and its pins in."""
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    assert "!requirements-gguf.txt" in allowed and "!scripts/setup-gguf.sh" in allowed
    for name in ("Dockerfile", "Dockerfile.cuda"):
        deps, final = re.split(r"^# ---- app", (REPO / name).read_text(), flags=re.M)
        deps = deps.split(" AS deps", 1)[1]
        assert re.search(r"apt-get install [^\n]*cmake g\+\+", deps), name
        assert "scripts/setup-gguf.sh /opt/venv" in deps and "--find-links" in deps, name
        assert not re.search(r"\b(cmake|g\+\+|build-essential)\b", final), name
        assert re.search(r"install [^\n]*\blibgomp1\b", final), name
    assert "-DGGML_CUDA=on" in (REPO / "Dockerfile.cuda").read_text()
