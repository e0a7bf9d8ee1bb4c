"""DPO speed: `python -m app train STAGE=dpo` vs TRL 1.16's DPOTrainer at its documented defaults, in one run.

Both: the ~100M random Qwen2 of `make bench` (models/bench-qwen2-100m), DPO pairs made from the first
--samples DuIE records of ../shared/data/duie-mixed (chosen = the gold triplets, rejected = the last one
dropped, or subject and object swapped: the lengths of real pairs), LoRA r=8/alpha=16 on every linear
projection, the same learning rate, batch, accumulation and steps. The peer is bench/reference_trl_dpo.py.
Measured: useful (non-padding) tokens per second over the training loop, and peak RSS. Writes bench/dpo.md
and bench/dpo.json (scratch under bench/results/dpo). Run by `make bench` after bench/bench_speed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from app.core.atomic import atomic_write_text, write_json
from app.core.utils import setup_logging, usable_cpus
from bench.bench_speed import MODEL, TARGETS, app_env, model_and_data, run, wait_for_quiet

OUT = Path("bench/results/dpo")
SPEED_TARGET = 1.5  # the issue's: >= 1.5x TRL's tokens/s, with no more memory


def pairs_from_records(src: Path, out: Path, n: int | None = None) -> Path:
    """{prompt, chosen, rejected} from {context, target} triplet records: rejected drops the last triplet (or
    swaps subject and object when there is one), a mistake of realistic length."""
    from app.data.synthetic import format_target, parse_target

    rows = []
    for line in src.open(encoding="utf-8"):
        rec = json.loads(line)
        try:
            triplets = parse_target(rec["target"])
        except (KeyError, ValueError):
            continue
        if not triplets:
            continue
        worse = (
            triplets[:-1]
            if len(triplets) > 1
            else [{**triplets[0], "subject": triplets[0]["object"], "object": triplets[0]["subject"]}]
        )
        rows.append({"prompt": rec["context"], "chosen": rec["target"], "rejected": format_target(worse)})
        if n is not None and len(rows) >= n:
            break
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def ours(a: argparse.Namespace, data: Path) -> dict[str, Any]:
    out = OUT / "project"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "app",
        "train",
        "STAGE=dpo",
        f"MODEL_NAME={MODEL}",
        f"DATA_PATH={data}",
        f"OUTPUT_DIR={out}",
        "VAL_SIZE=0",
        f"BATCH_SIZE={a.batch}",
        f"GRAD_ACCUM={a.grad_accum}",
        f"MAX_STEPS={a.steps}",
        f"LEARNING_RATE={a.lr}",
        "LORA_R=8",
        "LORA_ALPHA=16",
        "LORA_DROPOUT=0.05",
        f"LORA_TARGETS={TARGETS}",
        "SEED=42",
        "LOGGING_STEPS=1",
        "SAVE_STEPS=100000",
        "TIER=none",
        "REPORT_TO=none",
        f"NUM_THREADS={a.threads}",
    ]
    proc, wall, load = run(cmd, "project: python -m app train STAGE=dpo", app_env())
    s = json.loads((out / "summary.json").read_text())
    settings = next((x.split("plan: ", 1)[-1] for x in proc.stderr.splitlines() if "plan: " in x), "")
    return {
        "seconds": s["seconds"],
        "tokens_per_s": s["tokens_per_s"],
        "peak_rss_mb": s["peak_rss_mb"],
        "train_loss": s["train_loss"],
        "wall_s": wall,
        "load": load,
        "settings": settings,
    }


def peer(a: argparse.Namespace, data: Path) -> dict[str, Any]:
    res = OUT / "trl.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.reference_trl_dpo",
        "--model",
        str(MODEL),
        "--data",
        str(data),
        "--out",
        str(OUT / "trl"),
        "--result",
        str(res),
        "--targets",
        TARGETS,
        "--batch",
        str(a.batch),
        "--grad-accum",
        str(a.grad_accum),
        "--steps",
        str(a.steps),
        "--threads",
        str(a.threads),
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lr",
        str(a.lr),
    ]
    _, wall, load = run(cmd, "TRL DPOTrainer, documented defaults")
    return {**json.loads(res.read_text()), "wall_s": wall, "load": load}


def report(r: dict[str, Any]) -> str:
    p, t = r["project"], r["trl"]
    speed, mem = p["tokens_per_s"] / t["tokens_per_s"], p["peak_rss_mb"] / t["peak_rss_mb"]
    a = r["args"]
    return "\n".join(
        [
            f"# DPO speed: this tool vs TRL 1.16's DPOTrainer ({r['machine_cpus']} cores, no GPU)",
            "",
            f"`make bench` (python -m bench.bench_dpo). Both: models/bench-qwen2-100m, {a['samples']} DPO pairs "
            f"from DuIE (../shared/data/duie-mixed), LoRA r=8/alpha=16 on every linear projection, batch {a['batch']} "
            f"x accumulation {a['grad_accum']}, {a['steps']} optimizer steps, learning rate {a['lr']}. TRL at its "
            f"documented defaults: {t['settings']}. This tool: `python -m app train STAGE=dpo` with TIER=none "
            f"(its plan: {p['settings']}). Useful tokens: non-padding tokens of both sequences of each pair.",
            "",
            f"Load average: {r['start_load']:.2f} at the start; {p['load']:.2f} before ours, "
            f"{t['load']:.2f} before TRL's; {r['loadavg_end'][0]:.2f} at the end.",
            "",
            "| | TRL DPOTrainer | this tool | ratio |",
            "|---|---|---|---|",
            f"| useful tokens/s | {t['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} | {speed:.2f}x |",
            f"| training loop (s) | {t['seconds']:,.1f} | {p['seconds']:,.1f} | |",
            f"| peak RSS (MB) | {t['peak_rss_mb']:,.0f} | {p['peak_rss_mb']:,.0f} | {mem:.2f}x |",
            f"| first / last loss | {t['losses'][0]:.4f} / {t['losses'][-1]:.4f} | {p['train_loss']:.4f} (mean) | |",
            "",
            "## Targets",
            "",
            f"- useful tokens/s >= {SPEED_TARGET}x TRL's: {speed:.2f}x -> "
            f"{'PASS' if speed >= SPEED_TARGET else 'FAIL'}",
            f"- peak RSS no more than TRL's: {p['peak_rss_mb']:,.0f} vs {t['peak_rss_mb']:,.0f} MB -> "
            f"{'PASS' if mem <= 1.0 else 'FAIL'}",
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    ap.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load average below this")
    ap.add_argument("--max-wait", type=float, default=1200, help="seconds to wait for that at most")
    a = ap.parse_args()
    setup_logging()
    a.threads = a.threads or usable_cpus()
    OUT.mkdir(parents=True, exist_ok=True)
    data = pairs_from_records(model_and_data(), OUT / "pairs.jsonl", a.samples)
    start_load = wait_for_quiet(a.max_load, a.max_wait)
    t0 = time.time()
    result = {
        "machine_cpus": os.cpu_count(),
        "start_load": round(start_load, 2),
        "args": vars(a),
        "project": ours(a, data),
        "trl": peer(a, data),
        "minutes": 0.0,
    }
    result["minutes"] = round((time.time() - t0) / 60, 1)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(Path("bench/dpo.json"), result)
    text = report(result)
    atomic_write_text(Path("bench/dpo.md"), text)
    sys.stdout.write(text)  # cli-output
    return 0


if __name__ == "__main__":
    sys.exit(main())
