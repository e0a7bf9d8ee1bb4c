"""A run's data: read, sample, split, measure, fit the plan to memory, tokenise. Writes nothing.

The order matters: MAX_SEQ_LEN comes from the whole samples' token lengths (measured before any
cut), and the memory fit needs that length before batch and checkpointing can be chosen; only
then are the rows encoded at the planned length.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import UserError
from app.data.cache import CachedRows, cache_path, find_cache, open_or_build, uses_cache
from app.data.encode import EncodeStats, encode_all, encode_pairs
from app.data.heldout import digest, sampled_split
from app.data.records import check_stage, judge, read_examples, sample_examples, split, unpair
from app.plan.estimator import ModelShape
from app.plan.peak import predict_peak
from app.plan.resources import Resources, release_memory
from app.plan.tiers import Plan, fit_memory
from app.training.outputs import encode_stats
from app.training.resume import data_fingerprints

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from app.config.fields import DataArgs
    from app.data.records import Example, LoadReport

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    plan: Plan  # the plan with MAX_SEQ_LEN and the memory fit decided
    train_rows: list[dict] | CachedRows = field(default_factory=list)  # CachedRows: MAX_SAMPLES=all's token cache
    val_rows: list[dict] = field(default_factory=list)
    val_examples: list[Example] = field(default_factory=list)  # with messages: what F1 evaluation generates from
    report: dict[str, Any] = field(default_factory=dict)  # data_report.json
    records: dict[str, Any] = field(default_factory=dict)  # how many of the file's records the run uses, and why


def prepare_data(
    plan: Plan, res: Resources, tokenizer: PreTrainedTokenizerBase, shape: ModelShape, build_cache: bool = True
) -> PreparedData:
    """``build_cache``: False for `make info`, which writes nothing: without a token cache yet, the plan is made
    from a sample of the file and a warning says what building the cache will cost."""
    d, seed, stage = plan.cfg.data, plan.cfg.train.seed, plan.cfg.train.stage
    if stage != "sft":  # preference records are read whole, like a MAX_SAMPLES sample
        data: _Sampled | _Cached = _Pairs(d, seed, stage)
    elif uses_cache(d.data_path, d.max_samples):
        final = cache_path(d.data_path, d.data_format, tokenizer, d.cache_dir)
        data = _Cached(d, seed, tokenizer, final) if build_cache or find_cache(final) else _Preview(d, seed, tokenizer)
    else:
        data = _Sampled(d, seed)
    check_stage(data.report, stage, "DATA_PATH")  # SFT on preference records, or the other way: one line
    plan, records = records_used(plan, data.report.valid, data.n_train, data.n_val)
    if isinstance(data, _Preview):
        plan = plan.warn(data.note)
    reports = [data.report]
    if d.val_path:
        val_ex, vreport = read_examples(d.val_path, d.data_format, d.max_bad_ratio, "VAL_PATH")
        data.val_ex = for_stage(val_ex, vreport, stage, "VAL_PATH")
        reports.append(vreport)
    lengths = None
    if "MAX_SEQ_LEN" not in plan.cfg.explicit and plan.tier != "none":  # measure whole samples before the cut
        lengths = data.train(tokenizer, shape.max_positions)[1].lengths
    plan = fit_memory(plan, res, shape, lengths)
    d = plan.cfg.data
    release_if_tight(plan, shape)
    for w in plan.warnings:
        log.warning("%s", w)
    train_rows, tstats = data.train(tokenizer, d.max_seq_len)
    val_rows, vstats = (encode_all if stage == "sft" else encode_pairs)(data.val_ex, tokenizer, d.max_seq_len)
    if not train_rows:
        raise UserError(
            f"DATA_PATH={d.data_path}: no sample keeps any answer token within "
            f"MAX_SEQ_LEN={d.max_seq_len}; raise MAX_SEQ_LEN"
        )
    for r in reports:
        log.info("%s", r.summary())
    log.info("train: %s", tstats.summary(d.max_seq_len))
    if data.val_ex:
        log.info("validation: %s", vstats.summary(d.max_seq_len))
    log.info("plan: %s", ", ".join(f"{k}={v}" for k, (v, _) in plan.decisions.items()))
    return PreparedData(
        plan,
        train_rows,
        val_rows,
        [e for e in data.val_ex if e.messages],
        {
            "sources": [r.summary() for r in reports],
            "records": records,
            "train": encode_stats(tstats),
            "validation": encode_stats(vstats),
            "held_out": held_out_report(plan, data),
            "fingerprints": data_fingerprints(plan.cfg),
        },
        records,
    )


def held_out_report(plan: Plan, data: _Sampled | _Cached) -> dict[str, Any]:
    """data_report.json's record of the validation records, so `make evaluate` can rebuild and check them
    (app/data/heldout.py): where they came from, how many, a digest, and the token cache they were read from."""
    d = plan.cfg.data
    return {
        "from": "VAL_PATH" if d.val_path else "DATA_PATH" if data.val_ex else None,
        "records": len(data.val_ex),
        "digest": digest(data.val_ex),
        "cache": str(data.cache.path) if isinstance(data, _Cached) else None,
    }


class _Sampled:
    """MAX_SAMPLES records sampled in one pass (app/data/records.py), encoded in memory."""

    def __init__(self, d: DataArgs, seed: int):
        self.train_ex, self.val_ex, self.report = sampled_split(d, seed)  # as evaluation rebuilds it
        self.n_train, self.n_val = len(self.train_ex), len(self.val_ex)

    def train(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> tuple[list[dict], EncodeStats]:
        return encode_all(self.train_ex, tokenizer, max_seq_len)


class _Pairs(_Sampled):
    """STAGE=dpo/kto: preference pairs (or KTO's labelled answers) sampled as SFT records are, encoded as
    (prompt, chosen, rejected) token ids (app/data/encode.py encode_pair)."""

    def __init__(self, d: DataArgs, seed: int, stage: str):
        super().__init__(d, seed)
        self.train_ex = for_stage(self.train_ex, self.report, stage, "DATA_PATH")
        self.val_ex = for_stage(self.val_ex, self.report, stage, "DATA_PATH", quiet=True)
        self.n_train, self.n_val = len(self.train_ex), len(self.val_ex)

    def train(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> tuple[list[dict], EncodeStats]:
        return encode_pairs(self.train_ex, tokenizer, max_seq_len)


def for_stage(
    examples: list[Example], report: LoadReport, stage: str, setting: str, quiet: bool = False
) -> list[Example]:
    """The records as STAGE trains on them: a file of another kind is refused in one line (app/data/records.py
    check_stage); STAGE=kto on pairs makes each pair a good and a bad answer (said once)."""
    check_stage(report, stage, setting)
    if stage == "kto" and any(e.rejected is not None for e in examples):
        if not quiet:
            log.info(
                "%s=%s: STAGE=kto trains each chosen answer as good and each rejected one as bad (%d pairs -> "
                "%d answers)",
                setting,
                report.source,
                len(examples),
                2 * len(examples),
            )
        return unpair(examples)
    return examples


class _Cached:
    """MAX_SAMPLES=all of a .jsonl/.txt file: rows from the token cache (app/data/cache.py), read on demand."""

    def __init__(self, d: DataArgs, seed: int, tokenizer: PreTrainedTokenizerBase, final: Path):
        self.cache = open_or_build(d.data_path, d.data_format, tokenizer, d.cache_dir, d.num_proc, final=final)
        self.report = self.cache.report()
        judge(self.report, "DATA_PATH", d.max_bad_ratio, True)
        self.train_idx, self.val_idx = self.cache.split(seed, d.val_size, bool(d.val_path))
        self.val_ex = [self.cache.example(d.data_path, int(i)) for i in self.val_idx]
        self.n_train, self.n_val = len(self.train_idx), len(self.val_ex)

    def train(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> tuple[CachedRows, EncodeStats]:
        return CachedRows(self.cache, self.train_idx, max_seq_len), self.cache.stats(max_seq_len, self.val_idx)


class _Preview(_Sampled):
    """`make info` before the token cache exists: the counts of one pass, lengths from a sample of PREVIEW records,
    and what the cache will cost to build (tokens per second measured on the sample)."""

    PREVIEW = 2000

    def __init__(self, d: DataArgs, seed: int, tokenizer: PreTrainedTokenizerBase):
        import time

        pool, self.report = sample_examples(
            d.data_path, self.PREVIEW, seed, d.data_format, d.max_bad_ratio, "DATA_PATH"
        )
        self.train_ex, self.val_ex = split(pool, d.val_size, bool(d.val_path))
        self.n_val = (
            min(200, max(1, round(self.report.valid * d.val_size)))
            if not d.val_path and d.val_size > 0 and self.report.valid >= 10
            else 0
        )
        self.n_train = self.report.valid - self.n_val
        t = time.perf_counter()
        encode_all(pool[:200], tokenizer, 1 << 62)
        per_record = (time.perf_counter() - t) / max(1, min(200, len(pool)))
        procs = d.num_proc or os.cpu_count() or 1
        minutes = per_record * self.report.valid / procs / 60
        self.note = (
            f"DATA_PATH={d.data_path}: MAX_SAMPLES=all first tokenizes its {self.report.valid:,} records into "
            f"the token cache under CACHE_DIR={d.cache_dir} (not built yet: this plan uses {len(pool):,} "
            f"of them); at the rate measured here with NUM_PROC={procs} that takes about {minutes:,.0f} "
            "min, once. Set MAX_SAMPLES to train on a sample instead"
        )


def release_if_tight(plan: Plan, shape: ModelShape) -> None:
    """RELEASE_MEMORY, decided from the predicted peak (app/plan/resources.py release_memory)."""
    cuda = plan.device == "cuda"
    release_memory(
        plan.cfg.resources.release_memory, cuda, predict_peak(plan.cfg, shape, cuda).total_mb, plan.budget_mb
    )


def records_used(plan: Plan, valid: int, n_train: int, n_val: int) -> tuple[Plan, dict[str, Any]]:
    """How many of the file's valid records this run uses. When the tier (not the user) set a
    MAX_SAMPLES that leaves records out, that is a WARNING, now and in summary.json: the user
    asked to train on a file, and gets part of it."""
    d, explicit = plan.cfg.data, "MAX_SAMPLES" in plan.cfg.explicit
    used = min(valid, d.max_samples) if d.max_samples is not None else valid
    why = "set by you" if explicit else plan.decisions.get("MAX_SAMPLES", (None, "default"))[1]
    records = {
        "valid": valid,
        "used": used,
        "train": n_train,
        "validation": n_val,
        "left_out": valid - used,
        "max_samples": d.max_samples,
        "why": why,
    }
    if used < valid:
        held = "" if d.val_path else f", {n_val} of them held out for validation"
        note = (
            f"DATA_PATH={d.data_path}: using {used:,} of its {valid:,} valid records (MAX_SAMPLES={used}: "
            f"{why}){held}; {valid - used:,} records are left out"
        )
        if explicit:
            log.info("%s", note)
        else:
            plan = plan.warn(f"{note}. Set MAX_SAMPLES=all to train on every record")
    return plan, records
