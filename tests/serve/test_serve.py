"""`serve`: the real server on a loopback port, a tiny GLM with two trained LoRA adapters, talked to with
the official openai client and with raw HTTP."""

import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from app import Config, FineTuner
from app.inference.predict import Predictor

PROMPTS = ["抽取三元组：张三出生于北京。", "你好"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tiny_glm_dir, tmp_path_factory, write_dataset):
    """A working dir whose models/ holds two adapters trained apart (data seed, learning rate, steps)."""
    work = tmp_path_factory.mktemp("serve")
    for name, seed, lr, steps in (("a", 3, 1e-2, 3), ("b", 5, 5e-2, 6)):
        data = work / f"data-{name}"
        write_dataset(data, n_train=30, n_dev=5, seed=seed)
        cfg = Config.from_dict(
            {
                "MODEL_NAME": str(tiny_glm_dir),
                "DATA_PATH": str(data / "train.jsonl"),
                "OUTPUT_DIR": str(work / "models" / name),
                "MAX_STEPS": steps,
                "GRAD_ACCUM": 1,
                "LEARNING_RATE": lr,
                "SEED": 0,
                "QUANT_LEVEL": "none",
                "VAL_SIZE": 0,
            }
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)  # models/.last_run goes there, not into the checkout
            FineTuner(cfg).run()
    return work


@pytest.fixture(scope="module")
def server(work, module_app_process, serve_process):
    return serve_process(module_app_process, work, ADAPTERS="a=models/a,b=models/b", SERVE_MAX_PROMPT_TOKENS=200)


def _chat(server, model, prompt, **kw):
    r = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0, **kw
    )
    return r


def test_models_lists_the_base_and_each_adapter_with_the_base_as_parent(server, tiny_glm_dir):
    models = {m.id: m for m in server.client().models.list().data}
    base = str(tiny_glm_dir)
    assert set(models) == {base, "a", "b"}
    assert models["a"].parent == models["b"].parent == base and models[base].parent is None


def test_greedy_answers_equal_predict_custom_and_differ_by_adapter(server, work, tiny_glm_dir):
    answers = {}
    for model, adapter in (("a", work / "models" / "a"), ("b", work / "models" / "b"), (str(tiny_glm_dir), "none")):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            pred = Predictor(
                Config.from_dict({"ADAPTER_DIR": str(adapter), "MAX_NEW_TOKENS": 8, "MODEL_NAME": str(tiny_glm_dir)})
            )
        answers[model] = []
        for prompt in PROMPTS:
            r = _chat(server, model, prompt)
            expected = pred.generate([{"role": "user", "content": prompt}])
            assert r.choices[0].message.content == expected, (model, prompt)
            assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 1
            answers[model].append(expected)
    a, b, base = (tuple(v) for v in answers.values())
    assert len({a, b, base}) == 3, answers  # each adapter answers as itself, the base as neither


