"""`make chat` (predict INTERACTIVE=1): commands, quitting, a clean transcript and a context that
never overflows. Driven through run_predict with a scripted input() on the tiny GLM, no adapter."""

import builtins
import json
import logging
import re
import shutil
import time

import pytest

from app import Config
from app.data.encode import prompt_text
from app.inference.predict import Predictor, run_predict

NEW = 8  # MAX_NEW_TOKENS in these tests: short answers keep them fast


@pytest.fixture(scope="module")
def small_ctx_dir(tiny_glm_dir, tmp_path_factory):
    """The tiny GLM with a 96-token context (its tokenizer still says 2048: the smaller one counts)."""
    path = tmp_path_factory.mktemp("small-ctx") / "tiny"
    shutil.copytree(tiny_glm_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 96}))
    return path


@pytest.fixture
def chat(tmp_path, monkeypatch, tiny_glm_dir):
    """run(lines, model_dir=None) -> (prompts seen by the model, lines never read, started_at).

    input() returns the lines in turn, then raises EOFError as a real stdin at its end does.
    Each Predictor.generate call records its messages and their rendered token count."""
    monkeypatch.chdir(tmp_path)  # nothing written into the repo
    seen: list[dict] = []
    real = Predictor.generate

    def spy(self, messages, stream=False):
        text = prompt_text(self.tokenizer, messages)
        seen.append(
            {
                "messages": [dict(m) for m in messages],
                "tokens": len(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
            }
        )
        return real(self, messages, stream)

    monkeypatch.setattr(Predictor, "generate", spy)

    def run(lines, model_dir=None):
        pending = list(lines)
        started: list[float] = []

        def fake_input(prompt=""):
            if not started:
                started.append(time.time())  # the model is loaded, the chat loop runs
            if not pending:
                raise EOFError
            return pending.pop(0)

        monkeypatch.setattr(builtins, "input", fake_input)
        run_predict(
            Config.from_dict(
                {
                    "MODEL_NAME": str(model_dir or tiny_glm_dir),
                    "ADAPTER_DIR": "none",
                    "MAX_NEW_TOKENS": NEW,
                    "INTERACTIVE": True,
                }
            )
        )
        return seen, pending, started[0]

    return run


def test_empty_line_is_ignored_and_eof_quits(chat, capsys):
    seen, pending, _ = chat(["", "   ", "你好"])  # then EOF (Ctrl-D)
    assert [s["messages"] for s in seen] == [[{"role": "user", "content": "你好"}]]
    out = capsys.readouterr().out
    assert out.count("模型> ") == 1
    assert out.endswith("\n")  # after Ctrl-D the shell prompt starts on a fresh line


@pytest.mark.parametrize("command", ["/exit", "/quit"])
def test_exit_and_quit_end_the_chat(chat, command):
    seen, pending, _ = chat(["你好", command, "never read"])
    assert len(seen) == 1
    assert pending == ["never read"]


def test_reset_confirms_and_clears_history(chat, capsys):
    seen, _, _ = chat(["第一个问题", "/reset", "第二个问题", "/exit"])
    assert len(seen) == 2
    assert seen[1]["messages"] == [{"role": "user", "content": "第二个问题"}]  # no earlier turns
    assert "history cleared" in capsys.readouterr().err


def test_help_lists_the_commands(chat, capsys):
    seen, _, _ = chat(["/help", "/exit"])
    assert seen == []  # a command, not a message for the model
    err = capsys.readouterr().err
    help_text = err[err.index("/help") :]
    for command in ("/help", "/reset", "/exit", "/quit", "Ctrl-D"):
        assert command in help_text


def test_long_conversation_drops_its_oldest_turns_and_still_answers(chat, capsys, small_ctx_dir):
    sent = [f"第{n}个问题：请把这句话再说一遍" for n in range(1, 7)]
    seen, _, _ = chat(sent, small_ctx_dir)
    assert len(seen) == len(sent)  # every message was answered
    for s in seen:  # prompt + answer always fit the 96-token context
        assert s["tokens"] + NEW <= 96
    last = [m["content"] for m in seen[-1]["messages"] if m["role"] == "user"]
    assert last[-1] == sent[-1] and last == sent[len(sent) - len(last) :]  # the newest turns, in order
    assert len(last) < len(sent)
    out, err = capsys.readouterr()
    assert out.count("模型> ") == len(sent)
    dropped = [int(n) for n in re.findall(r"dropped (\d+) earlier turns?", err)]
    assert dropped and sum(dropped) == len(sent) - len(last)  # each drop said so, with the count
    assert "context" in err and "MAX_NEW_TOKENS" in err  # and why


def test_message_too_long_for_the_context_is_refused_in_one_line(chat, capsys, small_ctx_dir):
    seen, _, _ = chat(["你好", "长" * 200, "再见"], small_ctx_dir)
    assert len(seen) == 2  # the long one was not sent; the chat went on
    assert all("长" * 200 != m["content"] for s in seen for m in s["messages"])
    assert seen[1]["messages"][0]["content"] == "你好" and seen[1]["messages"][-1]["content"] == "再见"
    out, err = capsys.readouterr()
    assert out.count("模型> ") == 2
    refusal = [line for line in err.splitlines() if "MAX_NEW_TOKENS" in line]
    assert len(refusal) == 1 and f"shorten it to at most {96 - NEW} tokens" in refusal[0], refusal
    # with the message's tokens and the context, as predict-custom refuses a PROMPT
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_ctx_dir)
    text = prompt_text(tok, [{"role": "user", "content": "长" * 200}])
    tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert f"this message is {tokens:,} tokens" in refusal[0] and "context is 96 tokens" in refusal[0], refusal


def test_no_info_log_lines_between_turns_but_warnings_show(chat, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    real = Predictor.generate

    def warn_then_answer(self, messages, stream=False):
        logging.getLogger("app.inference.predict").warning("a warning still reaches the user")
        return real(self, messages, stream)

    monkeypatch.setattr(Predictor, "generate", warn_then_answer)
    _, _, started = chat(["你好", "再说一次", "/exit"])
    during = [r for r in caplog.records if r.created >= started]
    assert [r.getMessage() for r in during if r.levelno < logging.WARNING] == []
    assert any(r.levelno == logging.WARNING and "still reaches" in r.getMessage() for r in during)
    # after the chat the app logs as before
    assert logging.getLogger("app").getEffectiveLevel() == logging.INFO
