"""python -m app owns the prediction modes and their checks; the Makefile and compose only call it.

predict, predict-custom, predict-file and chat are commands, each with its own mode (a PROMPT,
INPUT_FILE or INTERACTIVE left in the environment for one never changes another) and its one
required setting checked in the pre-flight, before a model loads; `<command> --help` describes
each; `make help` is grouped and fits 100 columns; no mode logic is left in the Makefile or compose."""

import builtins
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.__main__ import ALL_COMMANDS as COMMANDS  # the CLI's commands and the web UI's
from app.__main__ import main
from app.cli import reference
from app.config import Config
from app.inference.predict import BUILTIN_PROMPT, Predictor

REPO = Path(__file__).resolve().parents[2]
EMPTY_PROMPT = "PROMPT is empty: use make predict-custom PROMPT='你的问题' (make predict answers the built-in prompt)"
BLANK_PROMPT = (
    "PROMPT is blank (only spaces); give the question, e.g. make predict-custom "
    "PROMPT='《星河往事》是由林远执导的电视剧。' (make predict uses the built-in prompt)"
)
EMPTY_INPUT = "INPUT_FILE is empty: use make predict-file INPUT_FILE=data/dev.jsonl"
PREDICTION_COMMANDS = ("predict", "predict-custom", "predict-file", "chat")


@pytest.fixture
def asked(monkeypatch):
    """The last user message of every prompt the model answers (streamed or in a batch)."""
    seen: list[str] = []
    generate, generate_many = Predictor.generate, Predictor.generate_many

    def one(self, messages, stream=False):
        seen.append(messages[-1]["content"])
        return generate(self, messages, stream)

    def many(self, conversations, progress=True):
        seen.extend(c[-1]["content"] for c in conversations)
        return generate_many(self, conversations, progress)

    monkeypatch.setattr(Predictor, "generate", one)
    monkeypatch.setattr(Predictor, "generate_many", many)
    return seen


@pytest.fixture
def tiny(tiny_glm_dir):
    return ["ADAPTER_DIR=none", f"MODEL_NAME={tiny_glm_dir}", "MAX_NEW_TOKENS=2"]


@pytest.fixture
def other_modes_set(monkeypatch, tmp_path):
    """Every mode's setting in the environment (as a .env line would be): each command ignores the
    ones that are not its own."""
    (tmp_path / "stray.txt").write_text("不该被回答\n", encoding="utf-8")
    monkeypatch.setenv("PROMPT", "not this prompt")
    monkeypatch.setenv("INPUT_FILE", "stray.txt")
    monkeypatch.setenv("INTERACTIVE", "1")


def _no_input(prompt=""):
    raise AssertionError("this command must not chat")


# ---- each command, in process, on the tiny GLM ---------------------------------------------------------


def test_predict_answers_the_built_in_prompt(cli, tiny, asked, other_modes_set, monkeypatch, tmp_path):
    monkeypatch.setattr(builtins, "input", _no_input)
    code, errors, _ = cli("predict", *tiny)
    assert (code, errors, asked) == (0, [], [BUILTIN_PROMPT])
    assert not (tmp_path / "stray.pred.jsonl").exists()


def test_predict_custom_answers_prompt(cli, tiny, asked, other_modes_set, monkeypatch, tmp_path):
    monkeypatch.setattr(builtins, "input", _no_input)
    code, errors, _ = cli("predict-custom", "PROMPT=《星河往事》是由林远执导的电视剧。", *tiny)
    assert (code, errors, asked) == (0, [], ["《星河往事》是由林远执导的电视剧。"])
    assert not (tmp_path / "stray.pred.jsonl").exists()


