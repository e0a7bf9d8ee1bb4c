"""`serve` on CUDA: the OpenAI-compatible API answers the official openai client from a GPU, with an adapter the
tier trained on that GPU, plain and streamed."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.gpu


def test_serve_on_cuda_answers_the_openai_client(recipe_run, serve_process, app_process, tmp_path, figure):
    proc, _, adapter = recipe_run("lora-fp32", "cuda")
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copytree(adapter, tmp_path / "models" / "a")  # serve takes adapters under its models/ only
    server = serve_process(app_process, tmp_path, ADAPTERS="a=models/a")
    log = server.proc.text()
    placed = next((line for line in log.splitlines() if "serve: base " in line), "")
    assert " on cuda:0, " in placed, log[-3000:]  # the base answers from the GPU, not the CPU
    messages = [{"role": "user", "content": "抽取三元组：张三出生于北京。"}]
    client = server.client()
    reply = client.chat.completions.create(model="a", messages=messages, max_tokens=16, temperature=0)
    assert reply.model == "a" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="a", messages=messages, max_tokens=16, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == (reply.choices[0].message.content or "")  # greedy: the same answer either way
    figure(
        "serve on CUDA answers the openai client",
        placed.split("serve: base ", 1)[1],
        "on cuda",
        True,
        f"{reply.usage.completion_tokens} tokens: {reply.choices[0].message.content!r}",
    )
