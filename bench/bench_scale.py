"""Scale benchmark: a 6B and a 9B GLM trained with (Q)LoRA inside real memory cgroups.

`make bench-scale` (python -m bench.bench_scale) builds random models in ChatGLM3-6B's and GLM-4-9B's
shapes (bench/scale_models.py), then for each case runs `python -m app train` as a user would, inside a
memory cgroup the kernel enforces (app.core.cgroups, as the tests use: v1 or v2, made here, removed
after): the tool detects the limit and the tier picks its settings. Then `predict-custom` reloads the
adapter in a fresh cgroup of the same size and answers a prompt. Recorded per case: predicted vs
measured peak RSS, whether the kernel killed anything, load time, seconds per step, tokens/s, the
time model's predicted step time, and the prediction's exit status. bench/scale.md judges the targets.

Settings beyond the tier's (named in the report): MAX_STEPS=3 and GRAD_ACCUM=1, so "3 optimizer
steps" are 3 micro-batches (the tier's GRAD_ACCUM=16/8 would make them 24-48 micro-batches, hours on
2 cores; with LoRA the accumulation adds no memory), and VAL_SIZE=0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from app.core import cgroups
from app.core.atomic import atomic_write_text
from app.core.utils import setup_logging
from bench.scale_models import build_random_glm
from bench.scale_report import eta_after_first_step, report

log = logging.getLogger("bench")
OUT = Path("bench/results/scale")
REAL_DATA = Path("../shared/data/duie-mixed/train.jsonl")
STEPS = 3


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of bench.scale_models.SHAPES
    limit_mb: int
    method: str  # qlora = 4-bit; lora lets the tier pick the quant level
    stage: str = "sft"  # dpo: preference pairs of the same data (pref_file), a new adapter, reference = adapter off


CASES = [
    Case("6b-4bit-8gb", "chatglm3-6b", 8000, "qlora"),
    Case("6b-8bit-16gb", "chatglm3-6b", 16000, "lora"),
    Case("9b-4bit-16gb", "glm4-9b", 16000, "qlora"),
    Case("6b-4bit-8gb-dpo", "chatglm3-6b", 8000, "qlora", "dpo"),
]


def pref_file(data: Path) -> Path:
    """DPO pairs of the SFT data's records (bench/bench_dpo.py pairs_from_records): the lengths of real pairs,
    which is what memory and time depend on."""
    from bench.bench_dpo import pairs_from_records

    return pairs_from_records(data, OUT / "pref.jsonl")


def data_file() -> Path:
    if REAL_DATA.is_file():
        return REAL_DATA
    from app.data.synthetic import generate_samples

    path = OUT / "synthetic.jsonl"
    atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in generate_samples(400, seed=3)))
    return path


def in_cgroup(limit_mb: int, argv: list[str], log_path: Path, stdout: Path | None = None) -> dict:
    """Run ``python -m app <argv>`` inside a new memory cgroup of ``limit_mb``; the cgroup's record of it."""
    cg = cgroups.create(limit_mb, prefix="bench-scale")
    if cg is None:
        raise SystemExit(
            "bench-scale: cannot create a memory cgroup (needs root or a delegated cgroup); "
            "run it as root, or in a container started with --privileged"
        )
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAME", "DATA_PATH", "OUTPUT_DIR", "ADAPTER_DIR")}
    start = time.monotonic()
    try:
        with open(log_path, "w") as fh, open(stdout or os.devnull, "w") as out:
            proc = subprocess.run(
                [sys.executable, "-m", "app", *argv],
                env=env,
                stdout=out if stdout else fh,
                stderr=fh,
                preexec_fn=cg.join,
            )
        return {
            "rc": proc.returncode,
            "wall_s": round(time.monotonic() - start, 1),
            "cgroup_peak_mb": cg.peak_mb() and round(cg.peak_mb(), 1),
            "oom_kills": cg.oom_kills(),
        }
    finally:
        cg.remove()


def _clock(text: str, pattern: str) -> datetime | None:
    m = re.search(r"^(\d\d:\d\d:\d\d) .*" + pattern, text, re.M)
    return m and datetime.strptime(m.group(1), "%H:%M:%S")


def load_seconds(text: str) -> float | None:
    """From the train log: the 'loading <model>' line to the LoRA line after the weights are in."""
    a, b = _clock(text, r"; loading "), _clock(text, r"LoRA r=")
    return (b - a).total_seconds() % 86400 if a and b else None


