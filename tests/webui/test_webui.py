"""The web UI (app/webui): its forms come from the config tree, its path guard and uploads keep to data/ and
models/, and through its API (gradio_client, against a real `python -m app webui`) bad input gets the command
line's own one-line message with nothing written, and a run trains, chats, evaluates and merges.
The same journey in a real browser: tests/webui/test_webui_browser.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from app.config import Config, choices


def _errors(stderr: str) -> list[str]:
    """The ERROR lines of a `python -m app` run, as the UI shows them (without time, level and logger)."""
    return [line.split(" ERROR ", 1)[1].split(": ", 1)[1] for line in stderr.splitlines() if " ERROR " in line]


@pytest.fixture(scope="module")
def client(webui):
    from gradio_client import Client

    return Client(webui.url, verbose=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The whole page built in this process (not served), with the settings of a project with no .env."""
    import os

    from app.webui.context import Context
    from app.webui.ui import build

    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("built"))
    try:
        ctx = Context(Config.load(env={}, dotenv_path=None))
        build(ctx)
        yield ctx
    finally:
        os.chdir(old)


# ---- forms from the config tree ----------------------------------------------------------------------------


def test_every_setting_is_in_a_form_or_named_with_the_reason(built):
    from app.webui.forms import NOT_IN_UI

    shown = {var for form in built.forms.values() for var in form.fields}
    everything = set(Config.variables())
    assert set(NOT_IN_UI) <= everything, set(NOT_IN_UI) - everything  # no stale entry
    assert shown == everything - set(NOT_IN_UI), (everything - set(NOT_IN_UI)) ^ shown
    assert all(reason.strip() for reason in NOT_IN_UI.values())


def test_each_field_is_the_setting_with_its_name_help_and_choices(built):
    for form in built.forms.values():
        for var, component in form.fields.items():
            assert component.label == var
            sec, field = Config.variables()[var]
            assert field.metadata["help"] in (component.info or "")
            if choices(var):
                assert [c[0] for c in component.choices] == list(choices(var))


def test_a_tab_holds_every_setting_of_the_sections_its_command_reads():
    """So a field added to a section in app/config/fields.py shows up with no UI code."""
    from app.webui.forms import NOT_IN_UI, settings_of

    for tab, section in (("train", "lora"), ("train", "resources"), ("evaluate", "evaluation"), ("chat", "serve")):
        in_section = {v for v, (sec, _) in Config.variables().items() if sec == section} - set(NOT_IN_UI)
        assert in_section <= set(settings_of(tab)), (tab, in_section - set(settings_of(tab)))


def test_the_form_gives_back_only_what_differs_and_leaves_tier_settings_to_the_tier(built):
    form = built.forms["train"]
    values = [form.initial(var) for var in form.fields]
    assert form.overrides(values) == {}
    assert form.initial("BATCH_SIZE") == "" and form.initial("OUTPUT_DIR") == ""  # the tool decides them
    shown = dict(zip(form.fields, values, strict=True))
    as_a_browser_sends = shown | {"NUM_EPOCHS": 3, "WEIGHT_DECAY": 0, "MAX_GRAD_NORM": 1}
    assert form.overrides(list(as_a_browser_sends.values())) == {}  # 3 means NUM_EPOCHS=3.0, the default
    changed = shown | {"MAX_STEPS": 4.0, "BATCH_SIZE": "2", "METHOD": "qlora"}
    assert form.overrides(list(changed.values())) == {"METHOD": "qlora", "MAX_STEPS": "4", "BATCH_SIZE": "2"}


# ---- paths: data/ and models/ only ----------------------------------------------------------------------------


def test_every_path_setting_is_guarded():
    from app.webui.paths import PATH_SETTINGS

    paths = {v for v in Config.variables() if v.endswith(("_PATH", "_DIR", "_FILE"))}
    assert paths <= set(PATH_SETTINGS), paths - set(PATH_SETTINGS)