def test_predict_file_answers_every_line(cli, tiny, asked, other_modes_set, monkeypatch, tmp_path):
    monkeypatch.setattr(builtins, "input", _no_input)
    (tmp_path / "in.txt").write_text("第一句\n\n第二句\n", encoding="utf-8")
    code, errors, _ = cli("predict-file", "INPUT_FILE=in.txt", *tiny)
    assert (code, errors, asked) == (0, [], ["第一句", "第二句"])
    rows = [json.loads(x) for x in (tmp_path / "in.pred.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["prompt"]) for r in rows] == [(1, "第一句"), (3, "第二句")]


def test_chat_chats_even_with_an_input_file_set(cli, tiny, asked, other_modes_set, monkeypatch, tmp_path):
    lines = ["你好"]

    def scripted(prompt=""):
        if not lines:
            raise EOFError  # Ctrl-D ends the chat
        return lines.pop(0)

    monkeypatch.setenv("INTERACTIVE", "0")  # chat is chat whatever INTERACTIVE says
    monkeypatch.setattr(builtins, "input", scripted)
    code, errors, _ = cli("chat", *tiny)
    assert (code, errors, asked, lines) == (0, [], ["你好"], [])
    assert not (tmp_path / "stray.pred.jsonl").exists()


def test_predict_still_takes_a_mode_on_its_own_command_line(cli, tiny, asked):
    """The older spelling (`predict PROMPT=...`), which scripts and tests use, still works."""
    assert cli("predict", "PROMPT=hi", *tiny)[:2] == (0, [])
    assert cli("predict", "PROMPT=", *tiny)[:2] == (0, [])  # empty: the built-in prompt, as before
    assert asked == ["hi", BUILTIN_PROMPT]


# ---- the one setting each needs: one line, before any model loads ---------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def refuse(self, cfg):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(Predictor, "__init__", refuse)


@pytest.mark.parametrize(
    "argv, line",
    [
        (["predict-custom"], EMPTY_PROMPT),
        (["predict-custom", "PROMPT="], EMPTY_PROMPT),
        (["predict-custom", "PROMPT=   "], BLANK_PROMPT),
        (["predict-file"], EMPTY_INPUT),
        (["predict-file", "INPUT_FILE="], EMPTY_INPUT),
    ],
)
def test_missing_mode_setting_is_one_line(cli, tiny, no_model, argv, line):
    assert cli(*argv, *tiny)[:2] == (2, [line])


def test_a_mode_setting_in_the_environment_is_not_needed_by_other_commands(cli, tiny, no_model, monkeypatch):
    """predict and chat need no PROMPT or INPUT_FILE: their absence is no problem for them (the
    pre-flight passes, and the model would load next)."""
    for command in ("predict", "chat"):
        with pytest.raises(AssertionError, match="a model was loaded"):
            cli(command, *tiny)


def _make(args, cwd, tiny_glm_dir):
    """`make <args>` in RUNTIME=local from ``cwd`` (no checkout state: no .env, no models/.last_run),
    without its `setup` prerequisite, so the test never installs anything."""
    if not shutil.which("make"):
        pytest.skip("needs make")
    env = {
        "PATH": "/usr/bin:/bin:/usr/local/bin",
        "HOME": str(cwd),
        "PYTHONPATH": str(REPO),
        "ADAPTER_DIR": "none",
        "MODEL_NAME": str(tiny_glm_dir),
    }
    return subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), "-o", "setup", *args, "RUNTIME=local", f"VENV={REPO / '.venv'}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, line",
    [
        (["predict-custom"], EMPTY_PROMPT),
        (["predict-custom", "PROMPT="], EMPTY_PROMPT),
        (["predict-custom", "PROMPT=   "], EMPTY_PROMPT),  # make strips the spaces: empty, not blank
        (["predict-file"], EMPTY_INPUT),
    ],
)
def test_make_gives_the_same_one_line_from_python(tmp_path, tiny_glm_dir, args, line):
    proc = _make(args, tmp_path, tiny_glm_dir)
    ours = [x for x in proc.stderr.splitlines() if not x.startswith("make")]
    assert proc.returncode == 2 and [x.split(" ERROR app: ", 1)[-1] for x in ours] == [line], proc.stderr
    assert all(" ERROR app: " in x for x in ours), proc.stderr  # from python -m app, not a shell check


# ---- --help ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    for argv in ([name, "--help"], [name, "-h"], ["help", name], [name, "MAX_SAMPLES=5", "--help"]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python -m app {name} [KEY=value ...]\n\n"), out
        assert " ".join(out.split()[7:]).startswith(COMMANDS[name].summary), out  # perhaps wrapped
        assert out.endswith("python -m app --help\n") and max(map(len, out.splitlines())) <= 100, out
    variables, sections = Config.variables(), {sec for sec, _ in Config.variables().values()}
    for read in COMMANDS[name].reads:
        assert read in variables or read in sections, f"{name} reads {read!r}: neither a setting nor a section"
        if read in variables:
            assert re.search(rf"^  {read} +=", out, flags=re.M), f"{name} --help does not list {read}"
        else:
            assert f"[{read}]" in out and all(
                re.search(rf"^  {v} +=", out, flags=re.M) for v, (sec, _) in variables.items() if sec == read
            ), read


