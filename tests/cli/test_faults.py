"""Faults a real user meets (issue 15), the companion of the bad-input matrix (test_bad_input.py).
Each case ends with a non-zero exit and ONE line that names the file or setting and the fix, no
traceback, and every earlier output left byte-for-byte as it was:
- damaged files in a run, a merge, an ONNX export or a local model, in every command that reads them;
- kill -9 of merge / export-onnx: no half-written dir is ever loaded;
- a second run (or merge, export, remove-run, clean) while a run writes its OUTPUT_DIR;
- a resume that asks for other settings, or for fewer steps than the checkpoint has;
- a stop signal while the data loads.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import Config, FineTuner, UserError
from app.training.checkpoints import CHECKPOINTS, MARKER
from app.training.resume import SETTINGS_FILE
from app.training.runlock import LOCK_FILE, hold, holder


@pytest.fixture(scope="module")
def lora_run(tiny_glm_dir, tmp_path_factory, write_dataset):
    """A finished 2-step LoRA run on the tiny GLM, and the data it was trained on: (run dir, data dir).
    Tests copy it before changing anything."""
    work = tmp_path_factory.mktemp("faults")
    write_dataset(work / "data", n_train=16, n_dev=4, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # models/.last_run goes there, not into the checkout
        FineTuner(
            Config.from_dict(
                {
                    "MODEL_NAME": str(tiny_glm_dir),
                    "DATA_PATH": str(work / "data" / "train.jsonl"),
                    "OUTPUT_DIR": str(work / "run"),
                    "MAX_STEPS": 2,
                    "GRAD_ACCUM": 1,
                    "BATCH_SIZE": 2,
                    "TIER": "none",
                    "SEED": 0,
                    "VAL_SIZE": 0,
                    "MAX_SAMPLES": 8,
                    "LEARNING_RATE": 1e-2,
                    "QUANT_LEVEL": "none",
                }
            )
        ).run()
    return work / "run", work / "data"


# ---- damaged files ------------------------------------------------------------------------------------


def _truncate(path: Path) -> str:
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 2)
    return f"{path.name} is damaged (truncated: {size // 2:,} of {size:,} bytes)"


def _break_json(path: Path) -> str:
    path.write_text(path.read_text(encoding="utf-8")[:-20], encoding="utf-8")  # cut short, as by a full disk
    return f"{path.name} is damaged (not valid JSON: "


RUN_FIX = "restore it from a copy, or train again into that OUTPUT_DIR with OVERWRITE=1"
DAMAGE = {
    "truncated adapter_model.safetensors": ("adapter_model.safetensors", _truncate),
    "broken adapter_config.json": ("adapter_config.json", _break_json),
}
COMMANDS = {
    "predict": ["predict", "PROMPT=hi"],
    "chat": ["predict", "INTERACTIVE=1"],
    "predict-file": ["predict", "INPUT_FILE=data/dev.jsonl"],
    "evaluate": ["evaluate", "EVAL_PATH=data/dev.jsonl"],
    "merge": ["merge"],
    "export-onnx": ["export-onnx"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_adapter_is_one_line_in_every_command_that_reads_it(
    cli, tmp_path, lora_run, damage, command, snapshot
):
    run = shutil.copytree(lora_run[0], tmp_path / "run")
    shutil.copytree(lora_run[1], tmp_path / "data")
    name, spoil = DAMAGE[damage]
    said = spoil(run / name)
    before = snapshot(tmp_path)
    code, errors, stderr = cli(*COMMANDS[command], f"ADAPTER_DIR={run}", "MAX_NEW_TOKENS=2")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"ADAPTER_DIR={run}: {said}") and errors[0].endswith(RUN_FIX), errors[0]
    assert "Traceback" not in stderr
    assert snapshot(tmp_path) == before  # no merged/ or onnx/ begun, the run untouched


def test_damage_is_found_before_torch_is_imported(tmp_path, lora_run, child_env):
    """The checks are the pre-flight's: with a `torch` that stops the process, the line still comes."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise SystemExit('torch was imported')\n")
    run = shutil.copytree(lora_run[0], tmp_path / "run")
    said = _truncate(run / "adapter_model.safetensors")
    env = {**child_env, "PYTHONPATH": f"{stub.parent}{os.pathsep}{child_env['PYTHONPATH']}"}
    for command in ("predict", "merge", "export-onnx"):
        proc = subprocess.run(
            [sys.executable, "-m", "app", command, f"ADAPTER_DIR={run}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        errors = [line.split(" ERROR app: ", 1)[1] for line in proc.stderr.splitlines() if " ERROR app: " in line]
        assert proc.returncode == 2 and errors == [f"ADAPTER_DIR={run}: {said}; {RUN_FIX}"], proc.stderr


def test_a_damaged_local_model_is_one_line_for_train_info_and_predict(cli, tmp_path, tiny_glm_dir, lora_run, snapshot):
    model = shutil.copytree(tiny_glm_dir, tmp_path / "glm")
    shutil.copytree(lora_run[1], tmp_path / "data")
    _truncate(model / "tokenizer.json")  # an interrupted copy
    said = "tokenizer.json is damaged (not valid JSON: "
    fix = (
        f"copy the model again, or delete the damaged file and download it again: `.venv/bin/hf download "
        f"<owner>/glm --local-dir {model}` (fetches only what is missing)"
    )
    before = snapshot(tmp_path)
    for argv in (
        ["train", "DATA_PATH=data/train.jsonl", "OUTPUT_DIR=out"],
        ["info", "DATA_PATH=data/train.jsonl"],
        ["predict", "ADAPTER_DIR=none", "PROMPT=hi"],
    ):
        code, errors, stderr = cli(*argv, f"MODEL_NAME={model}")
        assert code == 2 and len(errors) == 1, (argv, errors)
        assert errors[0].startswith(f"MODEL_NAME={model}: {said}") and errors[0].endswith(fix), errors[0]
        assert "Traceback" not in stderr
        assert snapshot(tmp_path) == before


def test_an_adapters_damaged_base_is_named_as_its_base(cli, tmp_path, tiny_glm_dir, lora_run, snapshot):
    run = shutil.copytree(lora_run[0], tmp_path / "run")
    models = tmp_path / "models"
    base = shutil.copytree(tiny_glm_dir, models / "tiny-glm")  # MODEL_NAME=tiny's dir: rebuilt when removed
    config = (run / "train_config.json").read_text(encoding="utf-8")
    (run / "train_config.json").write_text(config.replace(str(tiny_glm_dir), "tiny"), encoding="utf-8")
    said = _truncate(base / "model.safetensors")
    before = snapshot(tmp_path)
    code, errors, _ = cli("predict", f"ADAPTER_DIR={run}", "PROMPT=hi")
    assert code == 2 and errors == [
        f"MODEL_NAME=tiny (the base model named in {run}/train_config.json): {said}; delete models/tiny-glm "
        "(`make clean` removes the tiny models); the next command rebuilds it"
    ]
    assert snapshot(tmp_path) == before


def test_a_damaged_onnx_export_names_the_export_command(cli, tmp_path, snapshot):
    """A copy of an export cut short: the sizes recorded at export time show it before ONNX Runtime runs."""
    merged, onnx = tmp_path / "run" / "merged", tmp_path / "run" / "merged" / "onnx"
    onnx.mkdir(parents=True)
    (tmp_path / "run" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (merged / "config.json").write_text("{}")
    (onnx / "config.json").write_text("{}")
    (onnx / "model.onnx").write_bytes(b"\0" * 100)
    (onnx / "model.onnx.data").write_bytes(b"\0" * 600)
    (onnx / "onnx_export.json").write_text(
        f'{{"source": "{merged}", "architecture": "GlmForCausalLM", "inputs": [], "past_shape": [], '
        '"files": {"model.onnx": 100, "model.onnx.data": 1000}}'
    )
    before = snapshot(tmp_path)
    code, errors, _ = cli("predict", f"ADAPTER_DIR={onnx}", "PROMPT=hi")
    assert code == 2 and errors == [
        f"ADAPTER_DIR={onnx}: model.onnx.data is damaged (truncated: 600 of 1,000 "
        f"bytes); export it again: `make export-onnx ADAPTER_DIR={merged}`"
    ]
    assert snapshot(tmp_path) == before


def test_an_unreadable_file_is_named_as_unreadable_not_damaged(tmp_path, lora_run, as_a_user, snapshot, child_env):
    """Files another user wrote (a container run as another uid): the line says so and how to fix
    the permissions; "damaged, delete it" would be the wrong advice."""
    run = shutil.copytree(lora_run[0], tmp_path / "run")
    weights = run / "adapter_model.safetensors"
    if os.geteuid() == 0:
        os.chown(weights, 65534, 65534)  # nobody's, private to nobody
        os.chmod(weights, 0o600)
    else:
        os.chmod(weights, 0o000)
    before = snapshot(run)
    proc = subprocess.run(
        [sys.executable, "-m", "app", "predict", "PROMPT=hi", f"ADAPTER_DIR={run}"],
        cwd=tmp_path,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=as_a_user,
    )
    errors = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        errors[0]
        .split(" ERROR app: ")[1]
        .startswith(f"ADAPTER_DIR={run}: cannot read adapter_model.safetensors (permission denied: owned by uid ")
    ), errors
    assert "chown" in errors[0] and "damaged" not in errors[0]
    assert snapshot(run) == before


def test_the_loaders_backstop_names_the_file(tmp_path, lora_run, monkeypatch):
    """Past the pre-flight (the library API, or damage the checks cannot see) the loads still end in one
    line: the checks run again on failure, and an error typical of a damaged file names the dir and file."""
    import app.models.integrity
    from app.inference.onnx_model import OnnxCausalLM
    from app.inference.predict import Predictor
    from app.models.loading import load_tokenizer

    run = shutil.copytree(lora_run[0], tmp_path / "run")
    said = _truncate(run / "adapter_model.safetensors")
    with pytest.raises(UserError) as err:
        Predictor(Config.from_dict({"ADAPTER_DIR": str(run)}))
    assert err.value.problems == [f"ADAPTER_DIR={run}: {said}; {RUN_FIX}"]
    # a header the checks pass but the library refuses (here: the checks switched off)
    (run / "adapter_model.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0{]")
    monkeypatch.setattr(app.models.integrity, "dir_problems", lambda path, label: [])
    with pytest.raises(UserError) as err:
        Predictor(Config.from_dict({"ADAPTER_DIR": str(run)}))
    (line,) = err.value.problems
    assert line.startswith(f"ADAPTER_DIR={run}: adapter_model.safetensors cannot be loaded (SafetensorError: ")
    assert line.endswith(RUN_FIX)
    monkeypatch.undo()
    said = _break_json(run / "tokenizer.json")
    with pytest.raises(UserError) as err:
        load_tokenizer(str(run), setting="ADAPTER_DIR")
    (line,) = err.value.problems  # every damaged file of the dir, in one line
    assert line.startswith(f"ADAPTER_DIR={run}: adapter_model.safetensors is damaged") and f", {said}" in line
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"not a protobuf")
    (onnx / "onnx_export.json").write_text('{"architecture": "x", "inputs": [], "past_shape": []}')
    with pytest.raises(UserError) as err:
        OnnxCausalLM(onnx)
    (line,) = err.value.problems
    assert line.startswith(f"ADAPTER_DIR={onnx}: model.onnx cannot be loaded (") and "export it again" in line


def test_safetensors_header_check_reads_the_header_only(tmp_path):
    """A whole file passes; every way of cutting or padding it is named; the weights are never read."""
    import torch
    from safetensors.torch import save_file

    from app.models.integrity import safetensors_problem

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)}, str(path))
    whole = path.read_bytes()
    assert safetensors_problem(path) is None
    n = int.from_bytes(whole[:8], "little")
    for data, why in (
        (whole[:5], "truncated: 5 bytes, not even a header"),
        (whole[: 8 + n - 1], f"shorter than its {n:,}-byte header"),
        (whole[:-1], f"truncated: {len(whole) - 1:,} of {len(whole):,} bytes"),
        (whole + b"\0", f"1 byte longer than it should be ({len(whole):,})"),
        (b"\xff" * 8 + whole[8:], "invalid header length"),
        (whole[:8] + b"x" + whole[9:], "its header is not valid JSON"),
    ):
        path.write_bytes(data)
        assert why in (safetensors_problem(path) or ""), (why, safetensors_problem(path))


