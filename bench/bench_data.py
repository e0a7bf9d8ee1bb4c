"""Data benchmark: reading, sampling and caching DuIE-shaped JSONL of 1 to 16 GB (issue 17).

For each size, each a fresh `python -m app train MAX_STEPS=1` process (peak RSS is per process,
read with wait4), on the tiny GLM:
- MAX_SAMPLES=1000: wall time and peak RSS (the one-pass sampler);
- MAX_SAMPLES=all (sizes up to --all-max-gb): the token cache's build time, MB/s and peak RSS, then
  the same command again: the time to its first step on a cache hit.
Plus the sampler alone (`sample_examples` in a process of its own), for the pass's MB/s, and the
reader this issue replaced (read every record, then random.sample), at 1 GB only, as the baseline.
And (issue 31, bench/data_tokenize.py) the cache build's bounds: the tokenizer's own batched encode of the
same records' training text (one process and NUM_PROC), and the build before the batched one, from a git
worktree of its commit, on the smallest --all-sizes file.

Run `make bench-data` (python -m bench.bench_data [--sizes 1,4,16] [--all-sizes 0.25,1]). Writes
bench/data.md and bench/data.json (--out: another folder); the generated files go to bench/results/data/
(ignored by git; --work: another folder) and are kept for the next run. Free disk is checked before each is
written. A quick check of this script: --sizes 0.02 --all-sizes 0.02 --limit-mb 4 --out /tmp/x --work /tmp/x.
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
from pathlib import Path

from app.core.atomic import atomic_write_text
from app.core.utils import setup_logging
from app.data.synthetic import generate_samples
from app.models.tiny import tiny_dir
from bench.data_tokenize import baseline_build, report_lines

log = logging.getLogger("bench")
REPORTS = Path("bench")
OUT = REPORTS / "results" / "data"
GB = 2**30
BASELINE_COMMIT = "867566c"  # the last commit with the old reader (app/data/records.py)

SAMPLER = r"""
import sys, time
from app.data.records import sample_examples
t = time.perf_counter()
pool, report = sample_examples(sys.argv[1], 1000, seed=0)
print("RESULT", time.perf_counter() - t, report.valid)
"""
OLD_READER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("old_records", sys.argv[2])
old = sys.modules["old_records"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
t = time.perf_counter()
examples, report = old.read_examples(sys.argv[1])
old.sample_and_split(examples, 1000, 0.1, 0, False)
print("RESULT", time.perf_counter() - t, report.valid)
"""


