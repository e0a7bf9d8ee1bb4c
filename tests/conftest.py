"""Shared fixtures, the only place test files share code (no test file imports another:
tests/project/test_suite_guards.py checks it).

- the three tiny model families (and their tokenizers), built once per session in a temp dir with
  ``app.models.tiny.build_tiny_model`` (seeded, ~2 s each), so tests never touch or depend on the
  repo's own ``models/`` directory; the real DuIE data, or a skip;
- the checkout stays as it was (autouse guards) and the `make test-fast` SLOW list;
- the command line: ``cli`` (main() in this process, with none of the shell's settings, in tmp_path),
  ``child_env`` / ``run_app`` / ``app_process`` (`python -m app` as a real process; nothing it started may
  outlive the test), ``as_a_user``,
  ``snapshot`` (file hashes, to compare before and after);
- training runs: ``write_dataset``, ``make_data`` and ``data_dir`` (synthetic data), ``recipe`` (the
  golden-loss recipe), ``read_metrics`` and ``train_losses`` (what a run logged), ``greedy_reference`` (an
  independent decode).

Everything that imports ``app`` does so inside the fixture: tests/project/test_suite_guards.py runs a copy of
this file in a throw-away project.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real DuIE data beside the project (CI has it; a user's clone usually does not).
REAL_DATA_DIR = REPO.parent / "shared" / "data" / "duie-mixed"
_SKIPPED_DIRS = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "wheels",
    "artifacts",
    ".gpu-wheels",
    ".whl",
    ".gl",  # the device tool's carry folders (git-ignored, filled by scripts)
}
# What a test leaves for people to look at (the web UI journey's screenshots): tests/artifacts/, ignored by git.
ARTIFACTS = REPO / "tests" / "artifacts"


# ---- `make test-fast`: the suite without these (each takes seconds to minutes on 2 cores) -------------
# One list rather than a decorator per test, so the edit loop's budget is visible in one place; an
# entry that matches no test is an error (a renamed test must not silently turn fast).
SLOW = (
    "tests/cli/test_demo.py::test_demo_recipe_f1_rises_well_above_its_start",
    "tests/cli/test_demo.py::test_the_report_gives_the_batch_the_run_trained_with_under_the_tier",
    "tests/evaluation/test_evaluate.py",
    "tests/inference/test_export.py",
    "tests/inference/test_gguf_export.py",
    "tests/inference/test_gguf_parity.py",
    "tests/inference/test_gguf_tokens.py",
    "tests/cli/test_faults.py::test_kill_9_of_merge_leaves_the_previous_merge_or_none",
    "tests/cli/test_faults.py::test_kill_9_of_export_leaves_the_previous_export_or_none",
    "tests/models/test_families.py",
    "tests/training/test_guard.py::test_naive_config_over_a_real_limit_finishes_instead_of_being_killed",
    "tests/training/test_guard.py::test_backoff_resumes_with_half_batch_and_the_same_losses",
    "tests/cli/test_cli.py::test_offline_tiny_train_then_predict_end_to_end",
    "tests/cli/test_cli.py::test_info_sees_the_memory_limit_and_picks_the_tier",
    "tests/training/test_distributed.py::test_two_nodes_on_loopback",
    "tests/training/test_distributed.py::test_two_processes_train_as_one_job",
    "tests/training/test_signals.py",
    "tests/training/test_deepspeed_cpu.py",
    "tests/inference/test_predict.py",
    "tests/training/test_train.py::test_kill_9_then_resume_equals_an_uninterrupted_run",
    "tests/cli/test_workspace.py::test_train_on_a_user_file_never_changes_it_or_writes_beside_it",
    "tests/data/test_records_used.py",
    "tests/data/test_encode_batch.py::test_the_cache_holds_encodes_rows_for_every_record_format",
    "tests/cli/test_faults.py::test_a_second_run_into_a_busy_output_dir_is_refused_and_the_first_finishes",
    "tests/cli/test_faults.py::test_sigterm_while_the_data_loads_ends_cleanly_and_touches_nothing",
    "tests/cli/test_preflight.py::test_info_offline_shows_everything_but_the_shape_and_the_download_command",
    "tests/cli/test_preflight.py::test_offline_training_error_gives_the_download_command",
    "tests/core/test_ownership.py::test_a_train_then_remove_run_leaves_exactly_the_users_files",
    "tests/core/test_ownership.py::test_predict_file_and_evaluate_write_only_where_they_may",
    "tests/core/test_ownership.py::test_a_token_cache_dir_holding_your_files_is_refused",
    "tests/cli/test_disk_full.py",
    "tests/cli/test_readme_journey.py",
    "tests/cli/test_preflight.py::test_info_plans_from_the_config_alone_and_train_refuses_without_weights",
    "tests/webui/test_webui.py::test_train_watch_chat_evaluate_and_merge",
    "tests/webui/test_webui.py::test_gradio_refuses_an_upload_over_the_cap_before_its_temp_dir_holds_it",
    "tests/webui/test_webui.py::test_the_page_says_to_plan_first_until_a_plan_is_shown",
    "tests/webui/test_webui.py::test_plan_runs_the_stage_settings_and_the_adapter_to_continue",
    "tests/webui/test_webui.py::test_the_chat_backend_ends_with_the_ui_however_the_ui_ends",
    "tests/webui/test_webui_browser.py",
    "tests/serve/test_serve_llamacpp.py",
    "tests/project/test_gpu_tier.py::test_without_a_gpu_every_test_skips_naming_why_and_the_report_stays",
    "tests/project/test_gpu_tier.py::test_require_gpu_turns_each_skip_into_a_failure",
    "tests/plan/test_option_matrix.py::test_each_option_under_each_given_quant_level_trains_a_step_or_is_refused_in_one_line",
    # STAGE=dpo/kto: every test but the one-line refusals trains (or shares) a run
    "tests/training/test_preference_training.py::test_golden_dpo_losses_start_at_ln_2",
    "tests/training/test_preference_training.py::test_kto_under_a_tier_of_batch_1_plans_a_batch_of_2",
    "tests/training/test_preference_training.py::test_a_continued_sft_adapter_starts_at_ln_2_too",
    "tests/training/test_preference_training.py::test_the_reference_pass_is_the_model_it_stands_for",
    "tests/training/test_preference_training.py::test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_run",
    "tests/training/test_preference_training.py::test_a_resume_with_another_loss_or_start_is_refused_in_one_line",
    "tests/training/test_preference_training.py::test_the_saved_adapter_is_the_policy_alone",
    "tests/training/test_preference_training.py::test_predict_serve_and_merge_take_the_dpo_adapter",
    "tests/training/test_preference_training.py::test_every_loss_and_kto_trains_and_logs_rewards_or_is_refused_in_one_line",
    "tests/training/test_preference_training.py::test_a_continued_adapter_keeps_its_shape",
)


def pytest_collection_modifyitems(config, items):
    used = set()
    for item in items:
        for prefix in SLOW:
            if item.nodeid == prefix or item.nodeid.startswith(prefix + "::") or item.nodeid.startswith(prefix + "["):
                item.add_marker(pytest.mark.slow)
                used.add(prefix)
    files = {item.nodeid.split("::", 1)[0] for item in items}
    stale = [
        p
        for p in SLOW
        if p not in used
        and p.split("::", 1)[0] in files
        and "::" in p
        and not config.getoption("keyword")
        and not config.getoption("markexpr")
    ]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {', '.join(stale)}")


# ---- the checkout stays as it was -------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every file under the checkout but the venv, git and caches."""
    out: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


