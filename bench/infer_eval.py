"""bench-infer's `make evaluate` parts: wall time per backend, `make info`'s prediction of it, and the demo's F1.

- evaluate: in a temp project dir, as a user types it: `python -m app info` (its "expected evaluate" line,
  printed before anything is exported or loaded), then for llama.cpp `export-gguf`, then `evaluate` on N
  synthetic dev records, its wall time and its own log lines; at 6B inside the 8 GB cgroup.
- demo: the model `make demo` trained (models/demo, METHOD=full), evaluated on its held-out records with
  torch and with llama.cpp at q8_0 and q4_k_m: triplet F1 side by side.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")
DEMO_RUN, DEMO_HELDOUT = Path("models/demo"), Path("data/demo/heldout.jsonl")
DEMO_BACKENDS = {
    "torch": ["INFER_BACKEND=torch"],
    "q8_0": ["INFER_BACKEND=llama.cpp", "GGUF_QUANT=q8_0"],
    "q4_k_m": ["INFER_BACKEND=llama.cpp", "GGUF_QUANT=q4_k_m"],
}
UNITS = {"s": 1, "min": 60, "h": 3600, "days": 86400}
TOLERANCE = 0.30  # the 6B prediction's target


def seconds(text: str) -> float | None:
    """'~12 min' -> 720 (app.plan.train_timing.duration's units)."""
    m = re.match(r"~?([\d.,]+) (s|min|h|days)\b", text.strip())
    return float(m.group(1).replace(",", "")) * UNITS[m.group(2)] if m else None


def predicted(text: str) -> dict[str, Any]:
    """The 'expected evaluate' line's two figures, in seconds."""
    m = re.search(r"expected evaluate: (~[\d.,]+ \w+) for \d+ records on (.+?) \(.*?; (~[\d.,]+ \w+) if", text)
    if not m:
        line = next((ln for ln in text.splitlines() if "expected evaluate" in ln), "no 'expected evaluate' line")
        return {"predicted_line": line[-300:]}
    return {"predicted_s": seconds(m.group(1)), "predicted_budget_s": seconds(m.group(3)), "engine": m.group(2)}


def env_for_app() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env["PYTHONPATH"] = str(Path.cwd().resolve())
    return env


def evaluate(
    results: dict,
    size: str,
    backend: str,
    model_dir: Path,
    scratch: Path,
    logs: Path,
    n: int,
    run_logged: Callable[..., dict],
    save: Callable[[dict], None],
    log_facts: Callable[[str], dict],
    cgroup_mb: int | None = None,
) -> None:
    """info, export-gguf (llama.cpp), evaluate, as a user types them, in a temp project dir."""
    from app.data.synthetic import generate_samples

    key = f"{size}/evaluate/{backend}"
    if key in results:
        return
    proj = scratch / f"eval-project-{size}"
    proj.mkdir(parents=True, exist_ok=True)
    data = proj / "dev.jsonl"
    data.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in generate_samples(n, seed=11)))
    env = env_for_app()
    common = ["ADAPTER_DIR=none", f"MODEL_NAME={model_dir}", "NUM_THREADS=2", f"EVAL_PATH={data}", f"EVAL_SAMPLES={n}"]
    # torch: 4-bit, what the tier picks on an 8 GB PC (cpu-xs/cpu-s) and what predict runs a QLoRA run on
    extra = (
        ["INFER_BACKEND=torch", "QUANT_LEVEL=4bit"]
        if backend == "torch"
        else ["INFER_BACKEND=llama.cpp", "GGUF_QUANT=q4_k_m", f"GGUF_DIR={proj / 'gguf'}"]
    )
    row: dict[str, Any] = {"backend": backend, "args": extra, "samples": n}
    tag = f"{size}-{backend}"
    row["info"] = run_logged(
        [sys.executable, "-m", "app", "info", *common, *extra, f"DATA_PATH={data}"],
        logs / f"info-{tag}.log",
        cwd=proj,
        env=env,
    )
    row |= predicted((logs / f"info-{tag}.log").read_text(errors="replace"))
    if backend == "llama.cpp":
        shutil.rmtree(proj / "gguf", ignore_errors=True)
        log.info("%s: export-gguf first", key)
        row["export"] = run_logged(
            [sys.executable, "-m", "app", "export-gguf", *common, *extra[1:]],
            logs / f"export-gguf-{tag}.log",
            cwd=proj,
            env=env,
        )
    log.info("%s: evaluate on %d records", key, n)
    row |= run_logged(
        [sys.executable, "-m", "app", "evaluate", *common, *extra, f"EVAL_DIR={proj / ('eval-' + backend)}"],
        logs / f"evaluate-{tag}.log",
        cwd=proj,
        env=env,
        cgroup_mb=cgroup_mb,
    )
    row |= log_facts((logs / f"evaluate-{tag}.log").read_text(errors="replace"))
    results[key] = row
    save(results)
    log.info("%s: %s", key, json.dumps(row, ensure_ascii=False)[:500])