def make_file(path: Path, gb: float) -> Path:
    """DuIE-shaped records (the synthetic triplet sentences in the DuIE instruction format), each with a
    running number so no two lines are the same; written once, checked against free disk first."""
    target = int(gb * GB)
    if path.is_file() and path.stat().st_size >= target:
        return path
    free = shutil.disk_usage(path.parent).free
    if free < target * 1.05 + 2 * GB:
        raise SystemExit(
            f"bench-data: {path} needs {target / GB:.1f} GB and {free / GB:.1f} GB are free; "
            "use --sizes with smaller files"
        )
    pool = generate_samples(5000, seed=11)
    tmp = path.with_suffix(".partial")
    written, i = 0, 0
    with tmp.open("w", encoding="utf-8") as fh:
        while written < target:
            block = []
            for _ in range(10_000):
                s = pool[i % len(pool)]
                block.append(
                    json.dumps(
                        {"context": s["context"].replace("\nAnswer: ", f"（{i}）\nAnswer: "), "target": s["target"]},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                i += 1
            text = "".join(block)
            fh.write(text)
            written += len(text.encode())
    os.replace(tmp, path)
    return path


def measured(argv: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Like run(), but the peak RSS of this child alone (wait4 on it, not the max over all children)."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
    chunks = []
    while True:
        b = proc.stdout.read(65536)
        if not b:
            break
        chunks.append(b)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = b"".join(chunks).decode("utf-8", "replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv[:5]))} failed ({proc.returncode}):\n{text[-3000:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024, text


def train(
    data: Path, samples: str, out: Path, cache: Path, cwd: Path | None = None, model: str | Path = "tiny"
) -> tuple[float, float, str]:
    shutil.rmtree(out, ignore_errors=True)
    return measured(
        [
            sys.executable,
            "-m",
            "app",
            "train",
            f"MODEL_NAME={model}",
            f"DATA_PATH={data}",
            f"OUTPUT_DIR={out}",
            f"MAX_SAMPLES={samples}",
            "MAX_STEPS=1",
            "TIER=none",
            "QUANT_LEVEL=none",
            "MAX_SEQ_LEN=256",
            "BATCH_SIZE=1",
            "GRAD_ACCUM=1",
            "SAVE_STEPS=100000",
            "EVAL_STEPS=100000",
            f"CACHE_DIR={cache}",
            "VAL_SIZE=0",
        ],
        cwd,
    )


def result(text: str) -> tuple[float, float]:
    m = re.search(r"^RESULT (\S+) (\S+)$", text, flags=re.M)
    if not m:
        raise RuntimeError(f"no RESULT line in:\n{text[-2000:]}")
    return float(m.group(1)), float(m.group(2))


def build_seconds(log_text: str) -> float | None:
    """From the log: the first line's time to the 'token cache built' line's."""
    stamps = re.findall(r"^(\d\d):(\d\d):(\d\d) ", log_text, flags=re.M)
    built = re.search(r"^(\d\d):(\d\d):(\d\d) INFO app\.data\.cache: token cache built", log_text, flags=re.M)
    if not stamps or not built:
        return None

    def sec(h: str, m: str, s: str) -> int:
        return int(h) * 3600 + int(m) * 60 + int(s)

    return sec(*built.groups()) - sec(*stamps[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16", help="file sizes in GB")
    ap.add_argument("--all-sizes", default="0.25,1", help="sizes (GB) that also run MAX_SAMPLES=all (the cache)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the old reader at 1 GB and the old cache build")
    ap.add_argument(
        "--limit-mb",
        type=float,
        default=32,
        help="MB of the largest --all-sizes file the tokenizer's own speed is measured on",
    )
    ap.add_argument("--out", type=Path, default=REPORTS, help="folder of data.md and data.json")
    ap.add_argument("--work", type=Path, default=OUT, help="folder of the generated files")
    ap.add_argument("--report-only", action="store_true", help="rewrite data.md from data.json")
    a = ap.parse_args()
    setup_logging()
    if a.report_only:
        atomic_write_text(a.out / "data.md", report(json.loads((a.out / "data.json").read_text())))
        return 0
    start_load = os.getloadavg()[0]
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    sizes = sorted({float(s) for s in a.sizes.split(",")} | {float(s) for s in a.all_sizes.split(",")})
    all_sizes = sorted({float(s) for s in a.all_sizes.split(",")})
    small = make_file(a.work / "small.jsonl", 0.001)
    base_s, base_mb, _ = train(small, "1000", a.work / "run", a.work / "cache-small")  # the model's own RSS
    rows = [size_row(gb, gb in all_sizes, a) for gb in sizes]
    summary = {
        "model_rss_mb": round(base_mb),
        "model_s": round(base_s, 1),
        "cpus": os.cpu_count(),
        "rows": rows,
        "small_mb": round(small.stat().st_size / 2**20),
        "start_load": round(start_load, 2),
    }
    if all_sizes:
        data = a.work / f"duie-{max(all_sizes):g}gb.jsonl"
        _, _, text = measured(
            [sys.executable, "-m", "bench.data_tokenize", str(data), str(tiny_dir("tiny")), "--mb", str(a.limit_mb)]
        )
        summary["limit"] = {**json.loads(text.split("RESULT ", 1)[1].splitlines()[0]), "gb": max(all_sizes)}
    summary["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_text(a.out / "data.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(a.out / "data.md", report(summary))
    sys.stdout.write(report(summary))  # cli-output
    return 0


def size_row(gb: float, with_all: bool, a: argparse.Namespace) -> dict:
    """One file size's measurements: the sampler, MAX_SAMPLES=1000, and with ``with_all`` the cache's build and
    hit (and, on the smallest such file, the build before the batched one); the old reader at 1 GB."""
    work = a.work
    data = make_file(work / f"duie-{gb:g}gb.jsonl", gb)
    size_mb = data.stat().st_size / 2**20
    row = {"gb": gb, "size_mb": round(size_mb), "load_avg": round(os.getloadavg()[0], 2)}
    seconds, rss, text = measured([sys.executable, "-c", SAMPLER, str(data)])
    pass_s, valid = result(text)
    row.update(
        sampler_s=round(pass_s, 1),
        sampler_mb_s=round(size_mb / pass_s, 1),
        sampler_rss_mb=round(rss),
        records=int(valid),
    )
    seconds, rss, _ = train(data, "1000", work / "run", work / "cache")
    row.update(sample_train_s=round(seconds, 1), sample_train_rss_mb=round(rss))
    if with_all:
        cache = work / f"cache-{gb:g}"
        shutil.rmtree(cache, ignore_errors=True)
        row["build_load"] = round(os.getloadavg()[0], 2)
        seconds, rss, text = train(data, "all", work / "run", cache)
        built = build_seconds(text)
        row.update(
            all_first_s=round(seconds, 1),
            all_rss_mb=round(rss),
            cache_build_s=built,
            cache_mb_s=round(size_mb / built, 2) if built else None,
            cache_gb=round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / GB, 2),
        )
        seconds, rss, text = train(data, "all", work / "run", cache)
        assert "token cache hit" in text, text[-2000:]
        row.update(hit_s=round(seconds, 1), hit_rss_mb=round(rss))
        if gb == min(float(s) for s in a.all_sizes.split(",")) and not a.no_baseline:
            row["old_build_load"] = round(os.getloadavg()[0], 2)
            _, text = baseline_build(train, data, tiny_dir("tiny"), work)
            built = build_seconds(text)
            row.update(old_build_s=built, old_build_mb_s=round(size_mb / built, 2) if built else None)
    if gb == 1 and not a.no_baseline:
        old = work / "old_records.py"
        old.write_text(
            subprocess.run(
                ["git", "show", f"{BASELINE_COMMIT}:app/data/records.py"], check=True, capture_output=True, text=True
            ).stdout
        )
        seconds, rss, text = measured([sys.executable, "-c", OLD_READER, str(data), str(old)])
        row.update(old_s=round(result(text)[0], 1), old_rss_mb=round(rss))
    log.info("%s", row)
    return row


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(r: dict) -> str:
    rows = r["rows"]
    lines = [f"# Data benchmark: DuIE-shaped JSONL, {r['cpus']} cores, tiny GLM", ""]
    if "start_load" in r:
        lines += [
            f"Load average (1 min): {r['start_load']} when it started, {r['loadavg_end'][0]} at the end "
            f"(1/5/15 min: {', '.join(map(str, r['loadavg_end']))}). Above ~0.5 other jobs shared the "
            f"{r['cpus']} cores and every speed below is understated.",
            "",
        ]
    lines += [
        "Each cell is a fresh process; peak RSS is that process's (wait4). `train` runs MAX_STEPS=1, so its "
        f"time is the time to the first step plus one step. The same command on a {r.get('small_mb', 6)} MB file: "
        f"{r['model_s']} s and {r['model_rss_mb']} MB peak RSS (the model's and runtime's own).",
        "",
        "| file | records | sampler pass | sampler MB/s | sampler peak RSS | train MAX_SAMPLES=1000 | its peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['gb']:g} GB | {x['records']:,} | {x['sampler_s']} s | {x['sampler_mb_s']} | "
            f"{x['sampler_rss_mb']} MB | {x['sample_train_s']} s | {x['sample_train_rss_mb']} MB |"
        )
    cached = [x for x in rows if "cache_build_s" in x]
    if cached:
        lines += [
            "",
            "MAX_SAMPLES=all: the first run builds the token cache (NUM_PROC = one worker per core), the "
            "second finds it.",
            "",
            "| file | first run | cache build | build MB/s | cache size | first run peak RSS | "
            "second run (hit) | its peak RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in cached:
            lines.append(
                f"| {x['gb']:g} GB | {x['all_first_s']} s | {x['cache_build_s']} s | {x['cache_mb_s']} | "
                f"{x['cache_gb']} GB | {x['all_rss_mb']} MB | {x['hit_s']} s | {x['hit_rss_mb']} MB |"
            )
    if cached and max(x["gb"] for x in cached) < max(x["gb"] for x in rows):
        top = max(x["gb"] for x in cached)
        rate = min(x["cache_mb_s"] for x in cached if x["cache_mb_s"])
        lines += [
            "",
            f"MAX_SAMPLES=all was run up to {top:g} GB: the build tokenizes at ~{rate:g} MB/s here, so it "
            "would take "
            + ", ".join(f"~{x['size_mb'] / rate / 60:,.0f} min at {x['gb']:g} GB" for x in rows if x["gb"] > top)
            + " (`--all-sizes` runs them).",
        ]
    base = [x for x in rows if "old_s" in x]
    if base:
        b = base[0]
        lines += [
            "",
            f"Baseline, the reader before this issue at {b['gb']:g} GB (every record as Python objects, then "
            f"random.sample): {b['old_s']} s and {b['old_rss_mb']:,} MB peak RSS, against the one-pass sampler's "
            f"{b['sampler_s']} s and {b['sampler_rss_mb']} MB.",
        ]
    lines += ["", "## Targets", ""]
    rss = [x["sample_train_rss_mb"] for x in rows if x["gb"] >= 1]
    if len(rss) > 1:
        spread = (max(rss) - min(rss)) / min(rss)
        lines.append(
            f"- peak RSS (MAX_SAMPLES=1000) independent of file size, within 10% from "
            f"{min(x['gb'] for x in rows if x['gb'] >= 1):g} to {max(x['gb'] for x in rows):g} GB: "
            f"{min(rss)}-{max(rss)} MB, {spread:.1%} -> {verdict(spread <= 0.10)}"
        )
    above = max(x["sample_train_rss_mb"] for x in rows) - r["model_rss_mb"]
    lines.append(f"- under 1 GB above the model's own: at most {above:+,} MB -> {verdict(above < 1024)}")
    if len(cached) > 1:
        hits = [x["hit_rss_mb"] for x in cached]
        spread = (max(hits) - min(hits)) / min(hits)
        lines.append(
            f"- MAX_SAMPLES=all, peak RSS of the cache-hit run independent of file size, within 10% from "
            f"{min(x['gb'] for x in cached):g} to {max(x['gb'] for x in cached):g} GB: {min(hits)}-"
            f"{max(hits)} MB, {spread:.1%} -> {verdict(spread <= 0.10)}"
        )
    all_rss = [x["all_rss_mb"] for x in cached] + [x["hit_rss_mb"] for x in cached]
    if all_rss:
        above_all = max(all_rss) - r["model_rss_mb"]
        lines.append(
            f"- MAX_SAMPLES=all, under 1 GB above the model's own: at most {above_all:+,} MB -> "
            f"{verdict(above_all < 1024)}"
        )
    lines.append("")
    lines.append(
        f"A file larger than the page cache can hold ({_ram_gb():.0f} GB of RAM here) is read from disk, so "
        "its pass measures the disk as much as the reader; `train` on the same file right after it reads "
        "from a partly warm cache."
    )
    lines.append("")
    worst = min(x["sampler_mb_s"] for x in rows)
    lines.append(
        f"- a streaming pass at >= 100 MB/s per core (one process): slowest {worst} MB/s -> {verdict(worst >= 100)}"
    )
    if cached:
        slow = max(x["hit_s"] for x in cached)
        lines.append(
            f"- cache hit to first step < 10 s: at most {slow} s (the whole process: Python, torch, the "
            f"model, one step) -> {verdict(slow < 10)}"
        )
    lines += report_lines(r, verdict)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