def run_case(case: Case, data: Path) -> dict:
    model = build_random_glm(case.model)
    out = OUT / case.name
    shutil.rmtree(out, ignore_errors=True)  # a resumed run would not show the load peak
    out.mkdir(parents=True)
    log.info("%s: training %d steps in a %d MB cgroup", case.name, STEPS, case.limit_mb)
    load_before = os.getloadavg()[0]  # s/step means little if other jobs share the cores
    if case.stage != "sft":
        data = pref_file(data)
    train = in_cgroup(
        case.limit_mb,
        [
            "train",
            f"MODEL_NAME={model}",
            f"DATA_PATH={data}",
            f"OUTPUT_DIR={out / 'run'}",
            f"METHOD={case.method}",
            f"MAX_STEPS={STEPS}",
            "GRAD_ACCUM=1",
            "VAL_SIZE=0",
            "LOGGING_STEPS=1",
            "SEED=0",
            f"STAGE={case.stage}",
        ],
        out / "train.log",
    )
    text = (out / "train.log").read_text(errors="replace")
    row = {
        "case": case.name,
        "model": case.model,
        "limit_mb": case.limit_mb,
        "method": case.method,
        "train": train,
        "load_s": load_seconds(text),
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "plan_line": next((ln[9:] for ln in text.splitlines() if "plan: QUANT_LEVEL" in ln), None),
        "params": int(m.group(1).replace(",", "")) if (m := re.search(r"of ([\d,]+) parameters", text)) else None,
        "eta_step1": eta_after_first_step(text),
        "time_line": next((ln[9:] for ln in text.splitlines() if "expected" in ln and "step" in ln), None),
    }
    summary_path = out / "run" / "summary.json"
    if train["rc"] == 0 and summary_path.is_file():
        s = json.loads(summary_path.read_text())
        row |= {
            "summary": {
                k: s.get(k)
                for k in (
                    "steps",
                    "seconds",
                    "tokens_per_s",
                    "peak_rss_mb",
                    "predicted_peak_mb",
                    "predicted_step_s",
                    "predicted_tokens_per_step",
                    "plan",
                    "memory",
                )
            }
        }
        row["retime"] = retime(row, model)
        first = json.loads(data.open(encoding="utf-8").readline())
        prompt = first.get("context") or first["prompt"]
        log.info("%s: reloading the adapter to predict", case.name)
        row["predict"] = in_cgroup(
            case.limit_mb,
            [
                "predict-custom",
                f"MODEL_NAME={model}",
                f"ADAPTER_DIR={out / 'run'}",
                f"PROMPT={prompt}",
                "MAX_NEW_TOKENS=8",
            ],
            out / "predict.log",
            stdout=out / "predict.out",
        )
        plog = (out / "predict.log").read_text(errors="replace")
        row["generated"] = m.group(0) if (m := re.search(r"generated \d+ tokens in [\d.]+s", plog)) else None
    else:
        row["tail"] = text[-2000:]
    log.info("%s: %s", case.name, json.dumps(row, ensure_ascii=False)[:600])
    return row


def retime(row: dict, model: Path) -> dict | None:
    """The time model at the tokens the run's steps had (bench/scale_retime.py), in the run's allocator setting."""
    s, run = row["summary"], OUT / row["case"] / "run"
    if not (s.get("steps") and s.get("tokens_per_s") and (run / "summary.json").is_file()):
        return None
    tokens = s["tokens_per_s"] * s["seconds"] / s["steps"]
    released = "goes back to the OS at once" in (OUT / row["case"] / "train.log").read_text(errors="replace")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale_retime", str(run), str(model), str(tokens)]
        + (["released"] if released else []),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        log.warning("%s: retiming failed: %s", row["case"], proc.stderr[-500:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"released": released}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases", default=",".join(c.name for c in CASES), help="comma-separated: " + ", ".join(c.name for c in CASES)
    )
    ap.add_argument("--report-only", action="store_true", help="rewrite bench/scale.md from bench/scale.json")
    ap.add_argument(
        "--retime",
        action="store_true",
        help="with --report-only: evaluate the time model again at "
        "the tokens each kept run had (bench/results/scale/<case>/run)",
    )
    a = ap.parse_args()
    setup_logging()
    results_path = Path("bench/scale.json")
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    if not a.report_only:
        OUT.mkdir(parents=True, exist_ok=True)
        data = data_file()
        wanted = a.cases.split(",")
        unknown = [w for w in wanted if w not in {c.name for c in CASES}]
        if unknown:
            raise SystemExit(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(c.name for c in CASES)}")
        for case in (c for c in CASES if c.name in wanted):
            row = run_case(case, data)
            rows = [r for r in rows if r["case"] != case.name] + [row]
            atomic_write_text(results_path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    if a.report_only and a.retime:
        for row in rows:
            if row.get("summary") and not row.get("reference"):
                row["retime"] = retime(row, Path("models") / f"bench-{row['model']}")
        atomic_write_text(results_path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    order = [c.name for c in CASES]
    rows.sort(key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
    text = report(rows)
    atomic_write_text(Path("bench/scale.md"), text)
    sys.stdout.write(text)  # cli-output
    return 0


if __name__ == "__main__":
    sys.exit(main())
