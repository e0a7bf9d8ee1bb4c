"""The bad-input matrix: each case ends with a non-zero exit and ONE line that names the setting or
the file and line, and the fix; no traceback; an earlier run's outputs in OUTPUT_DIR untouched.

Most cases run `python -m app ...`'s main() in this process (the same code path as the command
line, without paying for a fresh torch import per case); the unwritable OUTPUT_DIR runs a real
process (as an unprivileged user when the suite runs as root, who may write anywhere), and a full
disk is simulated by making the save raise ENOSPC. tests/cli/test_cli.py and tests/data/test_data.py cover
more file-level cases (missing file, unsupported suffix, .json that is not an array, ...).
"""

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from app import Config, FineTuner, UserError

REPO = Path(__file__).resolve().parents[2]


def previous_run(out: Path) -> None:
    """What a finished earlier run leaves in OUTPUT_DIR (its content does not matter here), marked as this
    tool's run as training marks it (app.core.ownership)."""
    from app.core import ownership

    names = (
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_config.json",
        "metrics.jsonl",
        "best",
        "summary.json",
    )
    ownership.claim(out, "train")
    ownership.register(out, names)
    (out / "best").mkdir()
    for name in names[:4] + ("best/adapter_model.safetensors",):
        (out / name).write_text(f"earlier run: {name}\n")
    (out / "summary.json").write_text(json.dumps({"steps": 7}))


def _write(name, content):
    def make(d: Path) -> str:
        p = d / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return name

    return make


def _directory(d: Path) -> str:
    (d / "train_dir").mkdir()
    return "train_dir"