def test_the_prediction_commands_list_their_own_setting(capsys):
    main(["predict-custom", "--help"])
    assert re.search(r"^  PROMPT +=", capsys.readouterr().out, flags=re.M)
    main(["predict-file", "--help"])
    assert re.search(r"^  INPUT_FILE +=", capsys.readouterr().out, flags=re.M)
    main(["predict", "--help"])
    assert not re.search(r"^  (PROMPT|INPUT_FILE) +=", capsys.readouterr().out, flags=re.M)


def test_top_level_help_lists_every_command_within_100_columns(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100
    assert all(re.search(rf"^  {name} ", out, flags=re.M) for name in COMMANDS)
    assert all(re.search(rf"^  {var} +=", out, flags=re.M) for var in Config.variables())


# ---- the Makefile and compose only call -----------------------------------------------------------------


def test_make_help_is_grouped_and_fits_100_columns():
    if not shutil.which("make"):
        pytest.skip("needs make")
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO), "help", "RUNTIME=local"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": "/tmp"},
    ).stdout
    wide = [x for x in out.splitlines() if len(x) > 100]
    assert not wide, f"make help lines over 100 columns: {wide}"
    listing = out[out.index("usage: make") : out.index("\nsettings (")]
    groups = [x.split(":")[0] for x in listing.splitlines()[1:] if re.match(r"[a-z]+: ", x)]
    assert groups == ["use", "inspect", "develop"], out
    targets = re.findall(r"^  ([a-z-]+) ", listing, flags=re.M)
    assert sorted(targets) == sorted(name for _, name, _, _ in reference.make_targets())
    assert {"predict", "predict-custom", "predict-file", "chat", "train"} <= set(targets)


def test_makefile_has_no_mode_logic():
    """Modes and their checks are python -m app's: no recipe sets PROMPT, INTERACTIVE or INPUT_FILE,
    tests a variable in the shell, or runs `predict` with arguments."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    recipes = "\n".join(x for x in text.splitlines() if x.startswith("\t"))
    assert not re.search(r"PROMPT|INTERACTIVE|INPUT_FILE=", recipes), "mode variables in a Makefile recipe"
    assert not re.search(r"\[\[|\[ -[nz]", recipes), "a shell check in a Makefile recipe"
    assert not re.search(r"\$\$\{\w+:-", recipes), "a shell default for a setting in a Makefile recipe"
    for command in PREDICTION_COMMANDS:
        assert re.search(rf"^{command}: .*\n\t\$\(APP\) {command}\n", text, flags=re.M), command


def test_compose_prediction_services_only_call_their_command():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    cuda = yaml.safe_load((REPO / "docker-compose.cuda.yml").read_text(encoding="utf-8"))["services"]
    for command in PREDICTION_COMMANDS:
        svc = compose[command]
        assert svc["command"] == [command] and "entrypoint" not in svc, command  # the image's: python -m app
        assert command in cuda, command
    assert "PROMPT" not in (REPO / "docker-compose.yml").read_text(encoding="utf-8").split("services:", 1)[1]
    # every app service runs one `python -m app` command: no shell in between deciding modes or defaults
    for name, svc in compose.items():
        if name not in ("test", "app"):
            assert "entrypoint" not in svc and len(svc["command"]) == 1 and svc["command"][0] in COMMANDS, name


def test_make_tiny_model_defaults_in_python(run_app, tmp_path):
    """`make tiny-model` calls `python -m app make-tiny-model` with no arguments: the default (tiny) is Python's;
    a MODEL_NAME that is no tiny family is one line."""
    bad = run_app(["make-tiny-model", "MODEL_NAME=Qwen/Qwen2-0.5B"])
    assert bad.returncode == 2 and bad.stderr.strip().endswith(
        "MODEL_NAME=Qwen/Qwen2-0.5B: make-tiny-model builds one of tiny, tiny-qwen2, tiny-qwen3, tiny-gemma3, "
        "tiny-llama; e.g. MODEL_NAME=tiny"
    ), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "models").exists()
    done = run_app(["make-tiny-model"])
    assert done.returncode == 0 and (tmp_path / "models" / "tiny-glm" / "config.json").is_file(), done.stderr


def test_commands_page_follows_the_groups():
    groups = [g.split(":")[0] for g, *_ in reference.make_targets()]
    assert list(dict.fromkeys(groups)) == ["use", "inspect", "develop"]
    page = reference.commands_page()
    assert [h for h in re.findall(r"^## (\w+)$", page, flags=re.M)] == ["use", "inspect", "develop"]
    assert "| `make chat` | interactive chat with the last adapter | `python -m app chat` |" in page
