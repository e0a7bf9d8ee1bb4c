"""Your folders are safe on the way out too (issue 28): a folder the tool writes into is new, empty, or marked
as its own; some are refused whatever they hold; `remove-run` deletes only what its run's manifest lists; the
last-run pointer never names a run that is gone. Every case compares the user's files byte for byte."""

import json
import os
from pathlib import Path

import pytest

from app.core import ownership

# QUANT_LEVEL left to the tier, as a user leaves it (8bit for tiny on 12-24 GB, 4bit below)
RUN_ARGS = (
    "MODEL_NAME=tiny",
    "MAX_STEPS=1",
    "MAX_SAMPLES=12",
    "MAX_SEQ_LEN=64",
    "EVAL_STEPS=1",
    "SAVE_STEPS=1",
    "NUM_THREADS=1",
)


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "README.md").write_text("# my notes\n不要删除\n", encoding="utf-8")
    (path / "keep.jsonl").write_text('{"prompt": "mine", "response": "mine"}\n', encoding="utf-8")
    return path


@pytest.fixture
def project(tiny_project):
    return tiny_project


def test_training_into_a_folder_of_yours_is_refused_and_changes_nothing(project, cli, snapshot):
    mine = _user_folder(project / "mine")
    before = snapshot(project, skip=("models/tiny-glm",))
    code, errors, _ = cli("train", *RUN_ARGS, "OUTPUT_DIR=mine")
    assert code == 2 and len(errors) == 1, errors
    assert "OUTPUT_DIR=mine holds files this tool did not write (README.md, keep.jsonl)" in errors[0]
    assert "choose another OUTPUT_DIR, e.g. OUTPUT_DIR=models/tiny-lora" in errors[0]
    assert snapshot(project, skip=("models/tiny-glm",)) == before and sorted(os.listdir(mine)) == [
        "README.md",
        "keep.jsonl",
    ]


@pytest.mark.parametrize(
    "out, why",
    [
        ("data", "the project's data/ folder"),
        (".", "the project's root folder"),
        ("models", "the project's models/ folder"),
        ("/", "the filesystem root"),
        ("~", "your home directory"),
        ("models/tiny-glm", "the folder that is MODEL_NAME=tiny"),
        ("sets", "the folder that holds VAL_PATH=sets/val/v.jsonl"),
    ],
)
def test_folders_that_are_refused_whatever_they_hold(project, cli, snapshot, out, why):
    (project / "sets" / "val").mkdir(parents=True)
    (project / "sets" / "val" / "v.jsonl").write_text((project / "data" / "dev.jsonl").read_text("utf-8"), "utf-8")
    before = snapshot(project)
    home = Path.home()
    home_before = sorted(os.listdir(home)) if out == "~" else None
    code, errors, _ = cli("train", *RUN_ARGS, f"OUTPUT_DIR={out}", "VAL_PATH=sets/val/v.jsonl")
    assert code == 2 and any(why in e for e in errors), errors
    assert snapshot(project) == before
    if home_before is not None:
        assert sorted(os.listdir(home)) == home_before