def test_a_sharded_model_is_checked_shard_by_shard(tmp_path):
    import torch
    from safetensors.torch import save_file

    from app.models.integrity import model_problems

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "glm"}')
    save_file({"a": torch.zeros(4)}, str(model / "model-00001-of-00002.safetensors"))
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    (line,) = model_problems(str(model))
    assert line.startswith(
        f"MODEL_NAME={model}: model-00002-of-00002.safetensors is missing (named in "
        "model.safetensors.index.json); copy the model again"
    )
    save_file({"b": torch.zeros(4)}, str(model / "model-00002-of-00002.safetensors"))
    assert model_problems(str(model)) == []


# ---- kill -9 of merge / export -------------------------------------------------------------------------

# `python -m app <command>`, SIGKILLed by itself (kill -9: no handler, no cleanup) at KILL_AT:
# mid-write (the merge's weights are written, its tokenizer not; the export's files are written, not yet
# verified or published), or inside the swap (after the atomic exchange; or, where that is unavailable,
# between renaming the old dir aside and the new one in).
KILL_9 = """
import os, signal, sys
import app.core.atomic
at = os.environ["KILL_AT"]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if at == "merge-write":
    import transformers
    transformers.PreTrainedTokenizerBase.save_pretrained = lambda *a, **k: die()
elif at == "export-write":
    import app.inference.export
    app.inference.export.verify = lambda model, d, tol=1e-3: die()
elif at == "after-exchange":
    exchange = app.core.atomic._exchange
    def dying(a, b):
        assert exchange(a, b)
        die()
    app.core.atomic._exchange = dying
elif at == "between-renames":
    app.core.atomic._exchange = lambda a, b: False
    rename = os.rename
    def dying(src, dst):
        if ".partial-" in os.path.basename(src):
            die()
        return rename(src, dst)
    os.rename = dying
from app.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def kill_9_at(child_env, tmp_path):
    """kill_9_at(at, *argv): `python -m app <argv>` in tmp_path, SIGKILLed by itself at ``at`` (KILL_9)."""

    def run(at, *argv):
        proc = subprocess.run(
            [sys.executable, "-c", KILL_9, *argv],
            cwd=tmp_path,
            env={**child_env, "KILL_AT": at},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    return run


def _debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_kill_9_of_merge_leaves_the_previous_merge_or_none(cli, tmp_path, lora_run, caplog, snapshot, kill_9_at):
    run = shutil.copytree(lora_run[0], tmp_path / "run")
    merged = run / "merged"
    # the first merge, killed mid-write: no MERGED_DIR at all, so nothing half-written is loaded
    kill_9_at("merge-write", "merge", f"ADAPTER_DIR={run}")
    assert not merged.exists() and _debris(run)
    code, errors, _ = cli("predict", f"ADAPTER_DIR={merged}", "PROMPT=hi", "MAX_NEW_TOKENS=2")
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"ADAPTER_DIR={merged}: no such directory")
    assert cli("merge", f"ADAPTER_DIR={run}")[0] == 0  # cleans up and merges
    assert not _debris(run) and (merged / "tokenizer.json").is_file()
    (merged / "onnx").mkdir()  # an export made from it (kept across merges, see app.core.atomic.replace_dir)
    (merged / "onnx" / "model.onnx").write_bytes(b"export")
    first = snapshot(merged)

    # a re-merge killed mid-write, or in the swap before the old dir is gone: the previous merge, byte for byte
    for at in ("merge-write", "between-renames"):
        kill_9_at(at, "merge", f"ADAPTER_DIR={run}")
        if at == "between-renames":  # the old dir is aside and nothing is in place: refused, then put back
            assert not merged.exists()
            code, errors, _ = cli("predict", f"ADAPTER_DIR={merged}", "PROMPT=hi", "MAX_NEW_TOKENS=2")
            assert code == 2 and len(errors) == 1 and "the previous copy is" in errors[0], errors
            assert cli("merge", f"ADAPTER_DIR={run}")[0] == 0
            assert f"restored {merged} from .merged.old-" in caplog.text
        else:
            assert snapshot(merged) == first and _debris(run)
            code, errors, _ = cli("predict", f"ADAPTER_DIR={merged}", "PROMPT=hi", "MAX_NEW_TOKENS=2")
            assert code == 0, errors  # the complete previous merge loads
            assert cli("merge", f"ADAPTER_DIR={run}")[0] == 0
        assert not _debris(run) and (merged / "onnx" / "model.onnx").read_bytes() == b"export"
        assert snapshot(merged) != first  # a new merge (new files), the export carried across
        first = snapshot(merged)

    # killed right after the atomic exchange: the new merge is in place, whole; the old one is debris, and
    # the export it held (not yet carried across) is carried by the next merge's clean-up
    kill_9_at("after-exchange", "merge", f"ADAPTER_DIR={run}")
    assert _debris(run) and snapshot(merged) != first and not (merged / "onnx").exists()
    from app.models.integrity import dir_problems

    assert dir_problems(merged, "MERGED_DIR") == [] and (merged / "tokenizer.json").is_file()
    assert cli("merge", f"ADAPTER_DIR={run}")[0] == 0 and not _debris(run)
    assert (merged / "onnx" / "model.onnx").read_bytes() == b"export"


def test_kill_9_of_export_leaves_the_previous_export_or_none(cli, tmp_path, lora_run, snapshot, kill_9_at):
    run = shutil.copytree(lora_run[0], tmp_path / "run")
    onnx = run / "merged" / "onnx"
    assert cli("merge", f"ADAPTER_DIR={run}")[0] == 0
    kill_9_at("export-write", "export-onnx", f"ADAPTER_DIR={run}")
    assert not onnx.exists() and _debris(run / "merged")
    code, errors, _ = cli("predict", f"ADAPTER_DIR={onnx}", "PROMPT=hi", "MAX_NEW_TOKENS=2")
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"ADAPTER_DIR={onnx}: no such directory")
    assert cli("export-onnx", f"ADAPTER_DIR={run}")[0] == 0
    assert not _debris(run / "merged")
    first = snapshot(onnx)
    kill_9_at("export-write", "export-onnx", f"ADAPTER_DIR={run}")
    assert snapshot(onnx) == first and _debris(run / "merged")
    code, errors, stderr = cli("predict", f"ADAPTER_DIR={onnx}", "PROMPT=hi", "MAX_NEW_TOKENS=2")
    assert code == 0, errors
    assert cli("export-onnx", f"ADAPTER_DIR={run}")[0] == 0 and not _debris(run / "merged")
    assert snapshot(onnx) != first


@pytest.mark.parametrize("setting, where", [("MERGED_DIR", "mine"), ("MERGED_DIR", "run"), ("ONNX_DIR", "mine")])
def test_a_merged_or_onnx_dir_that_is_yours_is_never_replaced(cli, tmp_path, lora_run, snapshot, setting, where):
    """MERGED_DIR / ONNX_DIR are replaced whole; pointed at a directory the tool did not write (your own
    folder, or the adapter run itself) that would delete its files. Refused in one line, untouched."""
    run = shutil.copytree(lora_run[0], tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file\n")
    target = mine if where == "mine" else run
    before = snapshot(tmp_path)
    extra = [f"MERGED_DIR={tmp_path / 'merged'}"] if setting == "ONNX_DIR" else []
    code, errors, _ = cli(
        "merge" if setting == "MERGED_DIR" else "export-onnx", f"ADAPTER_DIR={run}", f"{setting}={target}", *extra
    )
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"{setting}={target} holds files this tool did not write"), errors[0]
    assert snapshot(tmp_path) == before  # refused before anything was merged or exported


def test_replace_dir_swaps_whole_and_cleans_up_after_a_kill(tmp_path, monkeypatch, caplog):
    """The swap itself, without a model: exchange and fallback give the same result; a kill's leftovers
    (a dead writer's) are removed, a live writer's are not, and an old copy with nothing in place returns."""
    import app.core.atomic
    from app.core.atomic import replace_dir

    target, umask = tmp_path / "out", os.umask(0)
    os.umask(umask)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(app.core.atomic, "_exchange", lambda a, b: False)
        shutil.rmtree(target, ignore_errors=True)
        for version in ("one", "two"):
            with replace_dir(target, "weights", "MERGED_DIR", kept_note="stale") as tmp:
                os.close(os.open(tmp / "weights", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors makes it
                (tmp / "weights").write_text(version)
            assert (target / "weights").read_text() == version and not _debris(tmp_path)
            assert (target / "weights").stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file
            (target / "sub").mkdir(exist_ok=True)
        assert (target / "sub").is_dir()  # carried across the second swap
    with pytest.raises(RuntimeError), replace_dir(target, "weights", "MERGED_DIR") as tmp:
        (tmp / "weights").write_text("three")
        raise RuntimeError("failed half way")
    assert (target / "weights").read_text() == "two" and not _debris(tmp_path)
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".out.partial-{os.getppid()}").mkdir()  # a live process: perhaps writing it now
    os.rename(target, tmp_path / f".out.old-{dead}")
    with caplog.at_level("INFO"), replace_dir(target, "weights", "MERGED_DIR") as tmp:
        assert (target / "weights").read_text() == "two"  # put back before anything else
        (tmp / "weights").write_text("four")
    assert "restored" in caplog.text and (target / "weights").read_text() == "four"
    assert _debris(tmp_path) == [f".out.partial-{os.getppid()}"]
    (tmp_path / "link").symlink_to(target)  # MERGED_DIR a link to another disk: the link stays one
    with replace_dir(tmp_path / "link", "weights", "MERGED_DIR") as tmp:
        (tmp / "weights").write_text("five")
    assert (tmp_path / "link").is_symlink() and (target / "weights").read_text() == "five"


# ---- one run per OUTPUT_DIR; resume only what matches; a stop while the data loads -------------------


def settings(model_dir, data, out, **extra) -> dict:
    """A small run with a checkpoint every 2 steps; MAX_SEQ_LEN is left to the tier (measured on the data)."""
    values = {
        "MODEL_NAME": str(model_dir),
        "DATA_PATH": str(data),
        "OUTPUT_DIR": str(out),
        "MAX_SAMPLES": 40,
        "MAX_STEPS": 8,
        "BATCH_SIZE": 2,
        "GRAD_ACCUM": 1,
        "SAVE_STEPS": 2,
        "EVAL_STEPS": 100,
        "LOGGING_STEPS": 1,
        "NUM_THREADS": 1,
        "QUANT_LEVEL": "none",
        "SEED": 0,
        "PRECISION": "fp32",
    }
    values.update(extra)
    return values


def argv(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def steps_logged(read_metrics):
    """steps_logged(run dir) -> the step of every training-loss row of its metrics.jsonl, in order."""
    return lambda out: [r["step"] for r in read_metrics(out) if "loss" in r]


# ---- a killed run, to resume ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed(tiny_glm_dir, tmp_path_factory, write_dataset):
    """(settings, run dir) of a run that died after step 3 (checkpoint-2 sealed): an exception from a
    callback ends it as abruptly as a kill would, in this process."""
    from transformers import TrainerCallback

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise RuntimeError("killed")

    work = tmp_path_factory.mktemp("killed")
    write_dataset(work / "data", n_train=80, n_dev=10, seed=1)
    values = settings(tiny_glm_dir, "data/train.jsonl", "out")  # relative: the copies below are the same run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        ft = FineTuner(Config.from_dict(values)).setup().prepare_data()
        with pytest.raises(RuntimeError, match="killed"):
            ft.train(callbacks=[Die()])
    assert (work / "out" / CHECKPOINTS / "checkpoint-2" / SETTINGS_FILE).is_file()
    return values, work


@pytest.fixture
def run(killed, tmp_path, cli):
    """A copy of the killed run (and its data) in tmp_path, the working dir: (settings, its OUTPUT_DIR)."""
    values, work = killed
    shutil.copytree(work, tmp_path, dirs_exist_ok=True)
    return values, Path("out")


@pytest.mark.parametrize(
    "change, said",
    [
        ({"LORA_R": 16}, "LORA_R 8 -> 16"),
        ({"METHOD": "ptuning"}, "METHOD lora -> ptuning"),
        ({"MODEL_NAME": "tiny-qwen2"}, "MODEL_NAME "),
        ({"DATA_PATH": "other"}, "DATA_PATH "),
        ({"MAX_SAMPLES": 30}, "MAX_SAMPLES 40 -> 30"),
        ({"SEED": 1}, "SEED 0 -> 1"),
        ({"MAX_SEQ_LEN": 40}, "MAX_SEQ_LEN "),
        ({"LEARNING_RATE": 0.1}, "LEARNING_RATE 0.0002 -> 0.1"),
        ({"BATCH_SIZE": 4}, "samples per step (BATCH_SIZE x GRAD_ACCUM x processes) 2x1x1=2 -> 4x1x1=4"),
        ({"MAX_STEPS": 1}, "MAX_STEPS=1 is below its step 2"),
        ({"EDIT_DATA": True}, "changed since"),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else None,
)
def test_resume_with_other_settings_is_refused_in_one_line(run, cli, tiny_qwen2_dir, change, said, snapshot):
    values, out = run
    change = dict(change)
    if change.pop("EDIT_DATA", False):  # the same path, other contents
        data = Path(values["DATA_PATH"])
        data.write_text(data.read_text(encoding="utf-8").replace("的", "之"), encoding="utf-8")
    if change.get("MODEL_NAME") == "tiny-qwen2":
        change["MODEL_NAME"] = str(tiny_qwen2_dir)
    if change.get("DATA_PATH") == "other":
        other = Path("other.jsonl")
        shutil.copy(values["DATA_PATH"], other)
        change["DATA_PATH"] = str(other)
    before = snapshot(out)
    code, errors, _ = cli("train", *argv({**values, **change}))
    assert code == 2 and len(errors) == 1, errors
    line = errors[0]
    head = f"OUTPUT_DIR={out} holds an unfinished run (checkpoint-2, step 2) that cannot continue as asked: "
    assert line.startswith(head), line
    what = line[len(head) : line.index(". To continue it")]
    assert said in what and "; " not in what, what  # that difference, and no other
    assert "OVERWRITE=1" in line and "another OUTPUT_DIR" in line
    assert snapshot(out) == before  # metrics.jsonl and the checkpoint included
    # The notebook path (no pre-flight) refuses with the same line, before any weights load.
    with pytest.raises(UserError) as e:
        FineTuner(Config.from_dict({**values, **change})).setup()
    assert str(e.value) == line


def test_resume_with_allowed_changes_continues_and_says_so(run, cli, caplog, steps_logged):
    values, out = run
    code, errors, _ = cli(
        "train",
        *argv({**values, "MAX_STEPS": 6, "SAVE_STEPS": 3, "LOGGING_STEPS": 2, "NUM_THREADS": 2, "EVAL_STEPS": 50}),
    )
    assert code == 0, errors
    assert (
        "resuming with changed settings: NUM_THREADS 1 -> 2, MAX_STEPS 8 -> 6, SAVE_STEPS 2 -> 3, "
        "EVAL_STEPS 100 -> 50, LOGGING_STEPS 1 -> 2" in caplog.text
    )
    assert "resuming with the checkpoint's MAX_SEQ_LEN=" in caplog.text  # the tier's choice then, not again
    assert f"resuming from {out / CHECKPOINTS / 'checkpoint-2'}" in caplog.text
    assert steps_logged(out) == [1, 2, 4, 6]  # steps 1-2 from the killed run, then every 2nd: no gap, no repeat
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_overwrite_over_a_run_of_other_settings_trains_anew(run, cli, caplog, steps_logged):
    values, out = run
    code, errors, _ = cli("train", *argv({**values, "LORA_R": 4, "MAX_STEPS": 3, "OVERWRITE": 1}))
    assert code == 0, errors
    assert "OVERWRITE=1: the unfinished run in" in caplog.text and "(LORA_R 8 -> 4)" in caplog.text
    assert steps_logged(out) == [1, 2, 3]
    assert json.loads((out / "train_config.json").read_text())["LORA_R"] == 4


def test_a_checkpoint_without_settings_resumes_with_a_warning(run, cli, caplog):
    """An older version's checkpoint cannot be compared: said, and resumed as before."""
    values, out = run
    ckpt = out / CHECKPOINTS / "checkpoint-2"
    (ckpt / SETTINGS_FILE).unlink()
    marker = json.loads((ckpt / MARKER).read_text())
    del marker["files"][SETTINGS_FILE]
    (ckpt / MARKER).write_text(json.dumps(marker))
    code, errors, _ = cli("train", *argv({**values, "MAX_STEPS": 4}))
    assert code == 0, errors
    assert f"{ckpt} has no {SETTINGS_FILE} (written by an older version)" in caplog.text


def test_a_damaged_settings_file_is_named(run, cli, snapshot):
    values, out = run
    path = out / CHECKPOINTS / "checkpoint-2" / SETTINGS_FILE
    path.write_bytes(b"\0" * path.stat().st_size)  # same size: the checkpoint still looks complete
    before = snapshot(out)
    code, errors, _ = cli("train", *argv(values))
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"{path} is damaged"), errors
    assert snapshot(out) == before