GOOD = json.dumps({"context": "抽取：张三出生于北京。", "target": "[]"}, ensure_ascii=False)
# case -> (DATA_PATH maker or None, extra settings, what the one line must contain)
CASES = {
    "empty data file": (_write("empty.jsonl", ""), [], ["DATA_PATH=empty.jsonl", "empty", "make data"]),
    "non-UTF-8 bytes": (
        _write("gbk.csv", "context,target\n你好,世界\n".encode("gbk")),
        [],
        ["DATA_PATH=gbk.csv", "line 2", "not UTF-8", "iconv"],
    ),
    "malformed JSON past the tolerated share": (
        _write("bad.jsonl", "\n".join([GOOD, "{oops", GOOD, "not json", GOOD]) + "\n"),
        [],
        ["DATA_PATH=bad.jsonl", "2 of 5", "line 2: bad JSON", "line 4: bad JSON", "MAX_BAD_RATIO"],
    ),
    "missing fields": (
        _write("nofield.jsonl", '{"context": "q1"}\n{"context": "q2"}\n'),
        [],
        ["DATA_PATH=nofield.jsonl", "missing field 'target'", "lines 1, 2", "DATA_FORMAT"],
    ),
    "unknown record format": (
        _write("odd.jsonl", '{"prompt": "p", "completion": "c"}\n'),
        [],
        ["DATA_PATH=odd.jsonl", "line 1", "record format", "DATA_FORMAT"],
    ),
    "unknown DATA_FORMAT": (None, ["DATA_FORMAT=xml"], ["DATA_FORMAT='xml'", "context_target"]),
    "unsupported file type": (_write("train.xlsx", "x"), [], ["DATA_PATH=train.xlsx", ".jsonl"]),
    "data path is a directory": (_directory, [], ["DATA_PATH=train_dir is a directory", "data file"]),
    "MAX_SAMPLES=0": (None, ["MAX_SAMPLES=0"], ["MAX_SAMPLES=0", "MAX_SAMPLES=all"]),
    "MAX_SAMPLES=-1": (None, ["MAX_SAMPLES=-1"], ["MAX_SAMPLES=-1", "MAX_SAMPLES=all"]),
    "MAX_SAMPLES=abc": (None, ["MAX_SAMPLES=abc"], ["MAX_SAMPLES='abc'", "whole number or 'all'"]),
    "BATCH_SIZE=0": (None, ["BATCH_SIZE=0"], ["BATCH_SIZE=0", ">= 1"]),
    "QUANT_LEVEL=3bit": (None, ["QUANT_LEVEL=3bit"], ["QUANT_LEVEL='3bit'", "4bit"]),
    "METHOD=unknown": (None, ["METHOD=unknown"], ["METHOD='unknown'", "qlora"]),
    "nonexistent MODEL_NAME path": (
        None,
        ["MODEL_NAME=/nonexistent/models/glm"],
        ["MODEL_NAME=/nonexistent/models/glm: no such directory", "tiny"],
    ),
    "NODE_RANK outside NNODES": (None, ["NNODES=2", "NODE_RANK=2"], ["NODE_RANK=2", "0..NNODES-1"]),
    "RESUME path without a checkpoint": (None, ["RESUME=nowhere"], ["RESUME=nowhere", "RESUME=auto"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_outputs_alone(cli, tmp_path, tiny_glm_dir, case, snapshot, write_dataset):
    make, extra, expected = CASES[case]
    write_dataset(tmp_path / "data", n_train=20, n_dev=2, seed=1)
    data = make(tmp_path) if make else "data/train.jsonl"
    previous_run(tmp_path / "out")
    before = snapshot(tmp_path / "out")
    # OVERWRITE=1: the earlier run may be replaced, so only the bad input itself stops the run
    code, errors, stderr = cli(
        "train",
        f"MODEL_NAME={tiny_glm_dir}",
        f"DATA_PATH={data}",
        "OUTPUT_DIR=out",
        "OVERWRITE=1",
        "MAX_STEPS=1",
        *extra,
    )
    assert code == 2, stderr[-3000:]
    assert len(errors) == 1, errors
    for part in expected:
        assert part in errors[0], (part, errors[0])
    assert "Traceback" not in stderr
    assert snapshot(tmp_path / "out") == before
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_finished_run_is_not_replaced_unasked(cli, tmp_path, tiny_glm_dir, snapshot, write_dataset):
    """`make train ...` run twice: the second says so in one line instead of training over it."""
    write_dataset(tmp_path / "data", n_train=20, n_dev=2, seed=1)
    previous_run(tmp_path / "out")
    before = snapshot(tmp_path / "out")
    code, errors, _ = cli("train", f"MODEL_NAME={tiny_glm_dir}", "OUTPUT_DIR=out")
    assert code == 2 and len(errors) == 1
    assert errors[0] == (
        "OUTPUT_DIR=out already holds a finished run (7 steps); set OVERWRITE=1 to train again "
        "and replace it when the new run finishes, or choose another OUTPUT_DIR"
    )
    code, errors, _ = cli("train", f"MODEL_NAME={tiny_glm_dir}", "OUTPUT_DIR=out", "RESUME=auto")
    assert code == 2 and len(errors) == 1 and errors[0].startswith("RESUME=auto: OUTPUT_DIR=out holds a finished run")
    assert snapshot(tmp_path / "out") == before


def test_blank_prompt_is_one_line(cli, tmp_path, tiny_glm_dir):
    code, errors, _ = cli("predict", "PROMPT=   ", "ADAPTER_DIR=none", f"MODEL_NAME={tiny_glm_dir}")
    assert code == 2 and len(errors) == 1 and errors[0].startswith("PROMPT is blank") and "PROMPT=" in errors[0]


def test_unwritable_output_dir_is_one_line_before_anything_loads(tmp_path, snapshot, as_a_user, run_app, write_dataset):
    """A real process. Root may write anywhere, so as root the child runs without that capability."""
    write_dataset(tmp_path / "data", n_train=20, n_dev=2, seed=1)
    locked = tmp_path / "locked"
    previous_run(locked / "out")
    read_only = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    before = snapshot(locked / "out")
    results = []
    try:
        for d in (locked / "out", locked):
            os.chmod(d, read_only)
        for out in ("locked/out", "locked/new/out"):  # an existing dir, and one that would have to be created
            try:
                proc = run_app(
                    ["train", "MODEL_NAME=tiny", f"OUTPUT_DIR={out}", "OVERWRITE=1"], timeout=120, preexec_fn=as_a_user
                )
            except subprocess.SubprocessError as e:  # a container without CAP_SETPCAP cannot drop capabilities
                pytest.skip(f"cannot run a child without root's write override here: {e}")
            results.append((proc.returncode, [x for x in proc.stderr.splitlines() if " ERROR " in x], proc.stderr))
    finally:
        for d in (locked, locked / "out"):
            os.chmod(d, 0o755)
    for code, errors, stderr in results:
        assert code == 2 and len(errors) == 1, stderr[-3000:]
        assert "cannot write to" in errors[0] and "permission denied" in errors[0], errors[0]
        assert "choose a writable OUTPUT_DIR" in errors[0] and "Traceback" not in stderr
    assert "OUTPUT_DIR=locked/out: cannot write to locked/out " in results[0][1][0]
    assert "OUTPUT_DIR=locked/new/out: cannot write to locked " in results[1][1][0]
    assert snapshot(locked / "out") == before
    assert not (tmp_path / "models").exists()  # refused before even building the tiny model


@pytest.fixture(scope="module")
def small_data_dir(make_data):
    """40 train and 4 dev records: enough for _cfg's 20 samples (not the golden recipe's data_dir)."""
    return make_data(n_train=40, n_dev=4, seed=1)


def _cfg(model, data, out, **extra):
    return Config.from_dict(
        {
            "MODEL_NAME": str(model),
            "DATA_PATH": str(data / "train.jsonl"),
            "OUTPUT_DIR": str(out),
            "MAX_SAMPLES": 20,
            "BATCH_SIZE": 2,
            "GRAD_ACCUM": 1,
            "MAX_STEPS": 4,
            "SAVE_STEPS": 2,
            "EVAL_STEPS": 2,
            "LOGGING_STEPS": 1,
            "MAX_SEQ_LEN": 128,
            "NUM_THREADS": 1,
            "QUANT_LEVEL": "none",
            "TIER": "none",
            "SEED": 0,
            **extra,
        }
    )


@pytest.mark.parametrize("where", ["checkpoint", "final adapter"])
def test_full_disk_while_saving_keeps_the_previous_run(
    tiny_glm_dir, small_data_dir, tmp_path, monkeypatch, where, snapshot
):
    """The disk fills while a checkpoint (step 4) or the final adapter is written: one line saying so
    and what is kept; the earlier finished run's files are untouched; freeing space and running the
    same command resumes and finishes."""
    import peft.peft_model

    from app.training.checkpoints import STAGING

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    FineTuner(_cfg(tiny_glm_dir, small_data_dir, out, MAX_STEPS=2)).run()  # the earlier, finished run
    live = ("metrics.jsonl", "runs", "checkpoints")  # the new run's own live logs and checkpoints
    before = snapshot(out, skip=live)
    real_save = peft.peft_model.safe_save_file

    def disk_full(tensors, filename, *a, **k):
        staged = Path(filename).parent  # checkpoints/.incomplete/checkpoint-4, or OUTPUT_DIR's staging dir
        if (
            staged.parent.name == STAGING and staged.name == "checkpoint-4"
            if where == "checkpoint"
            else staged.parent == out and staged.name.startswith(".staging.")
        ):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with pytest.raises(UserError) as err:
        FineTuner(_cfg(tiny_glm_dir, small_data_dir, out, OVERWRITE=True)).run()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"OUTPUT_DIR={out}: no space left on the device while ")
    assert "the previous run's files there (2 steps) are untouched" in msg
    assert f"resume from {out / 'checkpoints' / ('checkpoint-2' if where == 'checkpoint' else 'checkpoint-4')}" in msg
    assert snapshot(out, skip=live) == before  # adapter, config, summary, best/, plot: the earlier run's
    assert not (out / "checkpoints" / STAGING).exists() and not list(out.glob(".staging.*"))  # no debris

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)  # space freed: the same command
    result = FineTuner(_cfg(tiny_glm_dir, small_data_dir, out, OVERWRITE=True)).run()
    assert result.steps == 4 and json.loads((out / "summary.json").read_text())["steps"] == 4