def test_a_stream_uses_its_adapter_and_ends_with_done(server):
    for model in ("a", "b"):
        whole = _chat(server, model, PROMPTS[0]).choices[0].message.content
        chunks = list(_chat(server, model, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole
        assert chunks[-1].usage.completion_tokens >= 1 and chunks[-2].choices[0].finish_reason in ("stop", "length")
    raw = server.post(
        "/v1/chat/completions",
        {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
    )
    events = [ln[len("data: ") :] for ln in raw.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"


def test_completions_answer_raw_prompts(server):
    r = server.client().completions.create(model="a", prompt="Answer: ", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    again = server.client().completions.create(model="a", prompt="Answer: ", max_tokens=5, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_adapters_load_and_unload_without_a_restart(server, work):
    def ids():
        return {m.id for m in server.client().models.list().data}

    r = server.post("/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": "models/a"})
    assert r.status_code == 200, r.text
    assert "a2" in ids()
    assert (
        _chat(server, "a2", PROMPTS[0]).choices[0].message.content
        == _chat(server, "a", PROMPTS[0]).choices[0].message.content
    )  # the same weights under a new name
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "a2"}).status_code == 200
    assert "a2" not in ids()
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "a2"}).status_code == 404


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ({"model": "a"}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": "a", "messages": [{"role": "user", "content": "长" * 400}]}, 400, "messages"),
        ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temprature": 0.5}, 400, "temprature"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, body, status, param):
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_adapter_paths_must_stay_inside_models(server, work, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (work / "models" / "escape").symlink_to(outside)
    try:
        for path in ("../../etc", "/etc", "models/escape", "models/../data-a"):
            r = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text)
    finally:
        (work / "models" / "escape").unlink()
    assert "x" not in {m.id for m in server.client().models.list().data}


def test_p_tuning_adapters_are_refused_in_one_line(server, work, tiny_glm_dir):
    prefix = work / "models" / "prefix"
    prefix.mkdir(exist_ok=True)
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (prefix / "train_config.json").write_text(json.dumps({"METHOD": "ptuning", "MODEL_NAME": str(tiny_glm_dir)}))
    r = server.post("/v1/load_lora_adapter", {"lora_name": "prefix", "lora_path": "models/prefix"})
    assert r.status_code == 400 and "P-Tuning" in r.json()["error"]["message"]
    assert "predict-custom ADAPTER_DIR=" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]


def test_a_body_over_the_cap_is_refused(server):
    big = {"model": "a", "messages": [{"role": "user", "content": "x" * 300 * 1024}]}  # SERVE_MAX_BODY_KB=256
    r = server.post("/v1/chat/completions", big)
    assert r.status_code == 400 and "SERVE_MAX_BODY_KB" in r.json()["error"]["message"]


def test_concurrent_requests_for_two_adapters_each_get_their_own_answer(server):
    expected = {m: _chat(server, m, PROMPTS[0]).choices[0].message.content for m in ("a", "b")}
    got: list[tuple[str, str]] = []

    def one(model):
        got.append((model, _chat(server, model, PROMPTS[0]).choices[0].message.content))

    threads = [threading.Thread(target=one, args=("ab"[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(got) == 8 and all(answer == expected[model] for model, answer in got), (expected, got)


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    body = {
        "model": "a",
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 1000,
        "temperature": 1.0,
        "stream": True,
        "stop": ["\x00never"],
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            chunk = json.loads(line[len("data: ") :]) if line.startswith("data: {") else {}
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                break  # text arrived: leave mid-stream
    deadline = time.monotonic() + 60
    while not (m := re.search(r"request cancelled after (\d+) tokens", server.proc.text())):
        assert time.monotonic() < deadline, server.proc.text()[-2000:]
        time.sleep(0.1)
    assert int(m.group(1)) < 1000  # stopped, not run to max_tokens
    assert _chat(server, "a", "hi").choices[0].finish_reason in ("stop", "length")


def test_auth_when_an_api_key_is_set(work, app_process, serve_process):
    server = serve_process(app_process, work, ADAPTERS="a=models/a", API_KEY="s3cret")
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        server.client("wrong").models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
    assert [m.id for m in server.client("s3cret").models.list().data][-1] == "a"
    assert httpx.get(server.url + "/health").status_code == 200  # the health check needs no key


def test_a_full_queue_answers_429_and_every_request_ends(work, app_process, serve_process):
    server = serve_process(app_process, work, ADAPTERS="a=models/a", SERVE_MAX_QUEUE=8, SERVE_BATCH_SIZE=4)
    statuses: list[int] = []
    body = {"model": "a", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 16}

    def one():
        statuses.append(server.post("/v1/chat/completions", body).status_code)

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(statuses) == 64 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) >= 8
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "waiting": 0, "models": 2}


def test_bench_serve_judges_the_batching_targets_honestly():
    from bench.bench_serve import report

    def row(server, tps, ttft=0.1):
        return {
            "server": server,
            "adapters": "a",
            "concurrency": 16,
            "requests": 48,
            "tokens": 3072,
            "wall_s": 1,
            "tokens_per_s": tps,
            "p50_s": 1,
            "p95_s": 1,
            "ttft_p50_s": ttft,
        }

    env = {"cpus": 2, "load_before": 0.5, "load_after": 1.5, "requests": 3, "max_tokens": 64, "before": "a86d07e"}
    assert "3.50x (target >= 3x) -> PASS" in report([row("one at a time", 10), row("batched", 35)], env)
    assert "2.90x (target >= 3x) -> FAIL" in report([row("one at a time", 10), row("batched", 29)], env)
    text = report([row("batched", 35, ttft=1.0), row("run to end", 35, ttft=4.6)], env)
    assert "- p50 time to first token at 16 clients <= 1 s: 1.0 s -> PASS" in text
    assert "- tokens/s at 16 clients no lower than run-to-end batching: 35 vs 35 -> PASS" in text
    assert "load average (1 min) 0.5 at the start, 1.5 at the end" in text and "commit a86d07e" in text
    text = report([row("batched", 34.9, ttft=1.01), row("run to end", 35, ttft=4.6)], env)
    assert "- p50 time to first token at 16 clients <= 1 s: 1.01 s -> FAIL" in text
    assert "- tokens/s at 16 clients no lower than run-to-end batching: 34.9 vs 35 -> FAIL" in text


def test_a_taken_port_is_one_line_before_any_loading(run_app, tiny_glm_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_app(["serve", f"MODEL_NAME={tiny_glm_dir}", "ADAPTERS=none", f"SERVE_PORT={port}"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and f"SERVE_PORT={port}" in errors[0] and "another SERVE_PORT" in errors[0]
    assert "serve: base" not in r.stderr  # refused before the model was loaded


@pytest.fixture
def outside(work, tmp_path):
    """Adapter a copied outside models/, reached by a symlink in it and as a sibling named like it: real
    adapters (the dirs above hold none), so only the guard can refuse them. path as given -> the copy."""
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(work / "models" / "a", copy)
    (work / "models" / "escape").symlink_to(copy)
    shutil.copytree(work / "models" / "a", work / "models_evil" / "a")
    try:
        yield {"models/escape": copy, "models_evil/a": work / "models_evil" / "a"}
    finally:
        (work / "models" / "escape").unlink()
        shutil.rmtree(work / "models_evil")


def test_the_guard_refuses_an_adapter_outside_models_however_it_is_reached(work, outside, monkeypatch):
    from app.core.errors import UserError
    from app.serve.adapters import discover, inside, read_adapter

    monkeypatch.chdir(work)
    for path, real in outside.items():
        assert read_adapter("x", real).base  # an adapter: nothing but the guard stands in its way
        assert inside(Path("models"), path) is None, path
        with pytest.raises(UserError) as e:
            discover(f"x={path}", Path("models"))
        assert e.value.problems == [
            f"ADAPTERS: {path} is not inside models/; serve only adapters under it (move or copy the run there)"
        ]
    assert inside(Path("models"), "models/a") == (work / "models" / "a").resolve()
    assert [a.name for a in discover("models/a", Path("models"))] == ["a"]


def test_load_lora_adapter_refuses_an_adapter_outside_models_with_the_guards_line(server, outside):
    try:
        for path in outside:
            r = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text)
            assert (
                r.json()["error"]["message"] == "lora_path must be a dir inside models/ (no '..', no symlink out of it)"
            ), (path, r.text)
        assert "x" not in {m.id for m in server.client().models.list().data}
    finally:
        server.post("/v1/unload_lora_adapter", {"lora_name": "x"})  # were it let in: the other tests are unchanged


def test_serve_refuses_an_adapter_outside_models_at_start_up(work, outside, app_process, tiny_glm_dir):
    """ADAPTERS read at start-up (the guard's every spelling: the test above): one line and exit 2, before the
    base is loaded; a server that comes up fails the test."""
    port, path = _free_port(), "models_evil/a"
    proc = app_process(
        ["serve", f"SERVE_PORT={port}", f"MODEL_NAME={tiny_glm_dir}", f"ADAPTERS=x={path}"],
        cwd=work,
        log=work / f"serve-{port}.log",
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + 300  # a hang guard only
    while proc.proc.poll() is None and not up():
        assert time.monotonic() < deadline, proc.text()[-2000:]
        time.sleep(0.05)
    assert proc.proc.poll() == 2, proc.text()[-2000:]  # not serving
    errors = [ln.split(" ERROR app: ", 1)[1] for ln in proc.text().splitlines() if " ERROR app: " in ln]
    assert errors == [
        f"ADAPTERS: {path} is not inside models/; serve only adapters under it (move or copy the run there)"
    ], proc.text()[-2000:]
    assert "serve: base" not in proc.text()


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 120  # a hang guard only
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_exactly_serve_max_queue_requests_wait_and_the_next_one_gets_429(tiny_glm_dir, tmp_path):
    """The real app and engine in this process, the engine held on its own lock (it generates under it) while
    one request of ours is out of the queue: SERVE_MAX_QUEUE requests then wait, the next is refused, and
    once the engine runs again every waiting one is answered."""
    import asyncio

    from app.serve.api import create_app
    from app.serve.engine import Engine, Job
    from app.serve.model_pool import ServedModels

    cfg = Config.from_dict(
        {
            "MODEL_NAME": str(tiny_glm_dir),
            "ADAPTERS": "none",
            "SERVE_MAX_QUEUE": 3,
            "SERVE_BATCH_SIZE": 1,
            "NUM_THREADS": 2,
        }
    )
    cap = cfg.serve.serve_max_queue
    models = ServedModels(cfg, root=tmp_path / "models")
    engine = Engine(models, cap, cfg.serve.serve_batch_size, 0.0)
    app = create_app(models, engine, cfg)
    body = {"model": models.base_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    plug: list[tuple] = []
    held = [True]

    async def requests() -> tuple[list[int], httpx.Response, int]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://serve", timeout=120
        ) as client:
            queued = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(cap)]
            deadline = time.monotonic() + 120  # a hang guard only
            while engine.waiting() < cap:
                assert not any(t.done() for t in queued), [t.result().text for t in queued if t.done()]
                assert time.monotonic() < deadline, engine.waiting()
                await asyncio.sleep(0.01)
            extra = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            while not extra.done() and engine.waiting() == cap:  # refused at once, or (wrongly) queued
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            waiting = engine.waiting()
            engine.lock.release()  # the engine runs again
            held.clear()
            answered = [(await t).status_code for t in queued]
            return answered, await extra, waiting

    engine.lock.acquire()
    try:
        engine.submit(Job(None, [1, 2, 3], 1, plug.append))
        _until(lambda: engine.waiting() == 0, "the engine did not take the first request")  # now held on the lock
        answered, extra, waiting = asyncio.run(requests())
    finally:
        if held:  # the requests ended early: let the engine go
            engine.lock.release()
        _until(lambda: plug and plug[-1][0] == "done", "the first request did not finish")
        engine.stop()
    assert waiting == cap and answered == [200] * cap, (waiting, answered)
    assert extra.status_code == 429, extra.text
    assert extra.json()["error"] == {
        "message": f"the server is busy: {cap} requests are waiting (SERVE_MAX_QUEUE); retry shortly",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }


def test_a_server_whose_parent_has_already_ended_loads_nothing(run_app, tiny_glm_dir):
    """The web UI names itself in APP_PARENT_PID when it starts its chat backend; a UI that died before the
    backend got going (the pid is no longer its parent) must not leave a model loaded for nobody."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a parent that has ended: its pid is nobody's parent now
    r = run_app(
        ["serve", f"MODEL_NAME={tiny_glm_dir}", "ADAPTERS=none", f"SERVE_PORT={_free_port()}"],
        timeout=120,
        APP_PARENT_PID=str(gone.pid),
    )
    assert r.returncode == 143, r.stderr[-2000:]
    assert (
        f"the process that started this one (APP_PARENT_PID={gone.pid}, e.g. the web UI) had already ended "
        "when this one started: stopping" in r.stderr
    )
    assert "app.serve.api_server" not in r.stderr and "app.serve.model_pool" not in r.stderr  # stopped before loading


# ---- the running batch: requests join it between decode steps (app/serve/engine.py, batch.py) ---------------


def _attending(model_dir: Path, out: Path) -> Path:
    """A copy of a random tiny model whose attention is peaked: a random one attends to every token almost evenly,
    so where each token sits (its position id, the padding before it) would barely change its answer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10)
    model.save_pretrained(out)
    return out


# prompts of different lengths (a joiner is shorter, then longer, than the running cache) and answers that end at
# different steps (rows leave, and the cache's unused left columns go)
STAGGERED = [(0, 80, 24), (1, 10, 6), (2, 120, 16), (3, 30, 20), (4, 60, 10), (5, 5, 12)]
AFTER = [0, 1, 3, 3, 8, 15]


@pytest.mark.parametrize("family", ["tiny", "tiny-qwen2", "tiny-gemma3"])
def test_requests_joining_a_running_batch_answer_as_each_does_alone(serve_staging, family, request, tmp_path, caplog):
    """Six greedy requests, each but the first sent while others generate: each joins the running batch at the next
    step and answers token for token what it answers alone. Gemma 3's sliding-window cache cannot be merged: there
    they wait for the batch to end instead, with a line saying so, and answer the same."""
    from app.data.synthetic import generate_samples
    from app.models.tiny import build_tiny_model

    model_dir = {
        "tiny": lambda: request.getfixturevalue("tiny_glm_dir"),
        "tiny-qwen2": lambda: request.getfixturevalue("tiny_qwen2_dir"),
        "tiny-gemma3": lambda: build_tiny_model("tiny-gemma3", tmp_path / "tiny-gemma3"),
    }[family]()
    caplog.set_level(logging.INFO, logger="app.serve.engine")
    staged = serve_staging.Staged(_attending(model_dir, tmp_path / "sharp"), tmp_path / "models")
    try:
        texts = [s["context"] for s in generate_samples(len(STAGGERED), seed=4)]
        jobs = [(None, staged.prompt(texts[i][:chars]), new) for i, chars, new in STAGGERED]
        alone = {k: serve_staging.answers(staged.run([job], [0]))[0] for k, job in enumerate(jobs)}
        events = staged.run(jobs, AFTER)
    finally:
        staged.close()
    assert serve_staging.answers(events) == alone
    assert len({a for a, _ in alone.values()}) == len(jobs)  # six different answers: nothing trivially equal
    joined = serve_staging.joined(events)
    assert len(joined) == len(jobs) - 1, events
    sliding = family == "tiny-gemma3"
    assert set(joined.values()) == {not sliding}, (joined, events)
    assert ("sliding-window" in caplog.text) == sliding


@pytest.fixture
def staged_ab(serve_staging, work, monkeypatch, tiny_glm_dir):
    monkeypatch.chdir(work)
    staged = serve_staging.Staged(tiny_glm_dir, Path("models"), ADAPTERS="a=models/a,b=models/b")
    yield staged
    staged.close()


def test_a_request_joins_only_while_no_other_adapters_request_waits_before_it(serve_staging, staged_ab):
    """a0 runs; a1 joins it; b0 must wait (a batch is one adapter), and a2, sent after b0, must not join a0's batch
    before it, or b0 could wait for ever: a0's batch drains, b0's runs, then a2's. Each answers as it does alone."""
    prompt = staged_ab.prompt(PROMPTS[0])
    jobs = [("a", prompt, 12), ("a", staged_ab.prompt(PROMPTS[1]), 8), ("b", prompt, 8), ("a", prompt, 8)]
    alone = {k: serve_staging.answers(staged_ab.run([job], [0]))[0] for k, job in enumerate(jobs)}
    events = staged_ab.run(jobs, [0, 1, 2, 2])
    assert serve_staging.answers(events) == alone
    assert serve_staging.joined(events) == {1: True, 2: False, 3: False}, events
    first = {k: next(i for i, e in enumerate(events) if e[0] == k and e[1] != "submitted") for k in range(4)}
    assert first[2] < first[3], events  # b0, waiting first, is answered first


def test_a_running_batch_takes_no_one_while_an_adapter_change_waits_for_it(staged_ab):
    """Loading or unloading an adapter waits for the engine's lock, which a batch holds while it runs: a batch that
    kept taking requests would hold it off for as long as they come. While someone waits for it, the batch takes
    no one, drains, and the waiting one goes before the next batch."""
    prompt = staged_ab.prompt(PROMPTS[0])
    events: list[tuple] = []

    def change():
        with staged_ab.engine.lock:  # as ServedModels.load/unload take it
            events.append(("lock", "held"))

    def hook(seen):
        nonlocal events
        events = seen
        if len(seen) == 2:  # a0's first event: someone wants the lock before a1 is sent
            threading.Thread(target=change).start()
            _until(lambda: staged_ab.engine.lock.waiting, "the lock's waiter was not counted")

    seen = staged_ab.run([("a", prompt, 12), ("a", prompt, 8)], [0, 2], hook=hook)
    held = seen.index(("lock", "held"))
    a0_done = next(i for i, e in enumerate(seen) if e[:2] == (0, "done"))
    a1_first = next(i for i, e in enumerate(seen) if e[0] == 1 and e[1] != "submitted")
    assert a0_done < held < a1_first, seen


def _long_prompts(staged, n: int) -> list[list[int]]:
    from app.data.synthetic import generate_samples

    texts = [" ".join(s["context"] for s in generate_samples(12, seed=k)) for k in range(n)]
    long = [staged.prompt(t)[:200] for t in texts]
    assert all(len(ids) == 200 for ids in long)
    return long


def test_a_step_prefills_at_most_512_prompt_tokens_of_joiners(serve_staging, tiny_qwen2_dir, tmp_path, caplog):
    """Four requests of 200 prompt tokens sent at once while one generates: two join at the next step, the other
    two at the step after (a step prefills at most PREFILL_TOKENS = 512), so the first two answer without waiting
    for all four prompts; the running row stalls less too."""
    caplog.set_level(logging.DEBUG, logger="app.serve.engine")
    staged = serve_staging.Staged(tiny_qwen2_dir, tmp_path / "models")
    try:
        long = _long_prompts(staged, 4)
        staged.run([(None, staged.prompt(PROMPTS[1]), 12)] + [(None, ids, 4) for ids in long], [0, 1, 1, 1, 1])
    finally:
        staged.close()
    joins = [r.getMessage() for r in caplog.records if "join the running batch" in r.getMessage()]
    assert joins == ["serve: 2 requests join the running batch of 1", "serve: 2 requests join the running batch of 3"]


def test_a_batch_that_ends_before_its_requests_all_started_hands_them_to_the_next(
    serve_staging, tiny_qwen2_dir, tmp_path, caplog
):
    """Four requests of 200 prompt tokens and one new token each, waiting when a batch starts: it takes all four
    but prefills two (512 tokens a step), which end at that step; the two never started start the next batch,
    and every request answers as it does alone."""
    caplog.set_level(logging.INFO, logger="app.serve.engine")
    staged = serve_staging.Staged(tiny_qwen2_dir, tmp_path / "models")
    try:
        jobs = [(None, staged.prompt(PROMPTS[1]), 1)] + [(None, ids, 1) for ids in _long_prompts(staged, 4)]
        alone = {k: serve_staging.answers(staged.run([job], [0]))[0] for k, job in enumerate(jobs)}
        caplog.clear()
        events = staged.run(jobs, [0, 2, 2, 2, 2])  # sent as the first one ends: they wait for the next batch
    finally:
        staged.close()
    assert serve_staging.answers(events) == alone
    assert [r.getMessage() for r in caplog.records if "together" in r.getMessage()] == [
        "serve: 4 requests for the base generated together",
        "serve: 2 requests for the base generated together",
    ]


def test_a_sliding_window_batch_prefills_its_requests_all_at_once(serve_staging, tmp_path):
    """Gemma 3's sliding-window cache cannot take rows in later, so a batch prefills all it took at its start,
    however many prompt tokens: four of 200 here, each answering as it does alone (a window of 32 tokens, so
    that the window is what each sees)."""
    from app.models.tiny import build_tiny_model

    model_dir = _attending(build_tiny_model("tiny-gemma3", tmp_path / "gemma3"), tmp_path / "sharp")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 32}))
    staged = serve_staging.Staged(model_dir, tmp_path / "models")
    try:
        jobs = [(None, staged.prompt(PROMPTS[1]), 1)] + [(None, ids, 6) for ids in _long_prompts(staged, 4)]
        alone = {k: serve_staging.answers(staged.run([job], [0]))[0] for k, job in enumerate(jobs)}
        events = staged.run(jobs, [0, 2, 2, 2, 2])
    finally:
        staged.close()
    assert serve_staging.answers(events) == alone


def test_the_log_says_where_the_base_runs_and_in_what_dtype(server, tiny_glm_dir):
    """The GPU tier reads this line to know serve answered from CUDA; here it names the CPU."""
    assert f"serve: base {tiny_glm_dir} on cpu, float32" in server.proc.text()