def test_fewer_epochs_than_the_checkpoint_is_refused(tmp_path):
    """NUM_EPOCHS (MAX_STEPS=0) whose step count falls below the checkpoint's step: refused too."""
    from app.training.resume import check

    ckpt = tmp_path / "checkpoint-30"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 30, "max_steps": 60, "num_train_epochs": 2}))
    cfg = Config.from_dict({"NUM_EPOCHS": 1, "OUTPUT_DIR": str(tmp_path)})
    (ckpt / SETTINGS_FILE).write_text(json.dumps({"settings": {"NUM_EPOCHS": 2.0}, "world_size": 1, "data": {}}))
    rc = check(cfg, ckpt)
    assert rc.differences == []  # exactly its step: nothing below it
    cfg = Config.from_dict({"NUM_EPOCHS": 0.5, "OUTPUT_DIR": str(tmp_path)})
    assert check(cfg, ckpt).differences == ["NUM_EPOCHS=0.5 gives 15 steps, below its step 30"]
    cfg = Config.from_dict({"NUM_EPOCHS": 3, "OUTPUT_DIR": str(tmp_path)})
    rc = check(cfg, ckpt)
    assert rc.differences == [] and rc.changes == ["NUM_EPOCHS 2.0 -> 3.0"]


# ---- one run per OUTPUT_DIR -------------------------------------------------------------------------