_EDITED_FILES = {
    "Makefile",
    "README.md",
    "CONTRIBUTING.md",
    "Dockerfile",
    "Dockerfile.cuda",
    "docker-compose.yml",
    "docker-compose.cuda.yml",
    "pyproject.toml",
    "requirements.txt",
    ".env.template",
    ".gitignore",
    ".dockerignore",
}


def _source(path: str) -> bool:
    """Code and docs a person edits (perhaps while the suite runs), not what a command writes."""
    top = path.split(os.sep, 1)[0]
    return path.endswith(".py") or path in _EDITED_FILES or top in ("app", "tests", "scripts", "configs", ".ci", "docs")


def _guard(request):
    before = _tree(REPO)
    yield
    after = _tree(REPO)
    changed = sorted(
        p
        for p in set(before) ^ set(after) | {p for p in set(before) & set(after) if before[p] != after[p]}
        if not _source(p)
    )
    if changed:
        pytest.fail(
            f"{request.node.nodeid} wrote into the checkout: {', '.join(changed[:8])}; write under "
            "tmp_path (monkeypatch.chdir(tmp_path)) instead",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _checkout_untouched(request):
    """Fail any test that writes into the checkout (models/.last_run, data/, a tiny model...): the
    suite must leave `git status` and the user's last run as they were. Edited source files are
    not counted (someone may be editing while the suite runs); new, deleted or changed others are."""
    yield from _guard(request)


@pytest.fixture(scope="module", autouse=True)
def _checkout_untouched_by_module_fixtures(request):
    """The same around each test file: its module-scoped fixtures (a trained run shared by its
    tests) are set up before any per-test guard starts looking."""
    yield from _guard(request)


# ---- the real data ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """../shared/data/duie-mixed, or a skip naming it; with REQUIRE_REAL_DATA=1 (CI) a failure instead."""
    if (REAL_DATA_DIR / "train.jsonl").is_file() and (REAL_DATA_DIR / "dev.jsonl").is_file():
        return REAL_DATA_DIR
    why = f"the real DuIE data is not beside this checkout ({REAL_DATA_DIR}/train.jsonl and dev.jsonl; CI provides it)"
    if os.environ.get("REQUIRE_REAL_DATA", "0") not in ("", "0"):
        pytest.fail(f"REQUIRE_REAL_DATA=1: {why}", pytrace=False)
    pytest.skip(why)


def _build(tmp_path_factory, name):
    from app.models.tiny import build_tiny_model

    return build_tiny_model(name, tmp_path_factory.mktemp("tiny-models") / name)


@pytest.fixture(scope="session")
def tiny_glm_dir(tmp_path_factory):
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return _build(tmp_path_factory, "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _build(tmp_path_factory, "tiny-llama")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def glm_tok(tiny_glm_dir):
    return _tokenizer(tiny_glm_dir)


@pytest.fixture(scope="session")
def qwen2_tok(tiny_qwen2_dir):
    return _tokenizer(tiny_qwen2_dir)


@pytest.fixture(scope="session")
def llama_tok(tiny_llama_dir):
    return _tokenizer(tiny_llama_dir)


@pytest.fixture
def memory_cgroup():
    """make(limit_mb) -> the path of a real child memory cgroup (v1 or v2, app.core.cgroups) with that
    limit, or None where this process may not create one (not root, no writable cgroupfs); tests then
    inject MEMORY_LIMIT_MB. A child process joins it by writing its pid to <dir>/cgroup.procs. Removed afterwards."""
    from app.core import cgroups

    made = []

    def make(limit_mb):
        cg = cgroups.create(limit_mb, prefix="cpu-trainer-test")
        if cg is not None:
            made.append(cg)
        return cg and cg.path

    yield make
    for cg in made:
        cg.remove()


# ---- the command line, in this process -----------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch, tmp_path, caplog, capsys):
    """main(argv) in this process, in tmp_path, with none of the shell's settings; returns
    (exit status, the ERROR lines, stderr). The same code path as `python -m app ...` without paying
    for a fresh torch import per call."""
    import logging

    import app.core.utils
    import app.training.signals
    from app.__main__ import main
    from app.config import Config

    monkeypatch.setattr(app.core.utils, "setup_logging", lambda *a, **k: None)  # keep pytest's log capture
    monkeypatch.setattr(app.training.signals, "install_cli_handlers", lambda: None)  # keep pytest's SIGTERM
    for var in Config.variables():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main(list(argv))
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert all(r.exc_info is None for r in errors)  # a message, not a logged traceback
        return code, [r.getMessage() for r in errors], capsys.readouterr().err

    return run


# ---- "byte-for-byte as it was" ----------------------------------------------------------------------------


def _snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under ``root`` but those under ``skip``:
    a changed, added or removed file shows."""
    import hashlib

    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(skip)
    }


@pytest.fixture
def snapshot():
    """snapshot(dir, skip=()) -> every file's hash and mtime, to compare before and after a command."""
    return _snapshot


def _without_root_override() -> None:
    """In the child, before exec: root keeps its uid but loses CAP_DAC_OVERRIDE (and READ_SEARCH),
    the capability that lets it read and write whatever the modes forbid."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; prctl(PR_CAPBSET_DROP) = 24
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def as_a_user():
    """preexec_fn for a child process that file modes bind as they bind a user: when the suite runs as
    root, the child drops root's override of them; otherwise nothing (None)."""
    return _without_root_override if os.geteuid() == 0 else None


# ---- `python -m app ...` as a real process -------------------------------------------------------------

HANG_GUARD_S = 300  # only so a broken run cannot hang the suite; never what a test asserts


def app_env(**extra: str) -> dict[str, str]:
    """The environment for a child `python -m app`: this checkout importable, none of the shell's settings
    (no setting's variable, no MAKEFLAGS: under `make test` its command-line variables would reach the
    child as settings), then ``extra`` set on top."""
    from app.config import Config

    env = {k: v for k, v in os.environ.items() if k not in Config.variables() and k != "MAKEFLAGS"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def make_app_env():
    """app_env itself (make_app_env(**extra) -> dict), for session- and module-scoped fixtures that start
    `python -m app` (the GPU tier's runs)."""
    return app_env


@pytest.fixture
def child_env() -> dict[str, str]:
    """app_env() for a test's own subprocess calls (a fresh dict: a test may change it)."""
    return app_env()


@pytest.fixture
def run_app(tmp_path):
    """run(argv, cwd=tmp_path, timeout=600, preexec_fn=None, **env) -> the CompletedProcess of
    `python -m app <argv>` run to its end in app_env(**env), stdout and stderr captured as text.
    The timeout is a hang guard only."""
    import subprocess
    import sys

    def run(argv, cwd=None, timeout=600, preexec_fn=None, **env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app", *map(str, argv)],
            cwd=cwd or tmp_path,
            env=app_env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=preexec_fn,
        )

    return run


# Set in each process app_process starts, with a value of its own: every process that one starts inherits it
# (the web UI's jobs and chat backend too), so what a test caused is found even after its parent has died.
MARK = "APP_TEST_MARK"
OUTLIVE_GUARD_S = 60  # how long a test's processes may take to end after it; a hang guard, not a timing


def marked_processes(mark: str) -> list[str]:
    """'pid command line' of every live process (zombies are not) whose environment holds MARK=<mark>."""
    needle, found = f"{MARK}={mark}".encode(), []
    for entry in os.scandir("/proc"):
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
            if needle in environ and Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                found.append(" ".join([entry.name, *(a.decode(errors="replace") for a in argv if a)]))
        except (OSError, IndexError):
            continue  # ended meanwhile, or another user's
    return found


class AppProcess:
    """`python -m app <argv>` started in ``cwd``, its stderr in ``log``; ``caused()``: it and what it started."""

    def __init__(self, argv: list[str], cwd: Path, log: Path, **popen):
        import subprocess
        import sys
        import uuid

        self.log, self.mark = log, uuid.uuid4().hex
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", *map(str, argv)],
                cwd=cwd,
                env=app_env(**{MARK: self.mark}),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                **popen,
            )
        self.pid = self.proc.pid

    def caused(self) -> list[str]:
        """'pid command line' of each live process it caused, itself included, orphans too."""
        return marked_processes(self.mark)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready) -> None:
        """Poll until ``ready()``; fail (with the log's tail) if the process ends first, or after HANG_GUARD_S."""
        import time

        deadline = time.monotonic() + HANG_GUARD_S
        while not ready():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) too early:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"still waiting after {HANG_GUARD_S}s:\n{self.text()[-3000:]}"
            time.sleep(0.02)

    def wait(self) -> int:
        return self.proc.wait(timeout=HANG_GUARD_S)


