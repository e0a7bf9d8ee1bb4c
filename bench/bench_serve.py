"""Serving benchmark: `python -m app serve` under concurrent load, batched against one request at a time.

`make bench-serve` (python -m bench.bench_serve). The ~100M random Qwen2 of the memory benchmark
(models/bench-qwen2-100m; served as a copy whose picks are all tokens that show as text: make_model)
with two random LoRA adapters on it (every projection, r=8, B not zero, so each changes the answers).
The real server runs on a loopback port; C clients (1, 4, 16) each send REQUESTS streamed chat requests
one after another (chat-templated DuIE-style prompts, MAX_TOKENS new tokens, greedy). Per request:
latency, time to first token, completion tokens (from `usage`). Three servers, started in turn:
SERVE_BATCH_SIZE=1 (one request at a time), SERVE_BATCH_SIZE=16 (batched: requests join the running
batch), also with the two adapters interleaved, and, at 16 clients (both ways),
the engine before continuous batching (BEFORE, the last commit whose batches ran to their end, served
from a `git worktree` of it in a temp dir). Writes bench/serve.md and bench/serve.json (--out: elsewhere).
Targets at 16 clients: batched >= 3x one-at-a-time's tokens/s; p50 time to first token <= 1 s; tokens/s
no lower than run-to-end batching's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.core.atomic import atomic_write_text, write_json
from app.core.utils import setup_logging
from bench.bench_memory import QWEN_100M, ensure_model

log = logging.getLogger("bench")
MODEL = Path("models/bench-qwen2-100m")
SERVED = Path("models/bench-serve-qwen2-100m")  # MODEL, its unshowable tokens' output rows zeroed (make_model)
ADAPTERS = {"bench-serve-a": 1, "bench-serve-b": 2}  # name -> seed; dirs under models/
TARGET = 3.0
TTFT_TARGET_S = 1.0
BEFORE = "a86d07e"  # the last commit whose batches ran to their end (no request joined a running batch)


def make_model() -> Path:
    """SERVED: MODEL with the output rows of the ids its tokenizer cannot show zeroed (all but its ~1.9k tokens of
    the 32k vocabulary, and the special ones). A random model picks those ~94% of the time, and a token that
    decodes to no text is no first token to a client: the time to first token would time the random model's luck,
    not the server. The other logits are random around 0, their largest above 0, so every pick is a real token,
    as a trained model's are, and none is EOS: each request runs to max_tokens. Same shapes, same compute."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (SERVED / "config.json").is_file():
        return SERVED
    ensure_model(MODEL, QWEN_100M)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(MODEL)), AutoTokenizer.from_pretrained(str(MODEL))
    with torch.no_grad():
        rows = model.get_output_embeddings().weight
        rows[len(tokenizer) :] = 0
        rows[sorted(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))] = 0
    partial = SERVED.with_name(SERVED.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(SERVED)
    return SERVED


def make_adapter(name: str, seed: int) -> Path:
    """A random LoRA adapter on SERVED (B initialised too, so it is not the identity), saved as PEFT saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path("models") / name
    if (out / "adapter_config.json").is_file() and json.loads((out / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    ) == str(SERVED):
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(SERVED))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


def prompts(n: int) -> list[str]:
    from app.data.synthetic import generate_samples

    return [s["context"] for s in generate_samples(n, seed=11)]


class Server:
    def __init__(self, log_path: Path, cwd: Path | None = None, **settings: Any):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [
            f"MODEL_NAME={SERVED}",
            f"SERVE_PORT={self.port}",
            "QUANT_LEVEL=none",
            f"ADAPTERS={','.join(f'{n}=models/{n}' for n in ADAPTERS)}",
            *(f"{k}={v}" for k, v in settings.items()),
        ]
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", *args], stdout=self.log, stderr=self.log, cwd=cwd
        )
        import httpx2 as httpx

        deadline = time.monotonic() + 600
        while True:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}; see {log_path}"
            assert time.monotonic() < deadline, f"serve not up after 600 s; see {log_path}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    import httpx2 as httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


def load(port: int, concurrency: int, requests: int, max_tokens: int, models: list[str]) -> dict[str, Any]:
    """``concurrency`` clients, each sending ``requests`` requests in turn; models assigned round-robin."""
    texts, results, lock = prompts(concurrency * requests), [], threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            k = c * requests + i
            r = one_request(port, models[k % len(models)], texts[k], max_tokens)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r["latency"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "tokens": sum(r["tokens"] for r in results),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "p50_s": round(statistics.median(lat), 2),
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 3),
    }


def report(rows: list[dict], env: dict) -> str:
    lines = [
        "# Serving benchmark: `serve` under concurrent load",
        "",
        f"`make bench-serve` (python -m bench.bench_serve). {env['cpus']} cores, no GPU, load average (1 min) "
        f"{env['load_before']:.1f} at the start, {env.get('load_after', env['load_before']):.1f} at the end. "
        "~100M random Qwen2 (hidden 768, 12 layers, vocab 32k; the output rows of the ids that decode to no "
        "text zeroed, so each token is text, as a trained model's), fp32, two random LoRA adapters (r=8, every "
        f"projection). Each client sends {env['requests']} streamed chat requests in turn, {env['max_tokens']} "
        "new tokens each, greedy; tokens counted from `usage`. Batched: requests join the running batch between "
        "decode steps; run to end: the engine of commit "
        f"{env.get('before') or BEFORE}, whose batches ran to their end before the next started.",
        "",
        "| server | adapters | clients | requests | tokens | wall s | tokens/s | p50 latency s | p95 latency s | "
        "p50 time to first token s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['adapters']} | {r['concurrency']} | {r['requests']} | {r['tokens']} | "
            f"{r['wall_s']} | {r['tokens_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['ttft_p50_s']} |"
        )
    by = {(r["server"], r["adapters"], r["concurrency"]): r for r in rows}
    one, batched = by.get(("one at a time", "a", 16)), by.get(("batched", "a", 16))
    before = by.get(("run to end", "a", 16))
    lines += ["", "## Target", ""]
    if one and batched:
        x = batched["tokens_per_s"] / one["tokens_per_s"]
        lines.append(
            f"- batched vs one at a time, 16 clients: {batched['tokens_per_s']} vs {one['tokens_per_s']} "
            f"tokens/s = {x:.2f}x (target >= {TARGET:.0f}x) -> {'PASS' if x >= TARGET else 'FAIL'}"
        )
    if batched:
        t = batched["ttft_p50_s"]
        lines.append(
            f"- p50 time to first token at 16 clients <= {TTFT_TARGET_S:g} s: {t} s -> "
            f"{'PASS' if t <= TTFT_TARGET_S else 'FAIL'}"
        )
    if batched and before:
        b, r = batched["tokens_per_s"], before["tokens_per_s"]
        lines.append(
            f"- tokens/s at 16 clients no lower than run-to-end batching: {b} vs {r} -> {'PASS' if b >= r else 'FAIL'}"
        )
    mixed, mixed_before = by.get(("batched", "a+b", 16)), by.get(("run to end", "a+b", 16))
    if mixed and batched:
        was = f"; run to end: {mixed_before['tokens_per_s']}" if mixed_before else ""
        lines.append(
            f"- two adapters interleaved, 16 clients: {mixed['tokens_per_s']} tokens/s "
            f"({mixed['tokens_per_s'] / batched['tokens_per_s']:.2f}x one adapter's{was}): a batch is one "
            "adapter, so the two take turns, each batch draining while the other adapter's requests wait"
        )
    lines += [
        "",
        "A request that arrives while a batch for its adapter generates joins it at the next decode step "
        "(prefilled apart, then merged into the batch's KV cache), and a finished request leaves it at once; "
        "run to end, it waited for the whole batch, which was that server's time to first token.",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def before_checkout(commit: str) -> Iterator[Path]:
    """A `git worktree` of ``commit`` in a temp dir (this checkout's HEAD, index and files are untouched), its
    models/ holding the bench model (a symlink: MODEL_NAME may point anywhere) and copies of the adapters (ADAPTERS
    must lie inside models/); removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-before-"))
    tree = tmp / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], check=True, capture_output=True)
    try:
        (tree / "models").mkdir(exist_ok=True)
        (tree / SERVED).symlink_to(SERVED.resolve())
        for name in ADAPTERS:
            shutil.copytree(Path("models") / name, tree / "models" / name)
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--before", default=BEFORE, help="the run-to-end engine's commit, served at 16 clients ('' = not)")
    ap.add_argument("--out", type=Path, default=Path("bench"), help="where serve.md, serve.json and results/ go")
    a = ap.parse_args()
    setup_logging()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per request
    make_model()
    for name, seed in ADAPTERS.items():
        make_adapter(name, seed)
    logs = a.out / "results" / "serve"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0],
        "requests": a.requests,
        "max_tokens": a.max_tokens,
        "before": a.before or None,
    }
    rows, levels = [], [int(c) for c in a.concurrency.split(",")]
    first = next(iter(ADAPTERS))
    for label, batch in (("one at a time", 1), ("batched", 16)):
        runs = [(c, [first], "a") for c in levels] + ([(16, list(ADAPTERS), "a+b")] if batch > 1 else [])
        rows += serve_runs(label, logs / f"serve-batch{batch}.log", None, batch, runs, a)
    if a.before and 16 in levels:
        with before_checkout(a.before) as tree:
            runs = [(16, [first], "a"), (16, list(ADAPTERS), "a+b")]
            rows += serve_runs("run to end", logs / "serve-before.log", tree, 16, runs, a)
    env["load_after"] = os.getloadavg()[0]
    text = report(rows, env)
    atomic_write_text(a.out / "serve.md", text)
    write_json(a.out / "serve.json", {"machine": env, "rows": rows})
    sys.stdout.write(text)  # cli-output
    return 0


def serve_runs(label: str, log_path: Path, cwd: Path | None, batch: int, runs: list[tuple], a: Any) -> list[dict]:
    """One server (SERVE_BATCH_SIZE=batch, from ``cwd``: None = this checkout), each (clients, models, tag) run."""
    server, rows = Server(log_path, cwd, SERVE_BATCH_SIZE=batch, SERVE_MAX_QUEUE=64), []
    try:
        for c, models, tag in runs:
            row = {"server": label, "adapters": tag} | load(server.port, c, a.requests, a.max_tokens, models)
            log.info("%s", row)
            rows.append(row)
    finally:
        server.close()
    return rows


if __name__ == "__main__":
    sys.exit(main())