HOLD = (
    "import sys; from app.training.runlock import hold; h = hold(sys.argv[1], 'train'); h.__enter__(); "
    "print('held', flush=True); sys.stdin.read()"
)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, child_env):
    """The kernel drops a flock with its process: kill -9 never leaves OUTPUT_DIR locked."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "out")],
        env=child_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        who = holder(tmp_path / "out")
        assert who["pid"] == proc.pid and who["command"] == "train"
        with pytest.raises(UserError, match=rf"OUTPUT_DIR={tmp_path / 'out'} is in use: `train` \(pid {proc.pid}"):
            with hold(tmp_path / "out", "train"):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert holder(tmp_path / "out") is None
    with hold(tmp_path / "out", "train"):
        assert (tmp_path / "out" / LOCK_FILE).is_file()


def test_a_second_run_into_a_busy_output_dir_is_refused_and_the_first_finishes(
    tiny_glm_dir, tmp_path, cli, snapshot, app_process, steps_logged, write_dataset
):
    """Run A trains again into a finished run's dir (OVERWRITE=1), paused with SIGSTOP while we look
    so its files hold still. A second `train` into its OUTPUT_DIR, `merge` and `export-onnx` of the
    run, `remove-run` of it and `make clean` are each refused in one line naming A's pid; A's files,
    metrics.jsonl and checkpoints included, are byte-for-byte as they were; then A finishes with
    every step logged once."""
    write_dataset(tmp_path / "data", n_train=80, n_dev=10, seed=1)
    out = tmp_path / "models" / "a"
    values = settings(tiny_glm_dir, tmp_path / "data" / "train.jsonl", out, MAX_STEPS=2, MAX_SEQ_LEN=64)
    FineTuner(Config.from_dict(values)).run()  # the finished run A replaces
    values.update(MAX_STEPS=30, OVERWRITE=1)
    proc = app_process(["train", *argv(values)])
    try:
        proc.wait_for(lambda: (out / CHECKPOINTS / "checkpoint-4").is_dir())
        proc.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # a write in flight lands before the snapshot
        before = snapshot(out)
        for command, extra in (("train", {}), ("train", {"LORA_R": 16}), ("remove-run", {})):
            code, errors, _ = cli(command, *argv({**values, **extra}))
            assert code == 2 and len(errors) == 1, errors
            assert errors[0].startswith(f"OUTPUT_DIR={out} is in use: `train` (pid {proc.pid}, started "), errors
        for command in ("merge", "export-onnx"):
            code, errors, _ = cli(command, f"ADAPTER_DIR={out}")
            assert code == 2 and len(errors) == 1, errors
            assert errors[0].startswith(f"ADAPTER_DIR={out} is in use: `train` (pid {proc.pid}, started "), errors
        code, errors, _ = cli("clean")
        assert code == 2 and len(errors) == 1 and f"`train` (pid {proc.pid}" in errors[0], errors
        # The notebook path (no pre-flight): refused when it comes to write, before touching anything.
        with pytest.raises(UserError, match=f"is in use: `train` \\(pid {proc.pid}"):
            FineTuner(Config.from_dict(values)).run()
        assert snapshot(out) == before
    finally:
        proc.proc.send_signal(signal.SIGCONT)
    assert proc.wait() == 0, proc.text()[-3000:]
    assert steps_logged(out) == list(range(1, 31))
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


# ---- a stop signal while the data loads ----------------------------------------------------------


def test_sigterm_while_the_data_loads_ends_cleanly_and_touches_nothing(
    tiny_glm_dir, tmp_path, monkeypatch, snapshot, app_process, write_dataset
):
    """SIGTERM (docker compose stop) while 20,000 records are being tokenized: exit 143 with one
    line, no traceback, and the finished run already in OUTPUT_DIR byte-for-byte as it was."""
    write_dataset(tmp_path / "data", n_train=80, n_dev=10, seed=1)
    lines = (tmp_path / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "big.jsonl").write_text("".join(lines * 250), encoding="utf-8")
    out = tmp_path / "out"
    values = settings(tiny_glm_dir, tmp_path / "data" / "train.jsonl", out, MAX_STEPS=2, MAX_SEQ_LEN=64)
    monkeypatch.chdir(tmp_path)
    FineTuner(Config.from_dict(values)).run()  # the earlier, finished run
    before = snapshot(out)
    values.update(DATA_PATH=tmp_path / "big.jsonl", MAX_SAMPLES=19_000, OVERWRITE=1)
    proc = app_process(["train", *argv(values)])
    proc.wait_for(lambda: "using 19,000 of its 20,000 valid records" in proc.text())  # read; now tokenizing
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143, proc.text()[-3000:]
    errors = [x for x in proc.text().splitlines() if " ERROR " in x]
    assert "Traceback" not in proc.text() and errors[-1].endswith("stopped by SIGTERM"), proc.text()[-3000:]
    assert snapshot(out) == before and not (out / LOCK_FILE).exists()
