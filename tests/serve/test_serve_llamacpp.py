"""`serve INFER_BACKEND=llama.cpp`: the real server on a loopback port serving a tiny GLM and two LoRA adapters
from one f16 base GGUF, each adapter a llama.cpp LoRA GGUF applied at run time on the one context.

The base is trained briefly first: a random model's next-token distribution is nearly flat, so float rounding
decides its argmax (there 1 of 15 answers parted from the merged GGUF's after ~25 tokens, measured); a model
that has learnt something is peaked, as users' models are. The adapters have random B (PEFT's default is 0), scaled to
change every target weight noticeably, so each answers differently from the other and from the base.

At f16 a LoRA applied at run time (W x + B A x, the adapter's tensors in f16) and the merged model's f16 weights
(W + B A, rounded once) differ only by rounding: greedy answers through the API equal, token for token, what
`predict INFER_BACKEND=llama.cpp` answers from the adapter merged and exported to GGUF.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path

import httpx2 as httpx
import pytest

from app.config import Config
from app.core import ownership

PROMPTS = (
    "抽取三元组：张三出生于北京。",
    "你好",
    "Extract every subject, predicate and object triplet from the sentence and answer in JSON.",
    '[{"subject": "星河往事", "predicate": "导演", "object": "林远"}]',
    "The quick brown fox jumps over the lazy dog.",
)
NEW_TOKENS = 32
SERVED = {"INFER_BACKEND": "llama.cpp", "GGUF_QUANT": "f16", "ADAPTERS": "a=models/a,b=models/b"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora(base: Path, out: Path, seed: int, model_name: str | None = None) -> None:
    """A LoRA of random weights on ``base``, saved as training saves one (tokenizer and train_config.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "train_config.json").write_text(
        json.dumps({"MODEL_NAME": model_name or str(base), "METHOD": "lora", "QUANT_LEVEL": "none"})
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory, llamacpp, learn_briefly):
    """A working dir: base/ (the tiny GLM, trained briefly) and models/a, models/b (its adapters); a is a run
    dir with its manifest, as training leaves one."""
    from app.models.tiny import build_tiny_model

    work = tmp_path_factory.mktemp("serve-gguf")
    base = build_tiny_model("tiny", work / "base")
    learn_briefly(base, 80)
    for name, seed in (("a", 0), ("b", 1)):
        _lora(base, work / "models" / name, seed)
    ownership.claim(work / "models" / "a", "train")
    return work


def _serve(serve_process, start, work: Path, **settings):
    """serve on the base GGUF and its adapters (SERVED), ``settings`` on top."""
    return serve_process(start, work, MODEL_NAME=work / "base", **{**SERVED, **settings})


def _chat(server, model: str, prompt: str, **kw):
    return server.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        **{"max_tokens": NEW_TOKENS, "temperature": 0, **kw},
    )


@pytest.fixture(scope="module")
def server(work, module_app_process, serve_process):
    return _serve(serve_process, module_app_process, work, SERVE_BATCH_SIZE=4)


def test_greedy_answers_equal_the_merged_gguf_and_differ_by_adapter(server, work, monkeypatch):
    from app.inference.predict import Predictor

    monkeypatch.chdir(work)
    answers, tokens = {}, 0
    base = str(work / "base")
    for model, adapter in (("a", "models/a"), ("b", "models/b"), (base, "none")):
        pred = Predictor(
            Config.from_dict(
                {
                    "MODEL_NAME": base,
                    "ADAPTER_DIR": adapter,
                    "INFER_BACKEND": "llama.cpp",
                    "GGUF_QUANT": "f16",
                    "MAX_NEW_TOKENS": NEW_TOKENS,
                    "NUM_THREADS": 2,
                }
            )
        )
        answers[model] = []
        for prompt in PROMPTS:
            r = _chat(server, model, prompt)
            expected = pred.generate([{"role": "user", "content": prompt}])
            assert r.choices[0].message.content == expected, (model, prompt)
            tokens += r.usage.completion_tokens
            answers[model].append(expected)
        pred.model.close()
    assert len({tuple(v) for v in answers.values()}) == 3, answers  # each adapter as itself, the base as neither
    assert tokens >= 3 * len(PROMPTS) * NEW_TOKENS // 2, tokens  # a comparison of many tokens, not of a few EOS