def _processes(default_dir: Path):
    started: list[AppProcess] = []

    def start(argv, cwd=None, log=None, **popen) -> AppProcess:
        started.append(AppProcess(argv, cwd or default_dir, log or default_dir / f"app-{len(started)}.log", **popen))
        return started[-1]

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
    left = _outliving(started)
    if left:
        pytest.fail(f"processes a test started outlived it (killed now): {'; '.join(left)}", pytrace=False)


def _outliving(started: list[AppProcess]) -> list[str]:
    """What the started processes caused that is still alive OUTLIVE_GUARD_S after they were ended: killed, named."""
    import signal
    import time

    deadline = time.monotonic() + OUTLIVE_GUARD_S
    while (left := [line for p in started for line in p.caused()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for line in left:
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except OSError:
            pass
    return left


@pytest.fixture
def app_process(tmp_path):
    """start(argv, cwd=tmp_path, log=None, **popen) -> AppProcess; whatever is still running at the end is killed,
    and the test fails if a process they started (a web UI's chat backend...) outlives them."""
    yield from _processes(tmp_path)


@pytest.fixture(scope="module")
def module_app_process(tmp_path_factory):
    """app_process for a test file's shared process (a server): killed when the file's tests are done."""
    yield from _processes(tmp_path_factory.mktemp("processes"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m app serve SETTINGS` on a free port through ``start`` (app_process / module_app_process), in
    ``work``, waited for until /health answers: its url, process, an openai client and JSON posts."""

    def __init__(self, start, work: Path, **settings):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [f"SERVE_PORT={self.port}", "NUM_THREADS=2", *(f"{k}={v}" for k, v in settings.items())]
        self.proc = start(["serve", *args], cwd=work, log=work / f"serve-{self.port}.log")
        self.proc.wait_for(self._up)

    def _up(self) -> bool:
        import httpx2 as httpx

        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, body, headers=None, **kw):
        import json

        import httpx2 as httpx

        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(
            self.url + path,
            content=content,
            headers={"content-type": "application/json", **(headers or {})},
            timeout=120,
            **kw,
        )


@pytest.fixture(scope="session")
def serve_process():
    """ServeProcess(start, work, **settings): a served model test_serve*.py talk to."""
    return ServeProcess


# ---- training runs: data, the golden recipe, what a run logged -------------------------------------------


def _write_dataset(out_dir: str | Path, n_train: int = 400, n_dev: int = 50, seed: int = 42) -> dict[str, Path]:
    import json

    from app.core.atomic import atomic_write_text
    from app.data.synthetic import generate_samples

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One call keeps the contexts unique across both splits, so train and dev never share one.
    samples = generate_samples(n_train + n_dev, seed=seed)
    paths = {"train": out / "train.jsonl", "dev": out / "dev.jsonl"}
    for name, rows in (("train", samples[:n_train]), ("dev", samples[n_train:])):
        atomic_write_text(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="session")
def write_dataset():
    """write_dataset(out_dir, n_train=400, n_dev=50, seed=42) -> {"train": path, "dev": path}: synthetic triplet
    records (app.data.synthetic) in out_dir's train.jsonl and dev.jsonl, contexts disjoint, each file written
    whole; the same seed gives the same bytes. Session-scoped, so fixtures of any scope can use it."""
    return _write_dataset


@pytest.fixture(scope="session")
def make_data(tmp_path_factory):
    """make(n_train=80, n_dev=10, seed=1) -> a fresh temp dir holding synthetic train.jsonl and dev.jsonl
    (write_dataset). Session-scoped, so module-scoped fixtures can use it too."""

    def make(n_train: int = 80, n_dev: int = 10, seed: int = 1) -> Path:
        d = tmp_path_factory.mktemp("data")
        _write_dataset(d, n_train=n_train, n_dev=n_dev, seed=seed)
        return d

    return make


@pytest.fixture(scope="module")
def data_dir(make_data):
    """The golden recipe's data: 80 train and 10 dev records (seed 1), one copy per test file (a test
    may add a file beside them)."""
    return make_data(n_train=80, n_dev=10, seed=1)


@pytest.fixture
def tiny_project(tmp_path, monkeypatch, tiny_glm_dir, make_data):
    """tmp_path as a project and the working dir: the tiny GLM at models/tiny-glm (MODEL_NAME=tiny finds it) and
    30 + 4 synthetic records in data/train.jsonl and data/dev.jsonl."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_glm_dir, tmp_path / "models" / "tiny-glm")
    shutil.copytree(make_data(n_train=30, n_dev=4), tmp_path / "data")
    return tmp_path


def _recipe(model_dir, data_dir, out_dir, **extra):
    from app.config import Config

    values = {
        "MODEL_NAME": str(model_dir),
        "DATA_PATH": str(data_dir / "train.jsonl"),
        "OUTPUT_DIR": str(out_dir),
        "MAX_SAMPLES": 40,
        "MAX_STEPS": 6,
        "BATCH_SIZE": 2,
        "GRAD_ACCUM": 2,
        "LEARNING_RATE": 1e-2,
        "WARMUP_RATIO": 0,
        "LOGGING_STEPS": 1,
        "EVAL_STEPS": 3,
        "SAVE_STEPS": 3,
        "MAX_SEQ_LEN": 256,
        "SEED": 0,
        "NUM_THREADS": 2,
        "QUANT_LEVEL": "none",
        "PRECISION": "fp32",
    }  # machine-independent goldens (auto is bf16 on CPUs that have it)
    values.update(extra)
    return Config.from_dict(values)


@pytest.fixture(scope="session")
def recipe():
    """recipe(model_dir, data_dir, out_dir, **extra) -> Config: the golden-loss recipe (6 steps of
    2 x 2 on 40 samples of data_dir, fp32, seed 0) whose per-step losses tests/training/test_train.py pins in
    GOLDEN_LOSSES; ``extra`` settings replace its own."""
    return _recipe


def _read_metrics(run) -> list[dict]:
    from app.training.metrics_file import read_metrics

    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()  # no file: an error here, not []
    rows = read_metrics(path)
    assert len(rows) == len(lines), f"{path}: {len(lines) - len(rows)} of {len(lines)} lines are not JSON rows"
    return rows


@pytest.fixture(scope="session")
def read_metrics():
    """read_metrics(run dir or metrics.jsonl) -> every logged row, in order: the app's own reader
    (app.training.metrics_file.read_metrics), but strict, as a finished run's log must be: a missing file
    or a line that is not a JSON row fails instead of being left out."""
    return _read_metrics


@pytest.fixture(scope="session")
def train_losses():
    """train_losses(run dir) -> {step: training loss} from its metrics.jsonl (eval rows left out)."""
    return lambda out_dir: {r["step"]: r["loss"] for r in _read_metrics(out_dir) if "loss" in r}


def _greedy_reference(model, tokenizer, messages, max_new_tokens):
    import torch

    from app.data.encode import prompt_text

    ids = tokenizer(prompt_text(tokenizer, messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="session")
def greedy_reference():
    """greedy_reference(model, tokenizer, messages, max_new_tokens) -> the greedy answer computed
    independently of generate(): the prompt rendered as in training, then one full forward pass per
    token (no KV cache, no padding), argmax, stop at an EOS token."""
    return _greedy_reference


# ---- the web UI: a project, the UI serving it, a real browser ---------------------------------------------


def _start_webui(start, settings: tuple[str, ...], cwd: Path | None) -> tuple[str, AppProcess]:
    """`python -m app webui` on a free port through ``start`` (app_process / module_app_process), waited for until
    its page answers: (its URL without the trailing slash, the process)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = start(["webui", f"WEBUI_PORT={port}", *settings], **({"cwd": cwd} if cwd else {}))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(url + "/", timeout=2).status == 200
        except OSError:
            return False

    process.wait_for(up)
    return url, process


@pytest.fixture
def start_webui(app_process):
    """start_webui(*settings, cwd=tmp_path) -> (url, AppProcess): the web UI serving ``cwd``, up and answering."""
    return lambda *settings, cwd=None: _start_webui(app_process, settings, cwd)


@pytest.fixture(scope="module")
def webui(tmp_path_factory, make_data, tiny_glm_dir, module_app_process):
    """A throw-away project (data/train.jsonl and dev.jsonl, models/tiny-glm) and `python -m app webui` serving
    it on a free port, for one test file: an object with .url, .project and .process."""
    import shutil
    import types

    project = tmp_path_factory.mktemp("webui-project")
    shutil.copytree(make_data(n_train=60, n_dev=8, seed=3), project / "data")
    shutil.copytree(tiny_glm_dir, project / "models" / "tiny-glm")
    url, process = _start_webui(module_app_process, (), project)
    return types.SimpleNamespace(url=url + "/", project=project, process=process)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium (Debian's `chromium` package; CHROMIUM=<path> to choose), or a skip naming it; with
    REQUIRE_BROWSER=1 (CI) a failure instead."""
    import shutil

    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    why = "no Chromium here for the browser tests (apt-get install chromium, or CHROMIUM=<path>)"
    if os.environ.get("REQUIRE_BROWSER", "0") not in ("", "0"):
        pytest.fail(f"REQUIRE_BROWSER=1: {why}", pytrace=False)
    pytest.skip(why)


def _learn_briefly(base: Path, steps: int) -> None:
    """Train the random model's every weight briefly on the synthetic triplet data, in place: a random model's
    next-token distribution is nearly flat, so rounding decides its argmax, which says nothing of a GGUF's
    quality; a model that has learnt something is peaked, as the models users export are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.data.encode import prompt_text
    from app.data.synthetic import generate_samples

    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    texts = [
        prompt_text(tok, [{"role": "user", "content": s["context"]}]) + s["target"] + tok.eos_token
        for s in generate_samples(64, seed=1)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for step in range(steps):
        batch = tok(
            [texts[(step * 4 + i) % len(texts)] for i in range(4)],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(base)


@pytest.fixture(scope="session")
def learn_briefly():
    """learn_briefly(model_dir, steps): a random tiny model's every weight trained briefly in place (the GGUF
    parity and serve tests: a flat distribution would let rounding pick the argmax)."""
    return _learn_briefly


@pytest.fixture(scope="session")
def llamacpp() -> None:
    """llama.cpp's binding and converter (`make setup-gguf`), or a skip naming them; with REQUIRE_GGUF=1 (CI)
    a failure instead."""
    from app.inference.llamacpp import missing

    why = missing("these tests")
    if why is None:
        return
    if os.environ.get("REQUIRE_GGUF", "0") not in ("", "0"):
        pytest.fail(f"REQUIRE_GGUF=1: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """tests/artifacts/: where a test leaves what people should look at (screenshots); ignored by git."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# ---- a small disk, for the full-disk tests -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a fresh tmpfs of ``size`` (e.g. "2m") mounted under tmp_path, unmounted after the
    test; a skip naming why where mounting is not allowed (it needs root), a failure instead under
    REQUIRE_TMPFS=1 (CI, which runs as root)."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            why = f"cannot mount a {size} tmpfs to fill (needs root): {proc.stderr.strip() or proc.returncode}"
            if os.environ.get("REQUIRE_TMPFS", "0") not in ("", "0"):
                pytest.fail(f"REQUIRE_TMPFS=1: {why}", pytrace=False)
            pytest.skip(why)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def kill_9_while_saving() -> str:
    """A `python -c` script: `python -m app <argv>` that SIGKILLs itself (kill -9: no handler runs, nothing is
    flushed) while the step-6 checkpoint is half-written: the adapter is saved, the optimizer state not yet."""
    return """
import os, signal, sys
import transformers
save = transformers.Trainer._save_optimizer_and_scheduler
def dying(self, output_dir):
    if self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, output_dir)
transformers.Trainer._save_optimizer_and_scheduler = dying
from app.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


# ---- the serve engine in process, with jobs staged at known steps (test_serve.py, test_serve_llamacpp.py) ----


class _Staged:
    """An in-process engine on a tiny model, and jobs run on it; each event as (job, kind, ...), in the worker's
    order."""

    def __init__(self, model_dir: Path, root: Path, **settings):
        from app import Config
        from app.serve.engine import Engine
        from app.serve.model_pool import ServedModels

        cfg = Config.from_dict({"MODEL_NAME": str(model_dir), "ADAPTERS": "none", "NUM_THREADS": 2, **settings})
        self.models = ServedModels(cfg, root=root)
        self.engine = Engine(self.models, 32, cfg.serve.serve_batch_size, 0.0)

    def prompt(self, text: str) -> list[int]:
        from app.data.encode import prompt_text

        tok = self.models.tokenizer_for(None)
        return tok(prompt_text(tok, [{"role": "user", "content": text}]), add_special_tokens=False)["input_ids"]

    def run(self, jobs: list[tuple], after: list[int], hook=None) -> list[tuple]:
        """Submit jobs[0] (adapter, prompt ids, max_tokens); jobs[k] from the worker itself once ``after[k]``
        events were emitted in all, so it waits for a known step (the next); ``hook(events)`` after each event."""
        import threading

        from app.serve.engine import Job

        events: list[tuple] = []
        ended = threading.Event()

        def submit(k):
            events.append((k, "submitted"))
            self.engine.submit(Job(jobs[k][0], jobs[k][1], jobs[k][2], emit(k)))

        def emit(k):
            def one(event):
                events.append((k, *event))
                for j in range(1, len(jobs)):
                    if after[j] == sum(e[1] != "submitted" for e in events):
                        submit(j)
                if hook:
                    hook(events)
                if sum(e[1] in ("done", "error") for e in events) == len(jobs):
                    ended.set()

            return one

        submit(0)
        assert ended.wait(300), events  # a hang guard only
        return events

    def close(self) -> None:
        self.engine.stop()


def _answers(events: list[tuple]) -> dict[int, tuple]:
    return {
        k: (
            "".join(e[2] for e in events if e[:2] == (k, "delta")),
            next(e[1:] for e in events if e[0] == k and e[1] in ("done", "error")),
        )
        for k in sorted({e[0] for e in events})
    }


def _joined(events: list[tuple]) -> dict[int, bool]:
    """For each job submitted while others generated: whether it answered before the last of those had ended
    (it joined their batch) or only after (it waited for the batch to end)."""
    ends = {e[0]: i for i, e in enumerate(events) if e[1] in ("done", "error")}
    out = {}
    for i, (k, kind, *_) in enumerate(events):
        running = {e[0] for e in events[:i] if e[1] == "delta"} - {e[0] for e in events[:i] if e[1] in ("done",)}
        if kind == "submitted" and running:
            first = next(j for j, e in enumerate(events) if e[0] == k and e[1] != "submitted")
            out[k] = first < max(ends[r] for r in running)
    return out


@pytest.fixture
def serve_staging():
    """``Staged(model_dir, root, **settings)``: an in-process serve engine that runs staged jobs; ``answers`` and
    ``joined`` read its events."""
    from types import SimpleNamespace

    return SimpleNamespace(Staged=_Staged, answers=_answers, joined=_joined)
