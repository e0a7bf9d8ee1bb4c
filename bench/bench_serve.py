"""Serving benchmark: `python -m app serve` under concurrent load, batched against one request at a time.

`make bench-serve` (python -m bench.bench_serve). The ~100M random Qwen2 of the memory benchmark
(models/bench-qwen2-100m) with two random LoRA adapters on it (every projection, r=8, B not zero, so
each changes the answers). The real server runs on a loopback port; C clients (1, 4, 16) each send
REQUESTS streamed chat requests one after another (chat-templated DuIE-style prompts, MAX_TOKENS new
tokens, greedy). Per request: latency, time to first token, completion tokens (from `usage`). Two
servers, started in turn: SERVE_BATCH_SIZE=1 (one request at a time) and SERVE_BATCH_SIZE=16 (batched),
then the batched one with the two adapters interleaved. Writes bench/serve.md and bench/serve.json.
Target: batched >= 3x the aggregate tokens/s of one-at-a-time at concurrency 16.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from app.core.utils import atomic_write_text, setup_logging, write_json
from bench.bench_memory import QWEN_100M, ensure_model

log = logging.getLogger("bench")
MODEL = Path("models/bench-qwen2-100m")
ADAPTERS = {"bench-serve-a": 1, "bench-serve-b": 2}  # name -> seed; dirs under models/
TARGET = 3.0


def make_adapter(name: str, seed: int) -> Path:
    """A random LoRA adapter on MODEL (B initialised too, so it is not the identity), saved as PEFT saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path("models") / name
    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


def prompts(n: int) -> list[str]:
    from app.data.synthetic import generate_samples

    return [s["context"] for s in generate_samples(n, seed=11)]


class Server:
    def __init__(self, log_path: Path, **settings: Any):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [f"MODEL_NAME={MODEL}", f"SERVE_PORT={self.port}", "QUANT_LEVEL=none",
                f"ADAPTERS={','.join(f'{n}=models/{n}' for n in ADAPTERS)}", *(f"{k}={v}" for k, v in settings.items())]
        self.log = log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "serve", *args], stdout=self.log, stderr=self.log)
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

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
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
    return {"concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 2),
            "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "p50_s": round(statistics.median(lat), 2), "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2),
            "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 3)}


def report(rows: list[dict], env: dict) -> str:
    lines = ["# Serving benchmark: `serve` under concurrent load", "",
             f"`make bench-serve` (python -m bench.bench_serve). {env['cpus']} cores, no GPU, load average "
             f"{env['load_before']:.1f} before. ~100M random Qwen2 (hidden 768, 12 layers, vocab 32k), fp32, two random "
             f"LoRA adapters (r=8, every projection). Each client sends {env['requests']} streamed chat requests in turn, "
             f"{env['max_tokens']} new tokens each, greedy; tokens counted from `usage`.", "",
             "| server | adapters | clients | requests | tokens | wall s | tokens/s | p50 latency s | p95 latency s | "
             "p50 time to first token s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['adapters']} | {r['concurrency']} | {r['requests']} | {r['tokens']} | "
                     f"{r['wall_s']} | {r['tokens_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['ttft_p50_s']} |")
    by = {(r["server"], r["adapters"], r["concurrency"]): r for r in rows}
    one, batched = by.get(("one at a time", "a", 16)), by.get(("batched", "a", 16))
    lines += ["", "## Target", ""]
    if one and batched:
        x = batched["tokens_per_s"] / one["tokens_per_s"]
        lines.append(f"- batched vs one at a time, 16 clients: {batched['tokens_per_s']} vs {one['tokens_per_s']} "
                     f"tokens/s = {x:.2f}x (target >= {TARGET:.0f}x) -> {'PASS' if x >= TARGET else 'FAIL'}")
    mixed = by.get(("batched", "a+b", 16))
    if mixed and batched:
        lines.append(f"- two adapters interleaved, 16 clients: {mixed['tokens_per_s']} tokens/s "
                     f"({mixed['tokens_per_s'] / batched['tokens_per_s']:.2f}x one adapter's): a batch is one "
                     "adapter, so the two take turns")
    lines += ["", "A batch runs to its end before the next starts (no continuous batching): a request that arrives "
              "while one generates waits for it, which is the batched server's time to first token above."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    a = ap.parse_args()
    setup_logging()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per request
    ensure_model(MODEL, QWEN_100M)
    for name, seed in ADAPTERS.items():
        make_adapter(name, seed)
    out = Path("bench/results/serve")
    out.mkdir(parents=True, exist_ok=True)
    env = {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "requests": a.requests,
           "max_tokens": a.max_tokens}
    rows, levels = [], [int(c) for c in a.concurrency.split(",")]
    first = next(iter(ADAPTERS))
    for label, batch in (("one at a time", 1), ("batched", 16)):
        server = Server(out / f"serve-batch{batch}.log", SERVE_BATCH_SIZE=batch, SERVE_MAX_QUEUE=64)
        try:
            runs = [(c, [first], "a") for c in levels] + ([(16, list(ADAPTERS), "a+b")] if batch > 1 else [])
            for c, models, tag in runs:
                row = {"server": label, "adapters": tag} | load(server.port, c, a.requests, a.max_tokens, models)
                log.info("%s", row)
                rows.append(row)
        finally:
            server.close()
    text = report(rows, env)
    atomic_write_text(Path("bench/serve.md"), text)
    write_json(Path("bench/serve.json"), {"machine": env, "rows": rows})
    sys.stdout.write(text)  # cli-output
    return 0


if __name__ == "__main__":
    sys.exit(main())