def test_a_stream_equals_the_whole_answer_and_ends_with_done(server):
    for model in ("a", "b"):
        whole = _chat(server, model, PROMPTS[0])
        chunks = list(_chat(server, model, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(deltas) == whole.choices[0].message.content and len(deltas) > 1
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(
        server.url + "/v1/completions",
        json={"model": "a", "prompt": "Answer: ", "max_tokens": 4, "stream": True},
        timeout=120,
    )
    events = [ln[len("data: ") :] for ln in raw.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "text_completion"


def test_stop_strings_max_tokens_and_seeded_sampling(server):
    whole = _chat(server, "a", PROMPTS[0]).choices[0].message.content
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    r = _chat(server, "a", PROMPTS[0], stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (whole[: whole.find(stop)], "stop")
    r = _chat(server, "a", PROMPTS[0], max_tokens=3)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 3)
    assert whole.startswith(r.choices[0].message.content)
    sampled = [
        _chat(server, "a", PROMPTS[0], temperature=1.0, seed=seed).choices[0].message.content for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] and whole not in sampled, sampled


def test_four_concurrent_requests_are_decoded_as_one_batch(server, work, app_process, serve_process):
    """A server that waits for SERVE_BATCH_SIZE=4 requests (the wait is only a hang guard): the four are one
    batch, four sequences of one llama.cpp context, and each answers as it does alone. It also reuses the
    base GGUF and the adapters' conversions the first server wrote."""
    alone = {p: _chat(server, "a", p).choices[0].message.content for p in PROMPTS[:4]}
    batched = _serve(serve_process, app_process, work, SERVE_BATCH_SIZE=4, SERVE_BATCH_WAIT_MS=120_000)
    got: dict[str, str] = {}

    def one(prompt: str) -> None:
        got[prompt] = _chat(batched, "a", prompt).choices[0].message.content

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == alone
    log = batched.proc.text()
    assert "serve: 4 requests for a generated together" in log, log[-3000:]
    assert "converting adapter" not in log and "exporting" not in log, log[-3000:]
    assert log.count("converted earlier from these files") == 2, log[-3000:]


def test_adapters_load_and_unload_at_run_time(server, work):
    expected = _chat(server, "a", PROMPTS[0]).choices[0].message.content
    r = server.post("/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": "models/a"})
    assert r.status_code == 200, r.text
    assert _chat(server, "a2", PROMPTS[0]).choices[0].message.content == expected
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "a2"}).status_code == 200
    assert (
        server.post(
            "/v1/chat/completions", {"model": "a2", "messages": [{"role": "user", "content": "hi"}]}
        ).status_code
        == 404
    )
    assert _chat(server, "a", PROMPTS[0]).choices[0].message.content == expected  # a's own handle untouched


def test_the_lora_gguf_lives_in_the_run_and_a_folder_of_yours_is_refused(server, work):
    from app.serve.gguf import LORA_DIR, LORA_FILE, LORA_INFO

    run = work / "models" / "a"
    assert LORA_DIR in ownership.read_marker(run)["entries"]  # remove-run takes it with the run
    assert (run / LORA_DIR / LORA_FILE).is_file() and json.loads((run / LORA_DIR / LORA_INFO).read_text())["key"]
    theirs = work / "models" / "c"
    shutil.copytree(run, theirs, ignore=shutil.ignore_patterns(LORA_DIR, "gguf", ownership.MARKER))
    (theirs / LORA_DIR).mkdir()
    (theirs / LORA_DIR / "notes.txt").write_text("mine")
    r = server.post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "models/c"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "holds files this tool did not write" in message and "\n" not in message, r.text
    assert sorted(p.name for p in (theirs / LORA_DIR).iterdir()) == ["notes.txt"]
    assert (theirs / LORA_DIR / "notes.txt").read_bytes() == b"mine"  # byte for byte


def test_p_tuning_and_another_bases_adapter_are_refused_in_one_line(server, work, tmp_path):
    from app.models.tiny import build_tiny_model

    prefix = work / "models" / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (prefix / "train_config.json").write_text(json.dumps({"METHOD": "ptuning", "MODEL_NAME": str(work / "base")}))
    other = build_tiny_model("tiny", tmp_path / "other", seed=1)
    _lora(other, work / "models" / "other", 0)
    for name, says in (("prefix", "P-Tuning"), ("other", "was trained on")):
        r = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"models/{name}"})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and says in message and "\n" not in message, r.text
    assert not (work / "models" / "other" / "gguf-lora").exists()


def test_without_llama_cpp_serve_says_so_in_one_line_before_torch_is_imported(tmp_path, child_env):
    """serve has no pre-flight: its own first check. llama.cpp is made missing by pointing the converter's dir
    elsewhere (where the binding itself is missing, that is the line instead); a `torch` that ends the process
    shows whether anything heavy was loaded first."""
    import os
    import subprocess
    import sys

    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise SystemExit('torch was imported')\n")
    code = (
        "import sys; from pathlib import Path; import app.inference.llamacpp as l; "
        "l.converter_dir = lambda: Path('no-llama.cpp'); from app.__main__ import main; sys.exit(main())"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "INFER_BACKEND=llama.cpp",
            "MODEL_NAME=tiny",
            "ADAPTERS=none",
            f"SERVE_PORT={_free_port()}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**child_env, "PYTHONPATH": f"{stub.parent}{os.pathsep}{child_env['PYTHONPATH']}"},
    )
    errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
    assert proc.returncode == 2 and "torch was imported" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "INFER_BACKEND=llama.cpp" in errors[0] and "make setup-gguf" in errors[0], errors


def test_requests_join_the_running_sequences_and_answer_as_alone(server, work, monkeypatch, serve_staging):
    """Two sequences (SERVE_BATCH_SIZE=2) and four greedy requests, each but the first sent while others decode:
    one joins at the next step, the next two each when a row has left, in the sequence it left (cleared first),
    and each answers token for token what it answers alone."""

    monkeypatch.chdir(work)
    staged = serve_staging.Staged(
        work / "base",
        Path("models"),
        ADAPTERS="a=models/a",
        SERVE_BATCH_SIZE=2,
        **{k: v for k, v in SERVED.items() if k != "ADAPTERS"},
    )
    try:
        jobs = [("a", staged.prompt(p), n) for p, n in zip(PROMPTS, (24, 4, 6, 4), strict=False)]
        alone = {k: serve_staging.answers(staged.run([job], [0]))[0] for k, job in enumerate(jobs)}
        events = staged.run(jobs, [0, 1, 2, 3])
    finally:
        staged.close()
        staged.models.model.close()
    assert serve_staging.answers(events) == alone
    assert alone[0][1] == ("done", "length", 24) and len({a for a, _ in alone.values()}) == len(jobs)
    assert serve_staging.joined(events) == {1: True, 2: True, 3: True}, events