def test_the_path_guard_refuses_everything_outside_data_and_models(tmp_path, monkeypatch):
    from app.webui.paths import path_problem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "data" / "out").symlink_to("/etc")
    for var, value in (
        ("DATA_PATH", "../x.jsonl"),
        ("DATA_PATH", "/etc/passwd"),
        ("DATA_PATH", "data/../../x"),
        ("DATA_PATH", "data/out/passwd"),
        ("OUTPUT_DIR", "data/run"),
        ("OUTPUT_DIR", "models/../x"),
        ("MODEL_NAME", "/abs/model"),
        ("MODEL_NAME", "../model"),
        ("EVAL_PATH", "models/x.jsonl"),
    ):
        line = path_problem(var, value)
        assert line and line.startswith(f"{var}={value}: the web UI reads and writes only inside"), (var, value)
    for var, value in (
        ("DATA_PATH", "data/train.jsonl"),
        ("DATA_PATH", "data/sub/../t.jsonl"),
        ("OUTPUT_DIR", "models/run"),
        ("MODEL_NAME", "THUDM/glm-edge-1.5b-chat"),
        ("MODEL_NAME", "tiny"),
        ("ADAPTER_DIR", "none"),
        ("VAL_PATH", ""),
    ):
        assert path_problem(var, value) is None, (var, value)


# ---- the running UI, through its API --------------------------------------------------------------------------


def _run_cli(child_env, project, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", *argv], cwd=project, env=child_env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "name, content, cli_setting",
    [
        ("latin1.jsonl", '{"context": "caf\xe9", "target": "[]"}\n'.encode("latin-1"), "DATA_PATH"),
        ("empty.jsonl", b"", "DATA_PATH"),
        ("notes.exe", b"MZ\x90\x00", "DATA_PATH"),
    ],
)
def test_a_bad_upload_gets_the_cli_line_and_nothing_is_written(
    webui, client, tmp_path, snapshot, child_env, name, content, cli_setting
):
    from gradio_client import handle_file

    upload = tmp_path / name
    upload.write_bytes(content)
    before = snapshot(webui.project)
    _, message = client.predict(handle_file(str(upload)), api_name="/upload")
    assert snapshot(webui.project) == before, "an upload that was refused wrote into the project"
    # the command line, given the same file at that path in data/, refuses it with the same line
    other = tmp_path / "cli"
    (other / "data").mkdir(parents=True)
    (other / "data" / name).write_bytes(content)
    done = _run_cli(child_env, other, "info", f"DATA_PATH=data/{name}", "MODEL_NAME=tiny")
    assert done.returncode == 2, done.stderr
    assert message.splitlines() == [e for e in _errors(done.stderr) if e.startswith(cli_setting)], message


def test_an_upload_lands_in_data_and_never_replaces_a_file(webui, client, tmp_path, make_data):
    from gradio_client import handle_file

    src = make_data(n_train=12, n_dev=2, seed=9) / "train.jsonl"
    mine = tmp_path / "mine.jsonl"
    mine.write_bytes(src.read_bytes())
    picked, line = client.predict(handle_file(str(mine)), api_name="/upload")
    assert (webui.project / "data" / "mine.jsonl").read_bytes() == src.read_bytes()
    assert picked["value"] == "data/mine.jsonl" and line.startswith("data/mine.jsonl: 12 valid of 12 records")
    mine.write_text(src.read_text().splitlines()[0] + "\n")  # another file of the same name
    _, line = client.predict(handle_file(str(mine)), api_name="/upload")
    assert "already in data/ and is never replaced" in line
    assert (webui.project / "data" / "mine.jsonl").read_bytes() == src.read_bytes()