def demo(
    results: dict,
    scratch: Path,
    logs: Path,
    run_logged: Callable[..., dict],
    save: Callable[[dict], None],
    log_facts: Callable[[str], dict],
) -> None:
    """The demo's trained model on its held-out records, per backend: F1 from evaluate's report.json."""
    if not (DEMO_RUN / "config.json").is_file() or not DEMO_HELDOUT.is_file():
        log.warning("demo: %s or %s is missing: run `make demo` first", DEMO_RUN, DEMO_HELDOUT)
        return
    for name, extra in DEMO_BACKENDS.items():
        key = f"demo/evaluate/{name}"
        if key in results:
            continue
        out = scratch / "demo-eval" / name
        shutil.rmtree(out.parent / f"gguf-{name}", ignore_errors=True)
        args = [
            f"ADAPTER_DIR={DEMO_RUN.resolve()}",
            f"EVAL_PATH={DEMO_HELDOUT.resolve()}",
            "EVAL_SAMPLES=0",
            "NUM_THREADS=2",
            "PREDICT_BATCH_SIZE=32",
            f"EVAL_DIR={out}",
            *extra,
        ]
        if name != "torch":
            args.append(f"GGUF_DIR={out.parent / f'gguf-{name}'}")
            run_logged(
                [sys.executable, "-m", "app", "export-gguf", *args], logs / f"demo-export-{name}.log", env=env_for_app()
            )
        row = run_logged(
            [sys.executable, "-m", "app", "evaluate", *args], logs / f"demo-evaluate-{name}.log", env=env_for_app()
        )
        row |= log_facts((logs / f"demo-evaluate-{name}.log").read_text(errors="replace"))
        report = out / "report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            row |= {
                "f1": r.get("triplet_f1"),
                "f1_typed": r.get("triplet_f1_typed"),
                "n": r.get("n_samples"),
                "json_valid": r.get("json_valid_rate"),
            }
        results[key] = {"args": extra, **row}
        save(results)
        log.info("%s: %s", key, json.dumps(results[key], ensure_ascii=False)[:400])


def _ratio(r: dict) -> str:
    p, b, w = r.get("predicted_s"), r.get("predicted_budget_s"), r.get("wall_s")
    if p is None or not w:
        return r.get("predicted_line", "no prediction")
    return f"{p:,.0f} / {b:,.0f} s (measured / predicted at the budget: {w / b:.2f})"