def test_an_empty_folder_of_the_project_is_still_refused_outright(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert ownership.refused_why("data", {}) == "the project's data/ folder (your data files)"
    assert ownership.refused_why("data/../data", {}) is not None  # however it is spelled
    (tmp_path / "link").symlink_to(tmp_path / "data")
    assert ownership.refused_why("link", {}) is not None
    assert ownership.refused_why("data/run", {"DATA_PATH=x": "data/train.jsonl"}) is None  # beside it: fine
    assert (
        ownership.refused_why(tmp_path / "corpus", {"DATA_PATH=x": "corpus/a/b.jsonl"})
        == "the folder that holds DATA_PATH=x (what this command reads)"
    )


def test_a_train_then_remove_run_leaves_exactly_the_users_files(project, cli, snapshot, caplog):
    """The issue's reproduction: a run in a folder, then a file of yours put beside it; remove-run takes the
    run's files only, names yours, and the folder stays for them."""
    code, errors, _ = cli("train", *RUN_ARGS, "OUTPUT_DIR=models/run")
    assert code == 0, errors
    run = project / "models" / "run"
    listed = set(ownership.read_marker(run)["entries"])
    assert {"adapter_model.safetensors", "summary.json", "metrics.jsonl", "checkpoints"} <= listed
    assert set(os.listdir(run)) - {ownership.MARKER} <= listed  # every file the run left is listed
    data = snapshot(project / "data")
    code, errors, _ = cli("merge", "ADAPTER_DIR=models/run", "MERGED_DIR=data")
    assert code == 2 and errors == [
        "MERGED_DIR=data is the project's data/ folder (your data files); this tool "
        "writes only into a folder of its own: choose another MERGED_DIR"
    ], errors
    assert snapshot(project / "data") == data
    assert cli("merge", "ADAPTER_DIR=models/run")[0] == 0  # merged/ inside the run: the run's, listed
    listed = set(ownership.read_marker(run)["entries"])
    assert "merged" in listed
    (run / "keep.jsonl").write_text("mine\n", encoding="utf-8")
    (run / "notes").mkdir()
    (run / "notes" / "a.txt").write_text("mine too\n", encoding="utf-8")
    yours = snapshot(run, skip=tuple(listed) + (ownership.MARKER,))
    code, errors, _ = cli("remove-run", "OUTPUT_DIR=models/run")
    assert code == 0, errors
    assert sorted(os.listdir(run)) == ["keep.jsonl", "notes"] and snapshot(run) == yours
    assert "kept keep.jsonl, notes/ in models/run: not written by this tool" in caplog.text
    code, errors, _ = cli("train", *RUN_ARGS, "OUTPUT_DIR=models/run2")
    assert code == 0, errors
    assert cli("remove-run", "OUTPUT_DIR=models/run2")[0] == 0
    assert not (project / "models" / "run2").exists()  # nothing of yours there: the folder goes too


def test_remove_run_of_a_folder_an_older_version_trained_into(tmp_path, cli, snapshot):
    """Before the marker, `train OUTPUT_DIR=<your folder>` wrote the run among your files; remove-run now takes
    the names a run writes and keeps the rest."""
    folder = _user_folder(tmp_path / "mine")
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n", encoding="utf-8")  # the old run's card
    (folder / "train_config.json").write_text(json.dumps({"MODEL_NAME": "tiny", "OUTPUT_DIR": str(folder)}))
    for name in ("summary.json", "adapter_config.json", "tokenizer.json"):
        (folder / name).write_text("{}", encoding="utf-8")
    (folder / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    keep = snapshot(
        folder,
        skip=("README.md", "train_config.json", "summary.json", "adapter_config.json", "tokenizer.json", "checkpoints"),
    )
    code, errors, _ = cli("remove-run", f"OUTPUT_DIR={folder}")
    assert code == 0, errors
    assert snapshot(folder) == keep and sorted(os.listdir(folder)) == ["keep.jsonl"]


def test_a_folder_that_only_looks_like_a_run_by_its_names_stays_yours(tmp_path, cli, snapshot):
    """Names alone never make a folder the tool's: your README.md, summary.json and checkpoints/ are not an
    older version's run (no train_config.json naming MODEL_NAME and OUTPUT_DIR, no sealed checkpoint)."""
    mine = _user_folder(tmp_path / "mine")
    (mine / "summary.json").write_text('{"my": "summary"}', encoding="utf-8")
    (mine / "checkpoints" / "epoch-1").mkdir(parents=True)
    (mine / "checkpoints" / "epoch-1" / "weights.bin").write_bytes(b"mine")
    before = snapshot(tmp_path)
    assert ownership.kind_of(mine) is None and ownership.foreign_entries(mine) == sorted(os.listdir(mine))
    code, errors, _ = cli("remove-run", f"OUTPUT_DIR={mine}")
    assert code == 2 and "is not a run this tool wrote" in errors[0], errors
    assert snapshot(tmp_path) == before


def test_remove_run_of_an_older_run_keeps_a_readme_that_is_not_its_model_card(tmp_path, cli):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train_config.json").write_text(json.dumps({"MODEL_NAME": "tiny", "OUTPUT_DIR": "mine"}))
    (folder / "README.md").write_text("# my notes\n", encoding="utf-8")  # a run killed before its card
    assert cli("remove-run", f"OUTPUT_DIR={folder}")[0] == 0
    assert os.listdir(folder) == ["README.md"] and (folder / "README.md").read_text() == "# my notes\n"


def test_remove_run_refuses_what_is_not_a_run(tmp_path, cli, snapshot):
    mine = _user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    code, errors, _ = cli("remove-run")
    assert code == 2 and "OUTPUT_DIR is not set" in errors[0]
    code, errors, _ = cli("remove-run", f"OUTPUT_DIR={mine}")
    assert code == 2 and errors == [
        f"OUTPUT_DIR={mine} is not a run this tool wrote (no {ownership.MARKER}, no "
        "train_config.json); nothing removed. Delete it yourself if you mean it"
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train_config.json").write_text("{}")  # an old version trained into data/
    before = snapshot(tmp_path)
    code, errors, _ = cli("remove-run", "OUTPUT_DIR=data")
    assert code == 2 and "the project's data/ folder" in errors[0]
    assert snapshot(tmp_path) == before


def _fake_run(path: Path, age_s: float) -> Path:
    ownership.claim(path, "train")
    ownership.register(path, ["adapter_config.json", "summary.json"])
    (path / "adapter_config.json").write_text("{}")
    (path / "summary.json").write_text("{}")
    t = (path / "summary.json").stat().st_mtime - age_s
    os.utime(path / "summary.json", (t, t))
    return path


def test_the_last_run_pointer_moves_to_the_newest_remaining_run(tmp_path, cli, caplog):
    from app.models.run_dirs import last_run

    os.chdir(tmp_path)
    old, newer, last = (_fake_run(Path("models") / n, age) for n, age in (("old", 300), ("newer", 100), ("last", 0)))
    Path("models/.last_run").write_text("models/last\n")
    assert cli("remove-run", "OUTPUT_DIR=models/last")[0] == 0
    assert last_run() == newer and "now use the newest remaining run, models/newer" in caplog.text
    import shutil

    shutil.rmtree(newer)  # deleted by hand: the next command that needs the last run moves the pointer too
    from app.config import Config
    from app.models.artifacts import find_adapter

    assert find_adapter(Config.load(env={}, dotenv_path=None)) == old and last_run() == old
    assert cli("remove-run", "OUTPUT_DIR=models/old")[0] == 0
    assert last_run() is None and "no trained run is left under models/: train first" in caplog.text
    code, errors, _ = cli("predict")
    assert code == 2 and errors[0].startswith("no trained run to use: ADAPTER_DIR is not set"), errors


def test_the_default_output_dir_tells_runs_on_different_data_apart():
    from app.config import Config

    def out(**values):
        return Config.load(overrides={"MODEL_NAME": "tiny", **values}, env={}, dotenv_path=None).train.output_dir

    assert out() == "models/tiny-lora" == out(DATA_PATH="data/train.jsonl")
    assert out(DATA_PATH="mine/train.json") == "models/tiny-lora-mine-train"
    assert out(DATA_PATH="data/alpaca_zh.json", METHOD="qlora") == "models/tiny-qlora-alpaca_zh"
    assert out(DATA_PATH="/home/用户/语料/训练.jsonl") == "models/tiny-lora-语料-训练"
    assert out(DATA_PATH="mine/train.json", OUTPUT_DIR="models/x") == "models/x"


def test_marker_lists_a_run_and_foreign_entries_are_the_rest(tmp_path):
    run = tmp_path / "r"
    ownership.claim(run, "train")
    ownership.register(run, ["summary.json", "runs"])
    for name in ("summary.json", "notes.txt", ".staging.x1", ownership.RUN_LOCK):
        (run / name).write_text("x")
    assert ownership.foreign_entries(run) == ["notes.txt"]
    assert json.loads((run / ownership.MARKER).read_text())["kind"] == "train"
    assert "is this tool's train folder, not a token-cache folder" in ownership.write_problem(
        run, "CACHE_DIR", "token-cache"
    )


def test_a_token_cache_dir_holding_your_files_is_refused(project, cli, snapshot):
    (project / "mine" / "tokens").mkdir(parents=True)
    (project / "mine" / "tokens" / "list.txt").write_text("mine\n", encoding="utf-8")
    before = snapshot(project)
    code, errors, _ = cli("train", *RUN_ARGS, "MAX_SAMPLES=all", "CACHE_DIR=mine", "OUTPUT_DIR=models/c")
    assert code == 2 and errors == [
        "CACHE_DIR=mine/tokens holds files this tool did not write (list.txt); it "
        f"writes only into a new or empty folder, or one it made (marked by "
        f"{ownership.MARKER}): choose another CACHE_DIR, or move those files away"
    ]
    assert snapshot(project) == before
    code, errors, _ = cli("train", *RUN_ARGS, "MAX_SAMPLES=all", "OUTPUT_DIR=models/c")  # the default CACHE_DIR
    assert code == 0, errors
    tokens = project / "models" / ".cache" / "tokens"
    assert ownership.kind_of(tokens) == "token-cache" and not ownership.foreign_entries(tokens)


# ---- every place that writes or deletes, and what keeps it off your files ----------------------------------
# A module that writes or deletes files names here what keeps it off a user's files, and the test that checks it
# (byte for byte). A new writer fails test_every_writer_is_accounted_for until it is listed: "anything added later".
WRITERS = {
    "app.cli.demo": "make demo: its own DEMO_DIR and bench/ report; sample files refused unless the tool wrote them "
    "(core.generated; tests/cli/test_demo.py)",
    "app.cli.reference": "`python -m app docs`: the generated docs pages (tests/config/test_docs.py)",
    "app.cli.removal": "remove-run: only the entries its manifest lists (this file)",
    "app.cli.workspace": "sample data and clean: only files recorded with their hash (tests/cli/test_workspace.py)",
    "app.config.settings": "Config.save: train_config.json inside a run dir (this file)",
    "app.core.atomic": "the primitives: atomic writes, built_whole, staged_dir, replace_dir (refuses a folder "
    "without its marker: tests/cli/test_faults.py)",
    "app.core.cgroups": "a child memory cgroup under /sys/fs/cgroup (tests/plan/test_memory_monitor.py)",
    "app.core.generated": "the .generated.json record beside files the tool wrote",
    "app.core.ownership": "the marker of a folder it may write (this file)",
    "app.data.cache": "CACHE_DIR/tokens: new, empty or the tool's (this file)",
    "app.data.cache_build": "a cache key's folder inside CACHE_DIR/tokens",
    "app.evaluation.reports": "evaluate's report folder: new, empty or the tool's (this file)",
    "app.inference.export": "ONNX_DIR: replace_dir with onnx_export.json, refused folders (this file)",
    "app.inference.gguf_export": "GGUF_DIR: replace_dir with gguf_info.json, refused folders; the merged model and "
    "logs only inside the new export (tests/inference/test_gguf_export.py)",
    "app.inference.gguf_files": "the Modelfile, README and generation_config.json inside the new export",
    "app.inference.merge": "MERGED_DIR: replace_dir with merge_info.json, refused folders (this file)",
    "app.inference.predict": "predict-file's OUTPUT_FILE: new, or the tool's own unchanged output (this file)",
    "app.models.loading": "PiSSA/OLoRA's initial adapter in a temp dir of its own",
    "app.models.run_dirs": "models/.last_run, the tool's pointer (this file)",
    "app.models.tiny": "models/tiny-* built whole (tests/cli/test_workspace.py)",
    "app.serve.engine": None,  # list.remove: no file
    "app.serve.gguf": "<adapter>/gguf-lora: replace_dir with lora_info.json, refused folders, listed in the run's "
    "manifest (tests/serve/test_serve_llamacpp.py)",
    "app.training.callbacks": "best/ and the loss plot inside the run dir",
    "app.training.checkpoints": "checkpoints/ inside the run dir",
    "app.training.outputs": "the finished run's files inside the run dir (this file)",
    "app.training.runlock": "the run's lock file, deleted when done",
    "app.training.train": "OUTPUT_DIR: new, empty or the tool's (this file)",
    "app.training.trainer": "a checkpoint's settings inside checkpoints/",
    "app.webui.jobs": "the web UI's job logs under models/.webui (tests/webui/test_webui.py)",
    "app.webui.paths": "uploads: only new names in data/ (tests/webui/test_webui.py)",
}
_WRITE_CALLS = {
    "mkdir",
    "write_text",
    "write_bytes",
    "atomic_write_text",
    "write_json",
    "save_pretrained",
    "savefig",
    "replace_dir",
    "staged_dir",
    "built_whole",
    "mkstemp",
    "mkdtemp",
    "rmtree",
    "unlink",
    "copyfile",
    "copytree",
    "rmdir",
    "symlink_to",
}
_OS_CALLS = {"replace", "rename", "remove", "unlink", "rmdir"}


def _writers() -> dict[str, set[str]]:
    import ast

    app = Path(__file__).resolve().parents[2] / "app"
    found: dict[str, set[str]] = {}
    for path in sorted(app.rglob("*.py")):
        calls = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            on_os = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in ("os", "shutil")
            mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
            if (
                name in _WRITE_CALLS
                or (on_os and name in _OS_CALLS)
                or (name == "open" and isinstance(mode, str) and set(mode) & set("wax"))
            ):
                calls.add(name)
        if calls:
            found[".".join(path.relative_to(app.parent).with_suffix("").parts)] = calls
    return found


def test_every_writer_is_accounted_for():
    found = _writers()
    new = {m: sorted(c) for m, c in found.items() if m not in WRITERS}
    assert not new, f"modules that write or delete files, not in WRITERS with what keeps them off your files: {new}"
    stale = [m for m, why in WRITERS.items() if why and m not in found]
    assert not stale, f"WRITERS lists modules that no longer write: {stale}"


def test_predict_file_and_evaluate_write_only_where_they_may(project, cli, snapshot):
    """predict-file's OUTPUT_FILE: new, or this tool's own output unchanged since; evaluate's report folder: new,
    empty or the tool's. Anything of yours there is refused before a model loads, and stays byte for byte."""
    from app.core import generated

    assert cli("train", *RUN_ARGS, "OUTPUT_DIR=models/run")[0] == 0
    mine = project / "data" / "dev.pred.jsonl"
    mine.write_text("my own predictions\n", encoding="utf-8")
    before = snapshot(project / "data")
    code, errors, err = cli("predict-file", "INPUT_FILE=data/dev.jsonl")
    assert code == 2 and errors == [
        "OUTPUT_FILE=data/dev.pred.jsonl exists and this tool did not write it (or it "
        "was changed since); it is never replaced: choose another OUTPUT_FILE, or move "
        "that file away"
    ], errors
    assert "Loading weights" not in err and snapshot(project / "data") == before
    mine.unlink()
    assert cli("predict-file", "INPUT_FILE=data/dev.jsonl")[0] == 0  # new: written, recorded as the tool's
    assert generated.is_unchanged(mine, generated.PREDICTIONS)
    assert cli("predict-file", "INPUT_FILE=data/dev.jsonl")[0] == 0  # its own, unchanged: replaced
    mine.write_text(mine.read_text(encoding="utf-8") + "my note\n", encoding="utf-8")  # now it is yours
    assert cli("predict-file", "INPUT_FILE=data/dev.jsonl")[0] == 2 and mine.read_text().endswith("my note\n")

    notes = _user_folder(project / "notes")
    before = snapshot(notes)
    code, errors, err = cli("evaluate", "EVAL_DIR=notes", "EVAL_SAMPLES=2")
    assert code == 2 and errors[0].startswith(
        "EVAL_DIR=notes holds files this tool did not write (README.md, keep.jsonl)"
    ), errors
    assert "Loading weights" not in err and snapshot(notes) == before
    code, errors, _ = cli("evaluate", "EVAL_SAMPLES=2")
    assert code == 0, errors
    run = project / "models" / "run"
    assert ownership.kind_of(run / "eval") == "evaluate" and "eval" in ownership.read_marker(run)["entries"]
    old = project / "old-eval"  # reports an older version wrote, without the marker: still the tool's
    old.mkdir()
    (old / "report.json").write_text('{"n_samples": 2}', encoding="utf-8")
    for name in ("report.md", "predictions.jsonl"):
        (old / name).write_text("", encoding="utf-8")
    assert cli("evaluate", "EVAL_DIR=old-eval", "EVAL_SAMPLES=2")[0] == 0
