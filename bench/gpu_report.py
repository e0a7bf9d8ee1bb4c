"""bench/gpu.md from bench/bench_gpu.py's result: the machine, each test of the tier, each figure against its
target, the speed against TRL, and the targets judged PASS or FAIL."""

from __future__ import annotations

import datetime
from typing import Any


def verdict(passed: bool | None) -> str:
    return "recorded" if passed is None else ("PASS" if passed else "FAIL")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _machine(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    versions = ", ".join(
        f"{k} {m.get(k) or 'absent'}"
        for k in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "deepspeed")
    )
    return [
        f"Device: {m.get('gpu')} ({m.get('vram_gb')} GB, compute capability {m.get('capability')}.x), driver "
        f"{m.get('driver')}, CUDA {m.get('cuda_build')} build; Python {m.get('python')}; {versions}.",
        f"Run by `make test-gpu` (python -m bench.bench_gpu) on {datetime.date.today()}, in {r['wall_s']:.0f} s. "
        f"Load average (1/5/15 min) when it started: {', '.join(map(str, r['load']))}.",
    ]


def _tests(r: dict[str, Any]) -> list[str]:
    lines = ["## The tier (pytest -m gpu tests/gpu)", "", "| test | outcome | s | message |", "|---|---|---|---|"]
    for t in r["tests"]:
        message = t["message"].replace("|", "\\|")
        lines.append(f"| {t['test']} | {t['outcome']} | {t['seconds']:.0f} | {message} |")
    lines += ["", "| figure | value | target | verdict | detail |", "|---|---|---|---|---|"]
    for f in r["figures"]:
        detail = str(f.get("detail", "")).replace("|", "\\|")
        lines.append(f"| {f['name']} | {_value(f['value'])} | {f['target']} | {verdict(f['passed'])} | {detail} |")
    return lines


def _speed(s: dict[str, Any] | None) -> list[str]:
    if s is None:
        return ["## Speed against TRL", "", "Not run (--skip-speed)."]
    if "pending" in s:
        return ["## Speed against TRL", "", "Not finished when this report was written (the tier's rows are final)."]
    if "error" in s:
        return ["## Speed against TRL", "", "The comparison failed:", "", "```", s["error"], "```"]
    p, t = s["project"], s["trl"]
    return [
        "## Speed against TRL's best GPU setup",
        "",
        f"Both: the random {s['model']} (Qwen2.5-0.5B's shape), {s['samples']} synthetic triplet samples, LoRA r=8 "
        "alpha=16 dropout 0.05 on every projection, one epoch, the same tokens per optimizer step.",
        f"- TRL: SFTTrainer, prompt-completion data, bf16, packing (bfd, padding-free), attention "
        f"{t['attention']}, {t['steps']} steps.",
        f"- project: `python -m app train` with its defaults (packing, PRECISION=auto), micro-batch {p['batch']}, "
        f"{p['steps']} steps.",
        "",
        "| | TRL | project |",
        "|---|---|---|",
        f"| tokens trained | {t['tokens']:,} | {p['tokens']:,} |",
        f"| training loop (s) | {t['seconds']:.1f} | {p['seconds']:.1f} |",
        f"| tokens/s | {t['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} |",
        f"| final train loss (epoch mean) | {t['train_loss']:.4f} | {p['train_loss']:.4f} |",
        f"| peak VRAM reserved (MB) | {t['peak_vram_mb']:,.0f} | {p['peak_vram_mb'] or 0:,.0f} |",
    ]


def targets(r: dict[str, Any]) -> list[tuple[str, bool]]:
    """(target, met) for the report's last section."""
    out = [
        (f"every test of the tier passes ({len(r['tests'])} run)", r["pytest_exit"] == 0 and bool(r["tests"])),
        (f"`make test-gpu` within {r['budget_s'] // 60} min: {r['wall_s']:.0f} s", r["wall_s"] <= r["budget_s"]),
    ]
    out += [
        (f"{f['name']}: {_value(f['value'])} ({f['target']})", f["passed"])
        for f in r["figures"]
        if f["passed"] is not None
    ]
    s = r["speed"]
    if s and "pending" in s:
        out.append(("the speed comparison finished", False))
    elif s and "error" not in s:
        ratio = s["project"]["tokens_per_s"] / s["trl"]["tokens_per_s"]
        out.append((f"tokens/s >= TRL's: {ratio:.2f}x", ratio >= 1.0))
    elif s:
        out.append(("the speed comparison ran", False))
    return out


def report(r: dict[str, Any]) -> str:
    lines = ["# The GPU tier: CUDA training, memory, DeepSpeed, serve, and the speed against TRL", ""]
    lines += _machine(r) + [""] + _tests(r) + [""] + _speed(r["speed"]) + ["", "## Targets", ""]
    lines += [f"- {name} -> {'PASS' if met else 'FAIL'}" for name, met in targets(r)]
    return "\n".join(lines) + "\n"
