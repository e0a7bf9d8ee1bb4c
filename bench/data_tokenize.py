"""bench-data's tokenizing half (issue 31): what bounds the token cache build, and the build it replaced.

- The limit: the tokenizer's own batched encode of the file's records' full training text (each record's
  segments joined, as the build renders them, EOS aside), with nothing around it: no file reading, no
  rendering, no writing. In one process, and in NUM_PROC forked processes that each take a share, as the
  build's workers do. In MB of the data file per second, the build's own unit.
- The build before this issue's change: BUILD_BASELINE_COMMIT's `python -m app train MAX_SAMPLES=all` on the
  same file, from a `git worktree` of that commit in a temporary folder (the checkout's index and HEAD are
  untouched), so "x times faster" compares two builds measured in the same run.

`python -m bench.data_tokenize DATA MODEL_DIR [--procs N] [--mb 32]` prints one RESULT line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUILD_BASELINE_COMMIT = "a86d07e"  # the last commit whose cache build encoded record by record
METHODS = {
    "call": "tokenizer(texts, add_special_tokens=False)",
    "encode_batch": "backend encode_batch(texts)",
    "encode_batch_fast": "backend encode_batch_fast(texts)",
}
_BATCH = 1000  # texts per call: the backend's Encodings of a whole share would take GBs
_WORK: dict[str, Any] = {}  # what the forked processes inherit: the tokenizer, the texts, the method


def rendered(data: str, tok: Any, mb: float) -> tuple[list[str], int]:
    """(full training text of each record, file bytes they came from) of the file's first ``mb`` MB."""
    from app.data.encode import segments
    from app.data.record_sources import iter_lines
    from app.data.records import LoadReport, examples_of

    texts, used = [], Path(data).stat().st_size
    for ex, (start,) in examples_of(
        iter_lines(data, "DATA_PATH", False), "auto", data, "DATA_PATH", LoadReport(data, "auto")
    ):
        if start >= mb * 2**20:
            used = start
            break
        texts.append("".join(text for text, _ in segments(ex, tok)))
    return texts, used


def encode(tok: Any, texts: list[str], method: str) -> int:
    """Tokenize ``texts`` the way ``method`` names; the number of tokens (the ids stay where the call left them)."""
    n = 0
    for i in range(0, len(texts), _BATCH):
        batch = texts[i : i + _BATCH]
        if method == "call":
            n += sum(map(len, tok(batch, add_special_tokens=False)["input_ids"]))
        else:
            n += sum(len(e) for e in getattr(tok.backend_tokenizer, method)(batch, add_special_tokens=False))
    return n


def _share(i: int) -> int:
    procs = _WORK["procs"]
    return encode(_WORK["tok"], _WORK["texts"][i::procs], _WORK["method"])


def limit(data: str, model: str, procs: int, mb: float) -> dict[str, Any]:
    """Seconds of each method over the first ``mb`` MB's rendered text, in one process and in ``procs``."""
    import multiprocessing as mp

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts, used = rendered(data, tok, mb)
    out: dict[str, Any] = {
        "file_mb": used / 2**20,
        "records": len(texts),
        "procs": procs,
        "text_mb": sum(len(t.encode()) for t in texts) / 2**20,
        "one": {},
        "pool": {},
        "load": round(os.getloadavg()[0], 2),
    }
    encode(tok, texts[:_BATCH], "call")  # warm: the first call builds what later ones reuse
    for method in METHODS:
        t = time.perf_counter()
        out["tokens"] = encode(tok, texts, method)
        out["one"][method] = time.perf_counter() - t
    _WORK.update(tok=tok, texts=texts, procs=procs)
    for method in METHODS:  # forked after the texts exist: nothing is sent to the workers but an index
        _WORK["method"] = method
        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_share, range(procs))  # started and warm before the clock
            t = time.perf_counter()
            pool.map(_share, range(procs))
            out["pool"][method] = time.perf_counter() - t
    out["load_end"] = round(os.getloadavg()[0], 2)
    return out


def baseline_build(
    train: Callable[..., tuple[float, float, str]], data: Path, model: Path, work: Path
) -> tuple[float, str]:
    """``train(data, "all", out, cache, cwd=..., model=...)`` run in a worktree of BUILD_BASELINE_COMMIT: (peak RSS,
    its log). The worktree and its cache are removed afterwards."""
    import shutil

    tree = Path(tempfile.mkdtemp(prefix="bench-data-baseline-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), BUILD_BASELINE_COMMIT], check=True, capture_output=True
    )
    cache = work / "cache-baseline"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        _, rss, text = train(
            data.resolve(), "all", (work / "run-baseline").resolve(), cache.resolve(), cwd=tree, model=model.resolve()
        )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)
        shutil.rmtree(tree.parent, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return rss, text


def report_lines(r: dict[str, Any], verdict: Callable[[bool], str]) -> list[str]:
    """The report's tokenizing section and its two targets, from bench_data's summary ``r``."""
    lim = r.get("limit")
    if not lim:
        return []
    rate = {k: {m: lim["file_mb"] / sec for m, sec in lim[k].items()} for k in ("one", "pool")}
    build = next((x for x in r["rows"] if x["gb"] == lim["gb"]), {}).get("cache_mb_s")
    lines = [
        "",
        "## Tokenizing: the cache build against the tokenizer's own speed",
        "",
        f"The tokenizer alone on the full training text of the first {lim['file_mb']:.0f} MB of the "
        f"{lim['gb']:g} GB file ({lim['records']:,} records, {lim['text_mb']:.0f} MB of text as the build renders "
        f"it, {lim['tokens']:,} tokens): no reading, rendering or writing, in MB of the file per second (load "
        f"{lim['load']} before, {lim['load_end']} after). The build's own rate is the table's above.",
        "",
        f"| tokenizer call | 1 process | {lim['procs']} processes |",
        "|---|---|---|",
    ]
    lines += [f"| {METHODS[m]} | {rate['one'][m]:.2f} | {rate['pool'][m]:.2f} |" for m in METHODS]
    limit = max(rate["pool"]["call"], rate["pool"]["encode_batch"])
    fast = rate["pool"]["encode_batch_fast"]
    lines += ["", "## Tokenizing targets", ""]
    if build:
        lines.append(
            f"- cache build >= 70% of the tokenizer's own batched encode speed: {build:.2f} vs {limit:.2f} "
            f"MB/s ({build / limit:.0%}; {build / fast:.0%} of encode_batch_fast's {fast:.2f}) -> "
            f"{verdict(build >= 0.7 * limit)}"
        )
    base = next((x for x in r["rows"] if x.get("old_build_mb_s")), None)
    if base and base.get("cache_mb_s"):
        new, old = base["cache_mb_s"], base["old_build_mb_s"]
        lines.append(
            f"- cache build >= 4x the build before this change ({BUILD_BASELINE_COMMIT}, the same "
            f"{base['gb']:g} GB file, load {base['build_load']} / {base['old_build_load']} as each "
            f"started): {new:.2f} vs {old:.2f} MB/s, {new / old:.1f}x -> {verdict(new >= 4 * old)}"
        )
        if 4 * old > max(limit, fast):
            lines.append(
                f"  (4x is {4 * old:.2f} MB/s, above what the tokenizer alone does on these "
                f"{lim['procs']} processes, {max(limit, fast):.2f} MB/s: no build that tokenizes every "
                "segment with it can reach that here)"
            )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mb", type=float, default=32.0, help="measure on the file's first MB")
    a = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, as the build's workers run
    print("RESULT " + json.dumps(limit(a.data, a.model, a.procs, a.mb)))  # cli-output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