def eval_table(results: dict) -> list[str]:
    lines = [
        "| size | backend | settings | records | `make info` predicted s: references / budget | wall s | "
        "new tokens | peak RSS MB | exit | load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(k for k in results if re.match(r"(1\.5b|6b)/evaluate/", k)):
        r, size = results[key], key.split("/")[0]
        cg = f" (cgroup {r['cgroup_mb']:,} MB, peak {r.get('cgroup_peak_mb')})" if r.get("cgroup_mb") else ""
        la = r.get("load_avg") or [None, None]
        lines.append(
            f"| {size} | {r['backend']} | {' '.join(r['args'][:2])} | {r.get('samples')} | {_ratio(r)} | "
            f"**{r['wall_s']:.0f}** | {r.get('new_tokens', 'n/a')} | {r['process_peak_rss_mb']:,}{cg} | "
            f"{r['rc']} | {la[0]} / {la[1]} |"
        )
        if r.get("export"):
            e = r["export"]
            lines.append(
                f"| {size} | `export-gguf` before it (once per adapter) | GGUF_QUANT=q4_k_m | | | "
                f"{e['wall_s']:.0f} | | {e['process_peak_rss_mb']:,} | {e['rc']} | |"
            )
    logs = [
        f"  - {k}: `{ln}`"
        for k in sorted(results)
        if "/evaluate/" in k
        for ln in results[k].get("log_lines", [])
        if "expected" in ln or "generated" in ln or "F1" in ln
    ]
    return lines + (
        ["", "From evaluate's own logs (its estimate there is made after the load):", *logs] if logs else []
    )


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def demo_table(results: dict) -> list[str]:
    lines = ["| backend | F1 | typed F1 | valid JSON | records | wall s | exit |", "|---|---|---|---|---|---|---|"]
    for name, extra in DEMO_BACKENDS.items():
        r = results.get(f"demo/evaluate/{name}")
        if r:
            f1, typed, valid = (
                _fmt(r.get(k), p) for k, p in (("f1", "{:.4f}"), ("f1_typed", "{:.4f}"), ("json_valid", "{:.0%}"))
            )
            lines.append(
                f"| {' '.join(extra)} | {f1} | {typed} | {valid} | {r.get('n', 'n/a')} | {r['wall_s']:.0f} | "
                f"{r['rc']} |"
            )
    return lines


def targets(results: dict, verdict: Callable[[bool | None], str]) -> list[str]:
    out = []
    t, g = results.get("1.5b/evaluate/torch"), results.get("1.5b/evaluate/llama.cpp")
    if t and g and not (t["rc"] or g["rc"]):
        fast, slow, ex = *sorted((t["wall_s"], g["wall_s"])), (g.get("export") or {}).get("wall_s") or 0
        out.append(
            f"- `make evaluate` on {t['samples']} records at 1.5B (target: >= 2x faster end to end on the "
            f"faster backend): torch 4-bit {t['wall_s']:.0f} s, llama.cpp q4_k_m {g['wall_s']:.0f} s (+ "
            f"{ex:.0f} s for its one-time export-gguf): {slow / fast:.2f}x, "
            f"{t['wall_s'] / (g['wall_s'] + ex):.2f}x with the export counted -> {verdict(slow / fast >= 2)}"
        )
    else:
        out.append(
            "- `make evaluate` at 1.5B >= 2x faster on the faster backend -> "
            + ("FAIL (an evaluate failed)" if t and g else "not measured")
        )
    for key in sorted(k for k in results if re.match(r"(1\.5b|6b)/evaluate/", k)):
        r = results[key]
        b, w = r.get("predicted_budget_s"), r.get("wall_s")
        if b and w and not r["rc"]:
            ok = abs(w / b - 1) <= TOLERANCE
            # a random model's answers run to the budget: the budget figure is the one that applies
            out.append(
                f"- {key.split('/')[0].upper()} evaluate time, printed by `make info` before it starts "
                f"({r['backend']}, {r['samples']} records, random weights: every answer at the budget): "
                f"{b:,.0f} s predicted, {w:,.0f} s measured ({w / b - 1:+.0%}; target within "
                f"±{TOLERANCE:.0%}) -> {verdict(ok) + ('' if key.startswith('6b') else ' (not a target)')}"
            )
    f = {n: (results.get(f"demo/evaluate/{n}") or {}).get("f1") for n in DEMO_BACKENDS}
    if f["torch"] is not None and f["q8_0"] is not None:
        out.append(
            f"- the demo's trained model, F1 on its {results['demo/evaluate/torch'].get('n')} held-out records: "
            f"torch {f['torch']:.4f}, llama.cpp q8_0 {f['q8_0']:.4f} (target: within 0.02), q4_k_m "
            f"{f['q4_k_m'] if f['q4_k_m'] is None else round(f['q4_k_m'], 4)} (reported) -> "
            f"{verdict(abs(f['torch'] - f['q8_0']) <= 0.02)}"
        )
    else:
        out.append("- the demo's F1, torch vs llama.cpp q8_0 within 0.02 -> not measured (`make demo` first)")
    return out


# ---- the engine shares app/evaluation/eval_timing.py uses, fitted from this bench's own rows -----------------------
CALIBRATED = {
    "torch-4bit": "torch 4bit",
    "torch-8bit": "torch 8bit",
    "torch-fp32": "torch none",
    "f16": "llama.cpp f16",
    "q8_0": "llama.cpp q8_0",
    "q4_k_m": "llama.cpp k-quant",
}


def fit(results: dict, size: str = "1.5b") -> dict[str, dict[str, float]]:
    """Per engine: a decode step = a + rows x b (single stream and 8 rows), then the shares of the probed rates:
    bandwidth = weight bytes / (a x probed bytes/s), row = FLOPs per token / (b x dense), prefill = the single
    stream's prefill FLOP/s / dense; load s per 1e9 weights."""
    from app.evaluation.eval_timing import weight_bytes
    from app.plan.estimator import model_shape

    probe = results.get(f"{size}/probe") or {}
    out: dict[str, dict[str, float]] = {}
    for bench_name, engine in CALIBRATED.items():
        one, eight = results.get(f"{size}/single/{bench_name}") or {}, results.get(f"{size}/steps/{bench_name}") or {}
        if not (probe.get("bandwidth") and one.get("decode_tok_s") and eight.get("step_s")):
            continue
        shape = model_shape(one["model"])
        flops = 2.0 * (shape.linear_params + shape.hidden * shape.vocab)
        backend = engine.split(" ")[0]
        quant = bench_name if backend == "llama.cpp" else engine.split(" ")[1]
        gguf = Path(one["gguf"]).stat().st_size if one.get("gguf") and Path(one["gguf"]).is_file() else None
        t1, t8 = 1 / one["decode_tok_s"], eight["step_s"]
        b = max((t8 - t1) / (eight["rows"] - 1), 1e-6)
        a = max(t1 - b, 1e-6)
        read = weight_bytes(shape, backend, quant, gguf)
        out[engine] = {
            "a_s": a,
            "b_s": b,
            "bandwidth": read / (a * probe["bandwidth"]),
            "row": flops / (b * probe["dense"]),
            "prefill": one["prefill_tok_s"] * flops / probe["dense"],
            "load_s": one["load_s"] / (shape.total_params / 1e9),
        }
    return out


def calibration_table(results: dict) -> list[str]:
    from app.evaluation.eval_timing import ENGINES

    probe, fitted = results.get("1.5b/probe") or {}, fit(results)
    if not fitted:
        return ["not measured (`--parts calibrate`)"]
    lines = [
        f"Probes at 1.5B: {probe['bandwidth'] / 1e9:.1f} GB/s read, {probe['dense'] / 1e9:.0f} GFLOP/s fp32 "
        "projection. A decode step of 1 row (the single stream) and of 8 rows (8 x a 64-token prompt, 32 "
        "new tokens) give a + rows x b:",
        "",
        "| engine | a s | b s per row | bandwidth share | row share | prefill share | load s / 1e9 weights | "
        "in app/evaluation/eval_timing.py |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine, f in fitted.items():
        e = ENGINES[engine]
        lines.append(
            f"| {engine} | {f['a_s']:.4f} | {f['b_s']:.4f} | {f['bandwidth']:.2f} | {f['row']:.2f} | "
            f"{f['prefill']:.2f} | {f['load_s']:.1f} | {e.bandwidth}, {e.row}, {e.prefill}, {e.load_s} |"
        )
    return lines
