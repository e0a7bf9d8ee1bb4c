"""A user's files are sacred: train never writes next to a DATA_PATH of yours, generate-data never
replaces your file, clean removes only what the tool made and can remake, and a trained run goes
only when you name it (issue 14, items 1 and 2)."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from app.cli.workspace import MANIFEST, clean, clean_plan, ensure_default_data, write_sample_data
from app.config import Config
from app.core.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _user_file(path: Path, n: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"context": f"问题{i}：张三是谁？\nAnswer: ", "target": f"答案{i}"}, ensure_ascii=False) + "\n"
            for i in range(n)
        ),
        encoding="utf-8",
    )
    return path


def test_train_on_a_user_file_never_changes_it_or_writes_beside_it(tmp_path, tiny_glm_dir, run_app):
    """The issue's reproduction: `make train DATA_PATH=mine/train.jsonl` in a checkout with no data/."""
    mine = _user_file(tmp_path / "mine" / "train.jsonl")
    before = _digest(tmp_path / "mine")
    proc = run_app(
        [
            "train",
            "DATA_PATH=mine/train.jsonl",
            f"MODEL_NAME={tiny_glm_dir}",
            "MAX_STEPS=1",
            "TIER=none",
            "OUTPUT_DIR=out",
            "SAVE_STEPS=100",
            "EVAL_STEPS=100",
            "MAX_NEW_TOKENS=4",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(tmp_path / "mine") == before  # same bytes, and no dev.jsonl or manifest appeared
    assert not (tmp_path / "data").exists()  # no sample data anywhere else either
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert len(mine.read_text(encoding="utf-8").splitlines()) == 30


def test_default_data_path_missing_gets_the_sample_data_once_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cfg = Config.load(env={}, dotenv_path=None)
    with caplog.at_level("WARNING"):
        ensure_default_data(cfg)
    train, dev = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "dev.jsonl"
    assert len(train.read_text(encoding="utf-8").splitlines()) == 400 and dev.is_file()
    assert any(
        "DATA_PATH=data/train.jsonl did not exist" in r.message and "sample data" in r.message for r in caplog.records
    )
    # a user's edit since then is kept: nothing is rewritten while the file exists
    train.write_text(train.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    edited = train.read_bytes()
    ensure_default_data(cfg)
    assert train.read_bytes() == edited


def test_default_data_path_given_explicitly_is_only_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ensure_default_data(Config.load(overrides={"DATA_PATH": "data/train.jsonl"}, env={}, dotenv_path=None))
    assert not (tmp_path / "data").exists()


def test_missing_user_data_path_is_an_error_not_sample_data(tmp_path, run_app):
    proc = run_app(["train", "DATA_PATH=mine/train.jsonl", "MODEL_NAME=tiny"])
    assert proc.returncode == 2
    assert "DATA_PATH=mine/train.jsonl: no such file" in proc.stderr
    assert not (tmp_path / "mine").exists() and not (tmp_path / "data").exists()


def test_generate_data_refuses_to_replace_a_user_file(tmp_path, run_app):
    mine = _user_file(tmp_path / "mine" / "train.jsonl")
    before = _digest(tmp_path / "mine")
    proc = run_app(["generate-data", "DATA_PATH=mine/train.jsonl"])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "mine/train.jsonl" in errors[0] and "REPLACE_DATA=1" in errors[0], proc.stderr
    assert _digest(tmp_path / "mine") == before  # not even dev.jsonl was written
    # asked explicitly: replaced
    assert run_app(["generate-data", "DATA_PATH=mine/train.jsonl", "REPLACE_DATA=1"]).returncode == 0
    assert len(mine.read_text(encoding="utf-8").splitlines()) == 400


def test_generate_data_rewrites_its_own_unchanged_files(tmp_path):
    first = write_sample_data(tmp_path / "d" / "train.jsonl", seed=1)
    assert [p.name for p in first] == ["train.jsonl", "dev.jsonl"]
    again = write_sample_data(tmp_path / "d" / "train.jsonl", seed=2)  # unchanged sample data: the tool's own
    assert len(again) == 2
    (tmp_path / "d" / "dev.jsonl").write_text("mine\n", encoding="utf-8")
    with pytest.raises(UserError, match="dev.jsonl exists and is not sample data"):
        write_sample_data(tmp_path / "d" / "train.jsonl", seed=3)
    assert (tmp_path / "d" / "dev.jsonl").read_text(encoding="utf-8") == "mine\n"


def _fake_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    (path / "summary.json").write_text("{}")
    return path


def test_clean_removes_only_what_the_tool_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_sample_data(Path("data/train.jsonl"))
    write_sample_data(Path("data/other/train.jsonl"))
    Path("data/other/train.jsonl").write_text("edited by the user\n", encoding="utf-8")  # now the user's
    mine = _user_file(Path("data/mine.jsonl"))
    for name in ("tiny-glm", "tiny-qwen2"):
        (Path("models") / name).mkdir(parents=True)
        (Path("models") / name / "config.json").write_text("{}")
    run = _fake_run(Path("models/lora-adapter"))
    user_model = Path("models/tiny-mine")  # a user's model whose name merely starts with tiny
    user_model.mkdir()
    (user_model / "config.json").write_text("{}")
    keep_before = {p: _digest(p) for p in (run, user_model)}

    remove, kept = clean_plan(Path("."))
    remove = [p for p in remove if p.name != "__pycache__"]
    assert sorted(map(str, remove)) == sorted(
        ["models/tiny-glm", "models/tiny-qwen2", "data/train.jsonl", "data/dev.jsonl", "data/other/dev.jsonl"]
    )
    assert any("data/other/train.jsonl" in k and "changed" in k for k in kept)
    assert any("models/lora-adapter" in k and "remove-run" in k for k in kept)
    clean(Path("."))
    assert not Path("models/tiny-glm").exists() and not Path("data/train.jsonl").exists()
    assert Path("data/other/train.jsonl").read_text(encoding="utf-8") == "edited by the user\n"
    assert mine.is_file() and {p: _digest(p) for p in (run, user_model)} == keep_before
    assert not Path("data", MANIFEST).exists()  # nothing left to record there
    assert json.loads(Path("data/other", MANIFEST).read_text()).keys() == {"train.jsonl"}


def test_make_clean_is_the_same_python_clean(tmp_path, run_app):
    """`make clean` calls `python -m app clean` (no rm -rf of fixed paths in the Makefile)."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = text.split("\nclean:", 1)[1].split("\n\n", 1)[0]
    assert "-m app clean" in recipe and "rm -rf" not in recipe
    proc = subprocess.run(["make", "-n", "-C", str(REPO), "clean", "RUNTIME=local"], capture_output=True, text=True)
    assert "-m app clean" in proc.stdout
    _fake_run(tmp_path / "models" / "lora-adapter")
    (tmp_path / "data").mkdir()
    _user_file(tmp_path / "data" / "train.jsonl")  # no manifest: the user's, whatever its name
    before = _digest(tmp_path)
    assert run_app(["clean"]).returncode == 0
    assert _digest(tmp_path) == before


def test_make_train_and_compose_write_no_sample_data_themselves():
    """The old `train: setup data` rule ran generate-data beside any DATA_PATH whenever data/train.jsonl
    was missing (so did compose's setup service): only the app decides, from DATA_PATH."""
    for target in ("train", "info"):
        proc = subprocess.run(
            [
                "make",
                "-n",
                "-o",
                ".venv/.installed",
                "-C",
                str(REPO),
                target,
                "DATA_PATH=mine/train.jsonl",
                "RUNTIME=local",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"-m app {target}" in proc.stdout and "generate-data" not in proc.stdout, proc.stdout
    compose = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    assert "generate-data" not in compose


def test_clean_removes_the_token_cache_and_nothing_else_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = Path("models/.cache/tokens/0123456789abcdef01234567")
    cache.mkdir(parents=True)
    (cache / "ids").write_bytes(b"\0" * 8)
    (cache / "meta.json").write_text("{}")  # a complete cache an older version built (no folder marker)
    note = Path("models/.cache/notes.txt")  # not the tool's
    note.write_text("mine", encoding="utf-8")
    clean(Path("."))
    assert not Path("models/.cache/tokens").exists() and note.read_text(encoding="utf-8") == "mine"
