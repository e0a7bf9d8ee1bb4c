"""bench/scale.md from bench/scale.json: the table, the targets judged, and what fits where."""

from __future__ import annotations

import os
import re

MEMORY_TOLERANCE = 0.15  # the estimator's predicted peak vs the measured one
TIME_TOLERANCE = 0.30  # the time model's predicted step vs the measured one


def _clock_s(text: str) -> float:
    """tqdm's '04:10' or '1:02:03' in seconds."""
    parts = [int(p) for p in text.split(":")]
    return float(sum(p * 60**i for i, p in enumerate(reversed(parts))))


def eta_after_first_step(log: str) -> tuple[float, float] | None:
    """(elapsed, the bar's ETA) at the train bar's step 1 of N, from the train log."""
    hits = re.findall(r"train:\s+\d+%\|[^|]*\|\s+1/(\d+) \[([\d:]+)<([\d:]+)", log)
    if not hits:
        return None
    _, elapsed, eta = hits[-1]
    return _clock_s(elapsed), _clock_s(eta)


def _pct(pred: float | None, meas: float | None) -> float | None:
    return None if not pred or not meas else 100 * (pred - meas) / meas


def _fmt(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def derived(r: dict) -> dict:
    """The numbers the table and the verdicts read, from one case's raw record."""
    s = r.get("summary") or {}
    steps = s.get("steps") or 0
    step_s = s["seconds"] / steps if steps else None
    plan = s.get("plan") or {}
    tok_meas = s["tokens_per_s"] * s["seconds"] / steps if steps and s.get("tokens_per_s") else None
    tok_pred = s.get("predicted_tokens_per_step")
    # The model predicts a step of the data's mean length; 3 steps see 3 samples, so the prediction compared is
    # the same model's at the tokens those steps really had (bench/scale_retime.py), not a proportional scaling.
    re_ = r.get("retime") or {}
    scaled = s["predicted_step_s"] * re_["ratio"] if re_.get("ratio") and s.get("predicted_step_s") else None
    return {
        "step_s": step_s,
        "plan": plan,
        "tok_meas": tok_meas,
        "tok_pred": tok_pred,
        "scaled_step": scaled,
        "scaled_err": _pct(scaled, step_s),
        "peak": s.get("peak_rss_mb"),
        "pred": s.get("predicted_peak_mb"),
        "pred_step": s.get("predicted_step_s"),
        "tokens_s": s.get("tokens_per_s"),
        "mem_err": _pct(s.get("predicted_peak_mb"), s.get("peak_rss_mb")),
        "time_err": _pct(s.get("predicted_step_s"), step_s),
        "killed": r["train"]["oom_kills"] + (r.get("predict") or {}).get("oom_kills", 0),
        "predicted_ok": (r.get("predict") or {}).get("rc") == 0 and bool(r.get("generated")),
    }


def levers(rows: list[dict]) -> list[str]:
    """The 'before' row (the same case at the commit before a lever) against the case itself."""
    out = []
    for ref in (r for r in rows if r.get("reference")):
        case = next((r for r in rows if r["case"] == ref["case"].removesuffix("-before")), None)
        if not case or not case.get("summary"):
            continue
        b, a = derived(ref), derived(case)
        out += [
            "",
            "## Levers",
            "",
            f"- **bf16 embeddings and head**, the one lever used. `{ref['case']}` is {ref['reference']}. "
            f"Peak RSS {b['peak']:,.0f} → {a['peak']:,.0f} MB ({a['peak'] - b['peak']:+,.0f}); predicted "
            f"{b['pred']:,.0f} → {a['pred']:,.0f} MB. Before, the run at the data's length was not killed in the "
            "8,000 MB cgroup, but its prediction was over the tool's safety budget (85% of what is available, "
            "~6,540 MB), so the plan cut MAX_SEQ_LEN to 64 and 98 of 180 answers with it; after, it keeps 336. "
            f"Load {_fmt(ref.get('load_s'))} → {_fmt(case.get('load_s'))} s (no fp32 conversion), "
            f"{_fmt(b['step_s'], ',.1f')} → {_fmt(a['step_s'], ',.1f')} s/step.",
            "- Not needed at these sizes: a chunked loss (a 336-token micro-batch's logits are 44 MB in bf16, "
            "87 MB in the loss's fp32 copy), shard-by-shard loading (transformers already loads and quantizes one "
            "tensor at a time, read with pread: app/models/quantization.py read_without_mmap), CPU offload of "
            "activations (checkpointing "
            "leaves ~170 MB of them).",
        ]
    return out


def report(rows: list[dict]) -> str:
    lines = [
        f"# Scale benchmark: 6B and 9B GLM, (Q)LoRA in real memory cgroups ({os.cpu_count()} cores, no GPU)",
        "",
        "`make bench-scale` (python -m bench.bench_scale). Random models in ChatGLM3-6B's shape (hidden 4096, "
        "28 layers, ffn 13696, 2 KV groups, vocab 65,024) and GLM-4-9B's (40 layers, vocab 151,552), built layer "
        "by layer into bf16 safetensors shards. Each case is `python -m app train` inside a new memory cgroup "
        "(cgroup v1 here) of the stated size, as `docker run --memory` makes: the tool detects the limit and the "
        "tier picks quantization, samples, batch, MAX_SEQ_LEN and checkpointing. Beyond the tier: MAX_STEPS=3, "
        "GRAD_ACCUM=1 (so 3 optimizer steps are 3 micro-batches; LoRA's accumulation adds no memory, and the "
        "tier's 8-16 would make them hours here), VAL_SIZE=0. Data: DuIE triplets (../shared/data/duie-mixed). "
        "Then `predict-custom` reloads the adapter in a fresh cgroup of the same size and answers a prompt. "
        "Measured peak RSS is the train process's high-water mark (VmHWM); the cgroup's peak also counts "
        "the page cache of the shards read, which the kernel reclaims before it would kill. "
        "`6b-4bit-8gb-dpo` is the first case with `STAGE=dpo`, on DPO pairs of the same records (chosen = the "
        "gold triplets, rejected = the last one dropped, or subject and object swapped; bench/bench_dpo.py): "
        "a pair is two sequences with gradients plus the reference's two forward passes with the adapter off, "
        "and its tokens/s counts both sequences.",
        "",
        *(
            [
                (
                    "Load average on the cores before / after each training: "
                    + ", ".join(
                        f"{r['case']} {r['load_avg'][0]:.1f} / {r['load_avg'][1]:.1f}"
                        for r in rows
                        if r.get("load_avg")
                    )
                    + " (above the core count, other jobs shared them and s/step is overstated)."
                ),
                "",
            ]
            if any(r.get("load_avg") for r in rows)
            else []
        ),
        "| case | quant | cgroup | plan: seq / batch / ckpt | predicted peak MB | measured peak RSS MB | error | "
        "cgroup peak MB | OOM kills | load s | s/step | tokens/s | predicted s/step: data's mean / these steps' "
        "tokens | error at these steps' tokens | predict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = derived(r)
        p = d["plan"]
        plan = f"{p.get('MAX_SEQ_LEN', '?')} / {p.get('BATCH_SIZE', '?')} / {p.get('GRADIENT_CHECKPOINTING', '?')}"
        if r["train"]["rc"] != 0:
            plan = f"train exit {r['train']['rc']}"
        lines.append(
            f"| {r['case']} | {p.get('QUANT_LEVEL', r['method'])} | {r['limit_mb']:,} MB | {plan} | "
            f"{_fmt(d['pred'])} | {_fmt(d['peak'])} | {_fmt(d['mem_err'], '+.1f', '%')} | "
            f"{_fmt(r['train'].get('cgroup_peak_mb'))} | "
            f"{d['killed']} | {_fmt(r.get('load_s'))} | {_fmt(d['step_s'], ',.1f')} | {_fmt(d['tokens_s'], ',.1f')} | "
            f"{_fmt(d['pred_step'], ',.1f')} / {_fmt(d['scaled_step'], ',.1f')} | "
            f"{_fmt(d['scaled_err'], '+.0f', '%')} | "
            f"{'not run' if r.get('reference') else 'exit 0, answered' if d['predicted_ok'] else 'FAILED'} |"
        )
    lines += levers(rows)
    lines += ["", "## Targets", ""]
    for r in rows:
        if r.get("reference"):
            continue
        d = derived(r)
        c = r["case"]
        if r["train"]["rc"] != 0:
            lines.append(f"- {c}: training exited {r['train']['rc']} -> FAIL")
        lines.append(
            f"- {c}: never killed by the kernel ({d['killed']} OOM kills in training and prediction) -> "
            f"{'PASS' if d['killed'] == 0 and r['train']['rc'] == 0 else 'FAIL'}"
        )
        if d["mem_err"] is not None:
            ok = abs(d["mem_err"]) <= MEMORY_TOLERANCE * 100
            lines.append(
                f"- {c}: estimator {d['pred']:,.0f} MB vs measured {d['peak']:,.0f} MB ({d['mem_err']:+.1f}%, "
                f"target ±{MEMORY_TOLERANCE:.0%}) -> {'PASS' if ok else 'FAIL'}"
            )
        if d["scaled_err"] is not None:
            ok = abs(d["scaled_err"]) <= TIME_TOLERANCE * 100
            lines.append(
                f"- {c}: time model {d['pred_step']:,.1f} s/step for the data's mean {d['tok_pred']:,.0f} "
                f"tokens; these 3 steps had {d['tok_meas']:,.0f} tokens each, for which it predicts "
                f"{d['scaled_step']:,.1f} s, "
                f"measured {d['step_s']:,.1f} ({d['scaled_err']:+.0f}%, target ±{TIME_TOLERANCE:.0%}; "
                f"unscaled {d['time_err']:+.0f}%) -> {'PASS' if ok else 'FAIL'}"
            )
        elif d["time_err"] is not None:
            ok = abs(d["time_err"]) <= TIME_TOLERANCE * 100
            lines.append(
                f"- {c}: time model {d['pred_step']:,.1f} s/step vs measured {d['step_s']:,.1f} "
                f"({d['time_err']:+.0f}%, target ±{TIME_TOLERANCE:.0%}) -> {'PASS' if ok else 'FAIL'}"
            )
        eta = r.get("eta_step1")
        if eta and d["step_s"]:
            elapsed, left = eta
            actual = r["summary"]["seconds"] - elapsed
            err = _pct(left, actual)
            lines.append(
                f"- {c}: progress bar after step 1 said {left:.0f} s left; it took {actual:.0f} s "
                f"({_fmt(err, '+.0f', '%')}) -> {'PASS' if err is not None and abs(err) <= 30 else 'FAIL'}"
            )
        lines.append(
            f"- {c}: the adapter reloads and predicts in {r['limit_mb']:,} MB -> "
            f"{'PASS' if d['predicted_ok'] else 'FAIL'}"
            + (f" ({r['generated']}, random weights)" if r.get("generated") else "")
        )
    return "\n".join(lines) + "\n"
