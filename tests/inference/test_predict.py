"""Predict in each mode: built-in prompt, PROMPT, file, interactive; adapter really used."""

import builtins
import json

import pytest
import torch

from app import Config, FineTuner, UserError
from app.inference.predict import BUILTIN_PROMPT, Predictor, run_predict


@pytest.fixture(scope="module")
def adapter(tiny_glm_dir, tmp_path_factory, write_dataset):
    work = tmp_path_factory.mktemp("predict")
    write_dataset(work, n_train=30, n_dev=5, seed=3)
    cfg = Config.from_dict(
        {
            "MODEL_NAME": str(tiny_glm_dir),
            "DATA_PATH": str(work / "train.jsonl"),
            "OUTPUT_DIR": str(work / "out"),
            "MAX_STEPS": 3,
            "GRAD_ACCUM": 1,
            "LEARNING_RATE": 1e-2,
            "SEED": 0,
        }
    )
    ft = FineTuner(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # models/.last_run goes there, not into the checkout
        ft.run()
    return ft, work / "out", work


def pcfg(adapter_dir, **extra):
    # MODEL_NAME deliberately not given: the base comes from the adapter's train_config.json.
    return Config.from_dict({"ADAPTER_DIR": str(adapter_dir), "MAX_NEW_TOKENS": 6, **extra})


def test_predictor_uses_the_trained_adapter(adapter, tiny_glm_dir, greedy_reference):
    ft, out, _ = adapter
    pred = Predictor(pcfg(out))
    ids = torch.tensor([ft.train_rows[0]["input_ids"]])
    ft.model.eval()
    with torch.no_grad():
        assert torch.equal(pred.model(input_ids=ids).logits, ft.model(input_ids=ids).logits)
        base = Predictor(pcfg("none", MODEL_NAME=str(tiny_glm_dir)))
        assert not torch.allclose(
            base.model(input_ids=ids).logits.float(), pred.model(input_ids=ids).logits.float(), atol=1e-4
        )
    # generate() is the greedy decode of the prompt, new tokens only: the same text as an independent
    # argmax loop (an empty, constant or prompt-echoing generator gives something else)
    answers = {}
    for prompt in ("你好", "抽取三元组：张三出生于北京。"):
        msgs = [{"role": "user", "content": prompt}]
        answers[prompt] = greedy_reference(pred.model, pred.tokenizer, msgs, 6)
        assert answers[prompt].strip() and pred.generate(msgs) == answers[prompt]
        assert pred.generate(msgs) == answers[prompt]  # deterministic
    assert len(set(answers.values())) == 2  # the answer depends on the prompt


def test_prompt_and_builtin_prompt_stream_to_stdout(adapter, capsys, greedy_reference):
    _, out, _ = adapter
    pred = Predictor(pcfg(out))
    streamed = {}
    for prompt, cfg in (
        ("抽取三元组：张三出生于北京。", pcfg(out, PROMPT="抽取三元组：张三出生于北京。")),
        (BUILTIN_PROMPT, pcfg(out)),
    ):
        run_predict(cfg)
        shown = capsys.readouterr().out
        assert shown.startswith(f"prompt: {prompt}\n---\n")
        streamed[prompt] = shown.split("---\n", 1)[1]
        # the streamed text is the greedy answer to that prompt, then a newline
        expected = greedy_reference(pred.model, pred.tokenizer, [{"role": "user", "content": prompt}], 6)
        assert expected.strip() and streamed[prompt] == expected + "\n"
    assert len(set(streamed.values())) == 2


def test_file_mode_writes_one_row_per_line(adapter, tmp_path, greedy_reference):
    _, out, work = adapter
    src = tmp_path / "in.jsonl"
    records = [json.loads(line) for line in (work / "dev.jsonl").read_text().splitlines()[:2]]
    src.write_text(
        "\n".join(
            [json.dumps(r, ensure_ascii=False) for r in records]
            + ["一句普通的提问", json.dumps({"instruction": "翻译", "input": "hello"}), ""]
        )
        + "\n"
    )
    run_predict(pcfg(out, INPUT_FILE=str(src)))
    rows = [json.loads(line) for line in (tmp_path / "in.pred.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["reference"] == records[0]["target"] and rows[0]["prompt"] == records[0]["context"]
    assert rows[2]["prompt"] == "一句普通的提问" and "reference" not in rows[2]
    assert rows[3]["prompt"] == "翻译\nhello" and "reference" not in rows[3]
    # each row's output is the greedy answer to that row's own prompt (not a neighbour's, not empty)
    pred = Predictor(pcfg(out))
    convs = [
        [{"role": "user", "content": p}] for p in [r["context"] for r in records] + ["一句普通的提问", "翻译\nhello"]
    ]
    expected = [greedy_reference(pred.model, pred.tokenizer, m, 6) for m in convs]
    assert all(e.strip() for e in expected) and len(set(expected)) == 4
    assert [r["output"] for r in rows] == expected


def test_file_mode_leaves_no_partial_output_on_failure(adapter, tmp_path, monkeypatch):
    _, out, _ = adapter
    src = tmp_path / "in.txt"
    src.write_text("一\n二\n三\n")
    calls = []
    from transformers.generation.utils import GenerationMixin

    real = GenerationMixin.generate

    def flaky(self, *args, **kwargs):  # the second batch fails, after the first was generated
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", flaky)
    with pytest.raises(RuntimeError):
        run_predict(pcfg(out, INPUT_FILE=str(src), OUTPUT_FILE=str(tmp_path / "o.jsonl"), PREDICT_BATCH_SIZE=1))
    assert list(tmp_path.iterdir()) == [src]  # neither the output nor a temp file is left


def test_file_mode_batches_give_the_one_by_one_answers(adapter, tmp_path, caplog):
    """Prompts of different lengths, 3 to a batch (left-padded, KV cache): the same greedy answers
    as one prompt at a time, in the file's order, and the speed is logged."""
    _, out, work = adapter
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(line + "\n" for line in (work / "dev.jsonl").read_text().splitlines()[:4])
        + "短问题\n一个长一些的问题，关于北京和上海之间的距离以及两座城市的历史\n"
    )
    pred = Predictor(pcfg(out, MAX_NEW_TOKENS=8))
    from app.inference.predict import _file_prompts

    convs = [msgs for _, msgs, _ in _file_prompts(src, "auto")]
    one_by_one = [pred.generate(m) for m in convs]
    caplog.set_level("INFO", logger="app.inference.predict")
    pred.cfg = pred.cfg.replace({"PREDICT_BATCH_SIZE": 3})  # batches of 3, the last one short
    assert pred.generate_many(convs, progress=False) == one_by_one
    tokens, seconds = pred.last_speed
    assert 0 < tokens <= 8 * len(convs) and seconds > 0
    assert "tokens/s" in caplog.text


def test_interactive_mode_keeps_history(adapter, monkeypatch, capsys):
    _, out, _ = adapter
    answers = iter(["你好", "再说一次", "/exit"])  # an empty line re-prompts since the chat rework
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    seen = []
    real = Predictor.generate

    def spy(self, messages, stream=False):
        seen.append([m["content"] for m in messages])
        return real(self, messages, stream)

    monkeypatch.setattr(Predictor, "generate", spy)
    run_predict(pcfg(out, INTERACTIVE=True))
    assert len(seen) == 2 and seen[1][0] == "你好" and seen[1][-1] == "再说一次" and len(seen[1]) == 3
    assert capsys.readouterr().out.count("模型> ") == 2


def test_missing_adapter_names_the_setting(tmp_path):
    with pytest.raises(UserError, match="ADAPTER_DIR="):
        Predictor(pcfg(tmp_path / "nothing-here"))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_file_mode_output_has_the_umasks_permissions(adapter, tmp_path, umask):
    """OUTPUT_FILE is readable as any file the user writes (it was mkstemp's 0600 whatever the umask)."""
    import os
    import stat

    _, out, _ = adapter
    src = tmp_path / "in.txt"
    src.write_text("一句普通的提问\n")
    old = os.umask(umask)
    try:
        run_predict(pcfg(out, INPUT_FILE=str(src), OUTPUT_FILE=str(tmp_path / "o.jsonl")))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o.jsonl").stat().st_mode) == 0o666 & ~umask


def test_file_mode_refuses_an_input_without_prompts_and_keeps_the_output(adapter, tmp_path):
    """An INPUT_FILE with no line of text is most likely the wrong file: one line that says so, and an
    earlier OUTPUT_FILE is not replaced by an empty one (it was, with no word said)."""
    _, out, _ = adapter
    src, dest = tmp_path / "in.txt", tmp_path / "o.jsonl"
    src.write_text("\n  \n\n")
    dest.write_text('{"line": 1, "output": "an earlier prediction"}\n')
    with pytest.raises(UserError) as e:
        run_predict(pcfg(out, INPUT_FILE=str(src), OUTPUT_FILE=str(dest)))
    line = str(e.value)
    assert "\n" not in line and f"INPUT_FILE={src}" in line and "0 predictions" in line and str(dest) in line
    assert dest.read_text() == '{"line": 1, "output": "an earlier prediction"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "o.jsonl"]  # no temp file either


LONG = "长" * 2100  # one token a character: over the tiny GLM's 2,048-token context


def test_prompt_longer_than_the_context_is_refused_in_one_line(adapter, cli):
    """predict-custom with a PROMPT the model cannot attend to: exit 2 and one line with the prompt's tokens,
    the context and the fix, before anything is generated (transformers only warned, and it answered)."""
    from app.inference.terminal_chat import context_size, prompt_tokens

    _, out, _ = adapter
    pred = Predictor(pcfg(out))
    n, context = prompt_tokens(pred, [{"role": "user", "content": LONG}]), context_size(pred.model, pred.tokenizer)
    assert context == 2048 and n > context
    code, errors, _ = cli("predict-custom", f"ADAPTER_DIR={out}", "MAX_NEW_TOKENS=6", f"PROMPT={LONG}")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"PROMPT is {n:,} tokens") and "context is 2,048 tokens" in errors[0]
    # over the context itself: a smaller MAX_NEW_TOKENS would not help, so it is not offered
    assert errors[0].endswith(f"(MAX_NEW_TOKENS=6): shorten PROMPT to at most {2048 - 6:,} tokens"), errors


def test_file_line_longer_than_the_context_is_refused_before_any_answer(adapter, tmp_path):
    _, out, _ = adapter
    src = tmp_path / "in.txt"
    src.write_text(f"短问题\n{LONG}\n")
    with pytest.raises(UserError, match=rf"INPUT_FILE={src}: line 2 is [\d,]+ tokens.*context is 2,048 tokens"):
        run_predict(pcfg(out, INPUT_FILE=str(src)))
    assert list(tmp_path.iterdir()) == [src]  # nothing written