def test_an_upload_over_the_size_cap_is_refused_and_nothing_is_written(tmp_path, monkeypatch, make_data):
    from app.core.errors import UserError
    from app.webui.paths import save_upload

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    big = tmp_path / "big.jsonl"
    line = (make_data(n_train=1, n_dev=1, seed=2) / "train.jsonl").read_text()
    big.write_text(line * (2 * 2**20 // len(line) + 1))  # a little over 2 MB
    cfg = Config.load({"WEBUI_MAX_UPLOAD_MB": "2"}, env={}, dotenv_path=None)
    with pytest.raises(UserError) as e:
        save_upload(str(big), cfg)
    assert e.value.problems[0].startswith("DATA_PATH=data/big.jsonl: ")
    assert " MB is over WEBUI_MAX_UPLOAD_MB=2; copy the file into data/ and pick it" in e.value.problems[0]
    assert not list((tmp_path / "data").iterdir())
    assert save_upload(str(big), Config.load({"WEBUI_MAX_UPLOAD_MB": "10"}, env={}, dotenv_path=None)).records > 1


def test_the_data_picker_shows_format_count_and_bad_lines(webui, client):
    (webui.project / "data" / "some_bad.jsonl").write_text(
        '{"context": "a", "target": "[]"}\nnot json\n{"context": "b", "target": "[]"}\n', encoding="utf-8"
    )
    line = client.predict("data/some_bad.jsonl", api_name="/inspect_data")
    assert line.startswith("data/some_bad.jsonl: 2 valid of 3 records, format context_target; 1 bad (line 2:")
    assert client.predict("../outside.jsonl", api_name="/inspect_data").startswith(
        "DATA_PATH=../outside.jsonl: the web UI reads and writes only inside this project's data/"
    )


# ---- preference tuning (STAGE=dpo/kto) on the Train tab ----------------------------------------------------------


def _ancestors(block) -> list:
    out = []
    while (block := getattr(block, "parent", None)) is not None:
        out.append(block)
    return out


def test_the_train_tab_shows_stage_pref_loss_and_beta_open_and_its_command_carries_them(built):
    """STAGE, PREF_LOSS and PREF_BETA at the top of the tab (not folded under Advanced); the other preference
    settings under Advanced; what the form holds is what the command line runs."""
    from app.webui.forms import command_line

    form = built.forms["train"]
    for var in ("STAGE", "PREF_LOSS", "PREF_BETA"):
        assert "train-advanced" not in {getattr(b, "elem_id", None) for b in _ancestors(form.fields[var])}, var
    for var in ("PREF_FTX", "SIMPO_GAMMA", "KTO_CHOSEN_WEIGHT", "KTO_REJECTED_WEIGHT"):
        assert "train-advanced" in {getattr(b, "elem_id", None) for b in _ancestors(form.fields[var])}, var
    values = dict(zip(form.fields, [form.initial(var) for var in form.fields], strict=True))
    changed = values | {"STAGE": "dpo", "PREF_LOSS": "simpo", "PREF_BETA": 2, "SIMPO_GAMMA": 1.0, "PREF_FTX": 0.5}
    overrides = form.overrides(list(changed.values()))
    assert overrides == {
        "STAGE": "dpo",
        "PREF_LOSS": "simpo",
        "PREF_BETA": "2",
        "PREF_FTX": "0.5",
        "SIMPO_GAMMA": "1.0",
    }
    assert "STAGE=dpo PREF_LOSS=simpo PREF_BETA=2 " in command_line("train", overrides)
    t = Config.load(overrides, env={}, dotenv_path=None).train
    assert (t.stage, t.pref_loss, t.pref_beta, t.simpo_gamma, t.pref_ftx) == ("dpo", "simpo", 2.0, 1.0, 0.5)


PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
SHAREGPT_PAIRS = [
    {
        "conversations": [{"from": "human", "value": f"q{i}"}],
        "chosen": {"from": "gpt", "value": "a"},
        "rejected": {"from": "gpt", "value": "b"},
    }
    for i in range(2)
]
KTO = [
    {"prompt": "q", "completion": "a", "label": True},
    {"prompt": "q", "completion": "b", "label": "false"},
    {"prompt": "r", "completion": "c", "label": 1},
]


def _jsonl(path, records) -> None:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _stage_line(path: str, fmt: str, stage: str) -> str:
    """What training says when ``stage`` cannot train on a file of ``fmt`` records (app.data.records.check_stage)."""
    from app.core.errors import UserError
    from app.data.records import LoadReport, check_stage

    with pytest.raises(UserError) as e:
        check_stage(LoadReport(path, fmt), stage)
    return e.value.problems[0]


def test_the_data_check_names_the_preference_shape_and_a_stage_that_does_not_fit(webui, client):
    data = webui.project / "data"
    _jsonl(data / "pairs.jsonl", PAIRS)
    _jsonl(data / "lf_pairs.jsonl", SHAREGPT_PAIRS)
    _jsonl(data / "kto_mix.jsonl", KTO)

    def check(path, stage):
        return client.predict(path, stage, api_name="/inspect_data")

    summary = "data/pairs.jsonl: 3 valid of 3 records, preference pairs (plain: prompt/chosen/rejected); no bad lines"
    assert check("data/pairs.jsonl", "dpo") == summary
    assert check("data/pairs.jsonl", "sft") == summary + "\n" + _stage_line("data/pairs.jsonl", "preference", "sft")
    assert check("data/pairs.jsonl", "kto") == summary + "\n" + (
        "STAGE=kto trains each pair as a good and a bad answer (6 records); STAGE=dpo trains on them as pairs"
    )
    assert check("data/lf_pairs.jsonl", "dpo") == (
        "data/lf_pairs.jsonl: 2 valid of 2 records, preference pairs "
        "(LLaMA-Factory sharegpt: conversations + chosen/rejected); "
        "no bad lines"
    )
    kto = "data/kto_mix.jsonl: 3 valid of 3 records, KTO records (prompt/completion/label; 2 good, 1 bad); no bad lines"
    assert check("data/kto_mix.jsonl", "kto") == kto
    assert check("data/kto_mix.jsonl", "dpo") == kto + "\n" + _stage_line("data/kto_mix.jsonl", "kto", "dpo")
    sft = check("data/train.jsonl", "dpo").splitlines()  # the triplet sample data
    assert sft[0].endswith("format context_target; no bad lines")
    assert sft[1:] == [_stage_line("data/train.jsonl", "context_target", "dpo")] and "STAGE=sft" in sft[1]
    assert len(check("data/train.jsonl", "sft").splitlines()) == 1


def test_plan_runs_the_stage_settings_and_the_adapter_to_continue(webui, client, child_env):
    """The picked ADAPTER_DIR and the preference settings go into the command Plan runs; a bad PREF_BETA gets the
    command line's own line for it."""
    message, line, *_ = client.predict(
        **TRAIN, stage="dpo", pref_loss="ipo", pref_beta=0, adapter_dir="models/sft", api_name="/plan"
    )
    assert line.startswith("python -m app info MODEL_NAME=models/tiny-glm ")
    assert {"STAGE=dpo", "PREF_LOSS=ipo", "PREF_BETA=0", "ADAPTER_DIR=models/sft"} <= set(line.split()), line
    cli = _run_cli(child_env, webui.project, *line.split()[3:])  # the same command, pasted into a terminal
    assert cli.returncode == 2 and message.splitlines() == _errors(cli.stderr)
    assert "PREF_BETA=0.0 must be > 0, e.g. 0.1" in message.splitlines()
    message, line, *_ = client.predict(**TRAIN, stage="kto", adapter_dir="../elsewhere", api_name="/plan")
    assert message.startswith(
        "ADAPTER_DIR=../elsewhere: the web UI reads and writes only inside this project's models/"
    ), message


def test_the_runs_tab_shows_the_stage_and_the_reward_margins(tmp_path, monkeypatch):
    import json

    from app.core.ownership import claim
    from app.webui.run_view import curves, summary_rows

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "models" / "pref-run"
    run.mkdir(parents=True)
    claim(run, "train")
    (run / "train_config.json").write_text(json.dumps({"METHOD": "lora", "STAGE": "dpo"}))
    rows = [
        {"step": 1, "loss": 0.69, "rewards/margins": 0.01},
        {"step": 2, "eval_loss": 0.68, "eval_rewards/margins": 0.03},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summary_rows()[0][2] == "lora dpo"
    table = curves(["models/pref-run"])
    assert set(table["series"]) == {"train loss", "eval loss", "train reward margin", "eval reward margin"}
    assert table[table["series"] == "eval reward margin"]["value"].tolist() == [0.03]


TRAIN = {
    "model_name": "models/tiny-glm",
    "quant_level": "none",
    "max_samples": "40",
    "logging_steps": 1,
    "eval_steps": 2,
    "save_steps": 2,
    "max_seq_len": "256",
    "precision": "fp32",
}


def test_bad_settings_and_paths_get_the_cli_line_and_nothing_starts(webui, client, snapshot, child_env):
    before = snapshot(webui.project)
    message, *_ = client.predict(**TRAIN, batch_size="0", api_name="/start")
    cli = _run_cli(child_env, webui.project, "train", "MODEL_NAME=models/tiny-glm", "QUANT_LEVEL=none", "BATCH_SIZE=0")
    assert cli.returncode == 2 and message.splitlines() == _errors(cli.stderr) == ["BATCH_SIZE=0 must be >= 1"]
    message, *_ = client.predict(**TRAIN, data_path="../outside.jsonl", api_name="/start")
    assert message.startswith("DATA_PATH=../outside.jsonl: the web UI reads and writes only inside")
    message, *_ = client.predict(**TRAIN, output_dir="/tmp/elsewhere", api_name="/start")
    assert message.startswith("OUTPUT_DIR=/tmp/elsewhere: the web UI reads and writes only inside")
    assert snapshot(webui.project) == before


def test_train_watch_chat_evaluate_and_merge(webui, client, child_env):
    """A short run to its end, then each tab's action on its adapter; a second Start into the busy run is
    refused with the command line's busy line."""
    message, line, _ = client.predict(**TRAIN, max_steps=40, output_dir="models/api-run", api_name="/start")
    assert message == "" and line.startswith("python -m app train MODEL_NAME=models/tiny-glm")
    deadline = time.monotonic() + 300
    while (status := client.predict("models/api-run", api_name="/watch"))[0].startswith("not started"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status[0].startswith("training: pid"), status  # it holds the run's lock from its first second
    busy, *_ = client.predict(**TRAIN, max_steps=40, output_dir="models/api-run", api_name="/start")
    cli = _run_cli(child_env, webui.project, *line.split()[3:])  # the same command, pasted into a terminal
    assert busy.startswith("OUTPUT_DIR=models/api-run is in use: `train` (pid ")
    assert cli.returncode == 2 and busy.splitlines() == _errors(cli.stderr)
    while not (status := client.predict("models/api-run", api_name="/watch"))[0].startswith("finished"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status[1].startswith("step 40/40 · 100%") and "tokens/s" in status[1] and "RSS" in status[1]
    assert status[2] and status[2]["type"] == "matplotlib"  # the live loss curve, drawn as training draws it
    curves, summary = client.predict("models/api-run", None, api_name="/run_curves")  # the Runs tab's
    assert {"train loss", "eval loss"} <= {row[-1] for row in curves["data"]} and '"steps": 40' in summary
    runs = client.predict(api_name="/runs")[0]["data"]
    assert any(r[0] == "models/api-run" and r[1] == "finished" and r[5] == 40 for r in runs)

    job = client.submit(model="models/api-run", message="你好", history=[], max_new_tokens=12, api_name="/chat")
    updates = [u for u in job]
    answers = [u[0][-1]["content"] for u in updates if u[0] and u[0][-1]["role"] == "assistant"]
    text = [a[0]["text"] if isinstance(a, list) else a for a in answers]
    assert len([t for t in text if t]) >= 2 and text[-1], updates[-1]  # streamed: the answer grew in steps

    message, _, metrics, chart, samples = client.predict(
        adapter_dir="models/api-run",
        eval_path="data/dev.jsonl",
        eval_samples=4,
        max_new_tokens=24,
        api_name="/evaluate",
    )
    assert message.startswith("done: python -m app evaluate"), message
    scores = dict(metrics["data"])
    assert set(scores) >= {"triplet_precision", "triplet_recall", "triplet_f1"} and scores["n_samples"] == 4
    assert chart and len(samples["data"]) == 4
    results = [r[1] for r in samples["data"]]
    assert results == sorted(results, key=["error", "bad gold", "correct"].index)  # errors first

    # a second run, compared with the first on one plot
    client.predict(**TRAIN, max_steps=4, output_dir="models/api-run-2", api_name="/start")
    while not client.predict("models/api-run-2", api_name="/watch")[0].startswith("finished"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    curves, _ = client.predict("models/api-run", "models/api-run-2", api_name="/run_curves")
    assert {"api-run train loss", "api-run-2 train loss"} <= {row[-1] for row in curves["data"]}

    message, _, written = client.predict(adapter_dir="models/api-run", api_name="/merge")
    assert message.startswith("done: python -m app merge") and written == "models/api-run/merged"
    assert (webui.project / "models" / "api-run" / "merged" / "config.json").is_file()


def test_a_non_loopback_address_needs_a_login(run_app, tmp_path):
    done = run_app(["webui", "WEBUI_HOST=0.0.0.0", "WEBUI_PORT=7999"])
    assert done.returncode == 2
    assert _errors(done.stderr) == [
        "WEBUI_HOST=0.0.0.0 lets anyone who reaches port 7999 train, read runs and upload "
        "files, and WEBUI_AUTH is not set: set WEBUI_AUTH=user:password, or "
        "WEBUI_HOST=127.0.0.1 for this machine only"
    ]
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_with_a_login_the_api_needs_it(start_webui):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    url, _ = start_webui("WEBUI_AUTH=ann:s3cret")
    with pytest.raises(AuthenticationError):
        Client(url + "/", verbose=False).predict(api_name="/runs")
    rows = Client(url + "/", auth=("ann", "s3cret"), verbose=False).predict(api_name="/runs")
    assert rows[0]["headers"][:2] == ["run", "state"]


def test_the_path_guard_refuses_a_sibling_named_like_data_or_models(tmp_path, monkeypatch):
    """data2/ and models_evil/ start with the names of the dirs the UI may use: the guard compares whole path
    parts, not strings. Real files there, so only the guard can refuse them."""
    from app.webui.paths import path_problem

    monkeypatch.chdir(tmp_path)
    for name in ("data", "data2", "models", "models_evil"):
        (tmp_path / name).mkdir()
    (tmp_path / "data2" / "train.jsonl").write_text('{"context": "q", "target": "a"}\n')
    (tmp_path / "models_evil" / "run").mkdir()
    where = {"DATA_PATH": "data/", "OUTPUT_DIR": "models/", "PREDICTIONS": "data/ or models/"}
    for var, value in (
        ("DATA_PATH", "data2/train.jsonl"),
        ("DATA_PATH", "data/../data2/train.jsonl"),
        ("DATA_PATH", f"{tmp_path}/data2/train.jsonl"),
        ("OUTPUT_DIR", "models_evil/run"),
        ("PREDICTIONS", "data2/train.jsonl"),
        ("PREDICTIONS", "models_evil/run"),
    ):
        assert path_problem(var, value) == (
            f"{var}={value}: the web UI reads and writes only inside this project's {where[var]}; use a path "
            "there (upload data on the Train tab), or the command line for other places"
        ), (var, value)
    assert path_problem("DATA_PATH", "data/train.jsonl") is None


def test_gradio_refuses_an_upload_over_the_cap_before_its_temp_dir_holds_it(start_webui, tmp_path, monkeypatch):
    """WEBUI_MAX_UPLOAD_MB is also Gradio's own max_file_size: its upload route stops reading an oversized file
    at the cap (413) and keeps none of it, so the file is never copied whole to its temp dir first."""
    from pathlib import Path

    import httpx

    gradio_tmp = tmp_path / "gradio-tmp"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(gradio_tmp))  # the UI process's upload dir
    (tmp_path / "project").mkdir()
    url, _ = start_webui("WEBUI_MAX_UPLOAD_MB=1", cwd=tmp_path / "project")
    line = b'{"context": "q", "target": "a"}\n'
    small, big = line * (2**19 // len(line)), line * (3 * 2**20 // len(line))  # 0.5 MB and 3 MB, the cap 1 MB
    r = httpx.post(url + "/gradio_api/upload", files={"files": ("small.jsonl", small)}, timeout=60)
    assert r.status_code == 200, r.text
    (kept,) = r.json()
    assert Path(kept).parent.parent == gradio_tmp and Path(kept).read_bytes() == small  # where uploads land
    r = httpx.post(url + "/gradio_api/upload", files={"files": ("big.jsonl", big)}, timeout=60)
    assert r.status_code == 413 and r.text == f"File size exceeded maximum allowed size of {2**20} bytes."
    files = [p for p in gradio_tmp.rglob("*") if p.is_file()]
    assert files == [Path(kept)], files  # nothing of the refused file, not even its part


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_chat_backend_ends_with_the_ui_however_the_ui_ends(start_webui, tmp_path, tiny_glm_dir, sig):
    """`kill`, a service manager, a test fixture's SIGKILL or the OOM killer: the `serve` a chat started never
    outlives the UI that started it (it watches its parent), while its own shutdown path is never reached."""
    import shutil

    from gradio_client import Client

    shutil.copytree(tiny_glm_dir, tmp_path / "models" / "tiny-glm")
    url, ui = start_webui()
    *_, message = Client(url + "/", verbose=False).predict(
        model="base model", message="你好", history=[], model_name="models/tiny-glm", max_new_tokens=4, api_name="/chat"
    )
    assert message == "", message
    backend = [line for line in ui.caused() if line.split()[0] != str(ui.pid)]
    assert len(backend) == 1 and " -m app serve " in backend[0], backend  # the chat's backend runs
    os.kill(ui.pid, sig)
    ui.wait()
    deadline = time.monotonic() + 60  # a hang guard: it ends within a second or two
    while left := ui.caused():
        assert time.monotonic() < deadline, f"the UI ended ({sig.name}), these did not: {left}"
        time.sleep(0.1)


NOT_HERE = "nobody-here/never-downloaded-model"  # a hub name no cache holds


def _raw(url: str, api: str, *data) -> list:
    """An endpoint's outputs as the page gets them (an update keeps its props, e.g. interactive), not as
    gradio_client hands them on (a button's value only)."""
    import json
    import urllib.request

    call = urllib.request.Request(
        f"{url}gradio_api/call/{api}",
        data=json.dumps({"data": list(data)}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(call, timeout=30) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event}", timeout=120) as r:
        lines = r.read().decode().splitlines()
    assert "event: complete" in lines, lines
    return json.loads(lines[lines.index("event: complete") + 1][len("data: ") :])


def _page(url: str) -> dict[str, dict]:
    """The served page's components (Gradio's /config), by elem_id: their props as the browser first gets them."""
    import json
    import urllib.request

    with urllib.request.urlopen(url + "config", timeout=30) as r:
        components = json.load(r)["components"]
    return {c["props"]["elem_id"]: c["props"] for c in components if c.get("props", {}).get("elem_id")}


def test_a_model_that_is_not_here_gets_a_note_with_tiny_and_the_download_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from app.webui.context import Context
    from app.webui.guide import model_note
    from app.webui.ui import build

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    page = build(Context(Config.load({"MODEL_NAME": NOT_HERE}, env={}, dotenv_path=None)))
    note = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "train-model-note").value
    assert f"MODEL_NAME={NOT_HERE} is not downloaded here" in note
    assert f"`.venv/bin/hf download {NOT_HERE} --local-dir models/never-downloaded-model`" in note
    assert "set MODEL_NAME=models/never-downloaded-model" in note and "MODEL_NAME=tiny" in note
    # in the HF cache (as `hf download` leaves it without --local-dir): no note
    repo = tmp_path / "hf-cache" / "models--nobody-here--never-downloaded-model"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert model_note(NOT_HERE) == ""


def test_the_model_note_follows_model_name(webui, client):
    assert client.predict(NOT_HERE, api_name="/model_note").startswith(f"**MODEL_NAME={NOT_HERE} is not downloaded")
    for here in ("models/tiny-glm", "tiny"):
        assert client.predict(here, api_name="/model_note") == "", here
    assert client.predict("models/nope", api_name="/model_note").startswith("**MODEL_NAME=models/nope: no such dir")
    (webui.project / "models" / "downloaded").mkdir()
    (webui.project / "models" / "downloaded" / "config.json").write_text("{}")  # `hf download ... --local-dir` did
    assert "but models/downloaded is here**: set MODEL_NAME=models/downloaded" in client.predict(
        "someone/downloaded", api_name="/model_note"
    )


def test_stop_is_enabled_only_while_the_watched_run_trains(webui, client):
    from app.training.runlock import hold

    assert _page(webui.url)["train-stop"]["interactive"] is False  # nothing is watched when the page opens
    run = webui.project / "models" / "held-run"
    with hold(run, "train"):  # a training run's lock, as `make train` in a terminal holds it
        status = _raw(webui.url, "watch", "models/held-run")
        assert status[0].startswith("training: pid") and status[-1]["interactive"] is True, status
    status = _raw(webui.url, "watch", "models/held-run")
    assert status[0] == "not started" and status[-1]["interactive"] is False, status


def test_the_page_says_to_plan_first_until_a_plan_is_shown(webui, client):
    assert "Press Plan first" in _page(webui.url)["train-hint"]["value"]
    *_, plan, hint = client.predict(**TRAIN, api_name="/plan")
    assert "tier" in plan and hint == "", (plan, hint)


def test_the_eta_of_a_resumed_run_times_only_the_steps_since_the_resume():
    """A resumed run's metrics rows start time_s again at the resume: 10 s a step after resuming at step 3 of 10
    leaves 50 s, not the 20 s that dividing by all 5 steps gave."""
    from app.webui.run_view import progress

    rows = [{"step": s, "loss": 1.0, "time_s": 10.0 * s, "max_steps": 10} for s in (1, 2, 3)]
    rows += [{"step": s, "loss": 1.0, "time_s": 10.0 * (s - 3), "max_steps": 10} for s in (4, 5)]
    assert "step 5/10 · 50% · ETA 50 s" in progress(rows)
    assert "ETA 70 s" in progress(rows[:3])  # a run never resumed: as before
