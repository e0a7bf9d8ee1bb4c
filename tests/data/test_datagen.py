"""Tests for app.data.synthetic: determinism, exact record format, schema coverage, file output."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from app.data import synthetic as datagen
from app.data.synthetic import PREDICATES, generate_samples, parse_target

PREFIX = "Instruction: 你现在是一个很厉害的阅读理解器，严格按照人类指令进行回答。\nInput: "
KEYS = ["predicate", "object_type", "subject_type", "object", "subject"]


def check_spo_record(rec: dict) -> tuple[str, list[dict]]:
    """Assert a triplet record has the real dataset's exact layout; return (sentence, triplets)."""
    assert list(rec) == ["context", "target"], rec
    ctx, tgt = rec["context"], rec["target"]
    assert ctx.startswith(PREFIX), ctx[:80]
    assert "\nInput: " in ctx and ctx.endswith("\nAnswer: "), ctx[-40:]
    body = ctx[len(PREFIX) : -len("\nAnswer: ")]
    instruction, sep, sentence = body.partition("\n\n")
    assert sep and instruction and sentence, body
    assert tgt.startswith("```json\n[") and tgt.endswith("]\n```"), tgt
    triplets = parse_target(tgt)
    # Default json.dumps separators and no escaping of Chinese, byte for byte.
    assert tgt == "```json\n" + json.dumps(triplets, ensure_ascii=False) + "\n```"
    assert triplets, "empty triplet list"
    for t in triplets:
        assert list(t) == KEYS, t
        assert all(isinstance(v, str) and v for v in t.values()), t
    return sentence, triplets


@pytest.fixture(scope="module")
def samples() -> list[dict[str, str]]:
    return generate_samples(500, seed=42)


def test_same_seed_identical_different_seed_differs(samples):
    assert generate_samples(500, seed=42) == samples
    other = generate_samples(500, seed=7)
    assert other != samples
    assert {s["context"] for s in other} != {s["context"] for s in samples}


def test_no_duplicate_contexts(samples):
    assert len({s["context"] for s in samples}) == len(samples) == 500


def test_generate_zero_and_negative():
    assert generate_samples(0) == []
    with pytest.raises(ValueError):
        generate_samples(-1)


def test_exact_format(samples):
    for rec in samples:
        check_spo_record(rec)


def test_real_dataset_passes_same_checker(real_data_dir):
    path = real_data_dir / "train.jsonl"
    checked, real_types = 0, {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["target"].startswith("```json"):  # other records are classification tasks
                for t in check_spo_record(rec)[1]:
                    real_types.setdefault(t["predicate"], set()).add((t["subject_type"], t["object_type"]))
                checked += 1
    assert checked >= 100, f"only {checked} triplet records found in {path}"
    # Our schema must agree with the real DuIE typing wherever the predicate occurs there.
    shared = [p for p in PREDICATES if p in real_types]
    assert len(shared) >= 20, shared
    for pred in shared:
        assert PREDICATES[pred] in real_types[pred], (pred, PREDICATES[pred], real_types[pred])


def test_instruction_wordings_varied(samples):
    used = {s["context"][len(PREFIX) :].partition("\n\n")[0] for s in samples}
    assert len(datagen.INSTRUCTIONS) >= 8
    assert used == set(datagen.INSTRUCTIONS)


def test_predicate_coverage_and_types(samples):
    assert len(PREDICATES) >= 20
    seen = Counter()
    for rec in samples:
        for t in parse_target(rec["target"]):
            seen[t["predicate"]] += 1
            assert t["predicate"] in PREDICATES, t
            assert (t["subject_type"], t["object_type"]) == PREDICATES[t["predicate"]], t
    assert len(seen) >= 20, seen
    for pred in ("主演", "作者", "歌手", "出生日期", "首都", "目", "朝代", "主持人"):
        assert pred in seen, pred


def test_triplet_counts_cover_one_to_four(samples):
    counts = Counter(len(parse_target(rec["target"])) for rec in samples)
    assert set(counts) == {1, 2, 3, 4}, counts


def test_subject_and_object_in_sentence(samples):
    for rec in samples:
        sentence, triplets = check_spo_record(rec)
        for t in triplets:
            assert t["subject"] in sentence, (t, sentence)
            assert t["object"] in sentence, (t, sentence)
            assert t["subject"] != t["object"], t
        assert len({(t["predicate"], t["object"]) for t in triplets}) == len(triplets), triplets


def test_spouse_predicates_exclusive(samples):
    for rec in samples:
        preds = {t["predicate"] for t in parse_target(rec["target"])}
        assert not {"妻子", "丈夫"} <= preds, rec


def test_parse_target_rejects_unfenced():
    with pytest.raises(ValueError):
        parse_target('[{"predicate": "主演"}]')
    assert parse_target("```json\n[]\n```") == []


def test_write_dataset(tmp_path, write_dataset):
    out = tmp_path / "nested" / "syn"
    paths = write_dataset(out, n_train=60, n_dev=15, seed=3)
    assert set(paths) == {"train", "dev"}
    assert paths["train"] == out / "train.jsonl" and paths["dev"] == out / "dev.jsonl"
    recs = {}
    for split, p in paths.items():
        lines = p.read_text(encoding="utf-8").splitlines()
        assert "\\u" not in p.read_text(encoding="utf-8")  # ensure_ascii=False
        recs[split] = [json.loads(line) for line in lines]
        for rec in recs[split]:
            check_spo_record(rec)
    assert len(recs["train"]) == 60 and len(recs["dev"]) == 15
    train_ctx = {r["context"] for r in recs["train"]}
    dev_ctx = {r["context"] for r in recs["dev"]}
    assert len(train_ctx) == 60 and len(dev_ctx) == 15 and not train_ctx & dev_ctx
    assert sorted(x.name for x in out.iterdir()) == ["dev.jsonl", "train.jsonl"]  # no temp left
    # Rewriting with the same seed is byte-identical (reproducible datasets).
    before = paths["train"].read_bytes()
    write_dataset(out, n_train=60, n_dev=15, seed=3)
    assert paths["train"].read_bytes() == before


def test_write_dataset_failure_leaves_old_file(tmp_path, monkeypatch, write_dataset):
    paths = write_dataset(tmp_path, n_train=5, n_dev=2)
    before = paths["train"].read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("app.core.atomic.os.replace", boom)
    with pytest.raises(OSError):
        write_dataset(tmp_path, n_train=9, n_dev=2, seed=1)
    assert paths["train"].read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dev.jsonl", "train.jsonl"]
