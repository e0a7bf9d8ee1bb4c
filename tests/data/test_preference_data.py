"""Preference data (STAGE=dpo/kto): every pair and KTO shape read into the right Example, bad records counted
with their reason, the STAGE/format check, encode_pair against SFT's encode, the synthetic pairs' mistakes,
and `generate-data STAGE=dpo|kto` next to a user's files."""

from __future__ import annotations

import csv
import json

import pytest

from app.core.errors import UserError
from app.data.encode import EncodeStats, encode, encode_pair, encode_pairs
from app.data.records import (
    Example,
    LoadReport,
    check_stage,
    detect_format,
    read_examples,
    stage_of_format,
    to_example,
    unpair,
)
from app.data.synthetic import parse_target
from app.data.synthetic_pairs import MISTAKES, generate_kto, generate_pairs

S = lambda c: {"role": "system", "content": c}
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
H = lambda c: {"from": "human", "value": c}
G = lambda c: {"from": "gpt", "value": c}

# ---- shapes: (record, format, messages, rejected or None, label or None) ---------------------------------------
SHAPES = [
    (
        {"prompt": "抽取三元组：周星驰主演《喜剧之王》", "chosen": "good, answer", "rejected": 'bad "answer"'},
        "preference",
        [U("抽取三元组：周星驰主演《喜剧之王》"), A("good, answer")],
        'bad "answer"',
        None,
    ),
    (
        {"system": "be terse", "prompt": "q", "chosen": "a", "rejected": "b", "mistake": "swapped"},
        "preference",
        [S("be terse"), U("q"), A("a")],
        "b",
        None,
    ),
    (
        {"prompt": [S("sys"), U("q1"), A("a1"), U("q2")], "chosen": [A("good")], "rejected": [A("bad")]},  # TRL
        "preference",
        [S("sys"), U("q1"), A("a1"), U("q2"), A("good")],
        "bad",
        None,
    ),
    (
        {"chosen": [U("q"), A("a1"), U("q2"), A("good")], "rejected": [U("q"), A("a1"), U("q2"), A("bad")]},  # implicit
        "preference",
        [U("q"), A("a1"), U("q2"), A("good")],
        "bad",
        None,
    ),
    (
        {"conversations": [H("q1"), G("a1"), H("q2")], "chosen": G("good"), "rejected": G("bad"), "system": "sys"},
        "preference",
        [S("sys"), U("q1"), A("a1"), U("q2"), A("good")],
        "bad",
        None,
    ),  # LLaMA-Factory sharegpt
    (
        {"instruction": "Translate.", "input": "hi", "chosen": "你好", "rejected": "再见"},  # LLaMA-Factory alpaca
        "preference",
        [U("Translate.\nhi"), A("你好")],
        "再见",
        None,
    ),
    (
        {"instruction": "Name a colour.", "input": "", "chosen": "red", "rejected": "7", "system": "s"},
        "preference",
        [S("s"), U("Name a colour."), A("red")],
        "7",
        None,
    ),
    (
        {"messages": [U("q")], "chosen": A("good"), "rejected": A("bad")},  # LLaMA-Factory messages
        "preference",
        [U("q"), A("good")],
        "bad",
        None,
    ),
    ({"prompt": "q", "completion": "a", "label": True}, "kto", [U("q"), A("a")], None, True),
    ({"prompt": [U("q")], "completion": [A("a")], "label": False}, "kto", [U("q"), A("a")], None, False),
    ({"prompt": "q", "completion": "a", "label": 1, "system": "s"}, "kto", [S("s"), U("q"), A("a")], None, True),
    ({"prompt": "q", "completion": "a", "label": 0}, "kto", [U("q"), A("a")], None, False),
    ({"prompt": "q", "completion": "a", "label": "True"}, "kto", [U("q"), A("a")], None, True),
    ({"prompt": "q", "completion": "a", "label": "false"}, "kto", [U("q"), A("a")], None, False),
]


@pytest.mark.parametrize("rec,fmt,messages,rejected,label", SHAPES)
def test_each_shape_reads_into_the_example_it_means(tmp_path, rec, fmt, messages, rejected, label):
    assert detect_format(rec) == fmt
    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n" + json.dumps(rec, ensure_ascii=False) + "\n", "utf-8")
    examples, report = read_examples(path)
    assert report.format == fmt and report.valid == 2 and not report.bad_count
    ex = examples[0]
    assert (ex.messages, ex.rejected, ex.label, ex.line) == (messages, rejected, label, 1)
    assert ex.kind == ("pair" if fmt == "preference" else "kto")
    assert ex.prompt_messages == messages[:-1] and ex.answer == messages[-1]["content"]  # what predict and F1 read


def test_csv_and_json_files_read_pairs_and_kto_labels_given_as_text(tmp_path):
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerows([["prompt", "chosen", "rejected"], ["q, with a comma", "a\nline two", "b"]])
    examples, report = read_examples(pairs)
    assert report.format == "preference"
    assert (examples[0].messages, examples[0].rejected) == ([U("q, with a comma"), A("a\nline two")], "b")
    kto = tmp_path / "kto.csv"
    kto.write_text("prompt,completion,label\nq,a,1\nq,b,0\nq,c,true\nq,d,yes\n", encoding="utf-8")
    examples, report = read_examples(kto)
    assert [e.label for e in examples] == [True, False, True] and report.reasons == {"label is not true/false": 1}
    arr = tmp_path / "pairs.json"
    arr.write_text(json.dumps([SHAPES[2][0], SHAPES[4][0]]), encoding="utf-8")
    examples, report = read_examples(arr)
    assert [e.messages for e in examples] == [SHAPES[2][2], SHAPES[4][2]] and report.format == "preference"


# ---- bad records ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rec,fmt,reason",
    [
        ({"prompt": "q", "chosen": "a"}, "preference", "missing field 'rejected'"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "preference", "missing field 'chosen'"),
        ({"chosen": "a", "rejected": "b"}, "preference", "missing field 'prompt'"),
        ({"prompt": "q", "chosen": " a ", "rejected": "a"}, "preference", "chosen equals rejected"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "preference", "empty prompt"),
        ({"prompt": "q", "chosen": "a", "rejected": " \n"}, "preference", "empty answer"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "preference", "empty answer"),
        (
            {"prompt": [U("q"), A("a")], "chosen": [A("x")], "rejected": [A("y")]},
            "preference",
            "prompt does not end with a user turn",
        ),
        (
            {"prompt": [U("q")], "chosen": [U("x")], "rejected": [A("y")]},
            "preference",
            "'chosen' does not end with an assistant turn",
        ),
        (
            {"chosen": [U("q"), A("x")], "rejected": [U("other"), A("y")]},
            "preference",
            "chosen and rejected differ before their last turn",
        ),
        ({"chosen": [A("x")], "rejected": [A("y")]}, "preference", "empty prompt"),
        ({"conversations": [H("q")], "chosen": {"from": "gpt"}, "rejected": G("b")}, "preference", "turn without"),
        (
            {"conversations": [H("q")], "chosen": G("a"), "rejected": {"from": "narrator", "value": "b"}},
            "preference",
            "unknown role",
        ),
        ({"prompt": "q", "chosen": 3, "rejected": {"x": 1}}, "preference", "turn without"),
        ({"prompt": "q", "completion": "a", "label": "maybe"}, "kto", "label is not true/false"),
        ({"prompt": "q", "completion": "a", "label": 2}, "kto", "label is not true/false"),
        ({"prompt": "q", "completion": "a"}, "kto", "missing field 'label'"),
        ({"prompt": "q", "completion": " ", "label": True}, "kto", "empty answer"),
        ({"completion": "a", "label": True}, "kto", "missing field 'prompt'"),
    ],
)
def test_a_bad_pair_or_kto_record_gives_its_reason(rec, fmt, reason):
    with pytest.raises(ValueError, match=reason):
        to_example(rec, fmt)


def test_bad_pairs_are_counted_against_max_bad_ratio(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    lines = [
        good,
        {"prompt": "q", "chosen": "a"},
        good,
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        good,
    ]
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    examples, report = read_examples(path, max_bad_ratio=0.5)
    assert [e.line for e in examples] == [1, 3, 6]
    assert report.bad == [(2, "missing field 'rejected'"), (4, "chosen equals rejected"), (5, "empty prompt")]
    with pytest.raises(UserError) as err:
        read_examples(path, max_bad_ratio=0.2)
    msg = str(err.value)
    assert "\n" not in msg and f"DATA_PATH={path}" in msg and "MAX_BAD_RATIO=0.2" in msg
    assert "3 of 6 records are bad" in msg and "line 2: missing field 'rejected'" in msg


# ---- STAGE against the records' format ------------------------------------------------------------------------


def _report(fmt: str) -> LoadReport:
    return LoadReport("data/train.jsonl", fmt, total=3)


def test_stage_of_format():
    assert [stage_of_format(f) for f in ("preference", "kto", "context_target", "sharegpt", "text")] == [
        "dpo",
        "kto",
        "sft",
        "sft",
        "sft",
    ]


@pytest.mark.parametrize(
    "fmt,stage,words",
    [
        (
            "context_target",
            "dpo",
            [
                "DATA_PATH=data/train.jsonl holds sft records (context_target)",
                "STAGE=dpo needs prompt/chosen/rejected pairs",
                "`make data STAGE=dpo`",
                "set STAGE=sft",
            ],
        ),
        ("kto", "dpo", ["holds kto records (kto)", "set STAGE=kto"]),
        ("sharegpt", "kto", ["holds sft records (sharegpt)", "STAGE=kto needs prompt/completion/label", "STAGE=sft"]),
        ("preference", "sft", ["holds preference pairs (preference)", "set STAGE=dpo", "STAGE=kto"]),
        ("kto", "sft", ["holds kto records (kto)", "set STAGE=kto"]),
    ],
)
def test_records_that_do_not_fit_the_stage_are_refused_in_one_line(fmt, stage, words):
    with pytest.raises(UserError) as err:
        check_stage(_report(fmt), stage)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_stage_kto_trains_pairs_as_a_good_and_a_bad_record():
    assert check_stage(_report("preference"), "dpo") is False and check_stage(_report("kto"), "kto") is False
    assert check_stage(_report("context_target"), "sft") is False
    assert check_stage(_report("preference"), "kto") is True  # pairs: unpair them
    pair = to_example({"system": "s", "prompt": "q", "chosen": "a", "rejected": "b"}, "preference", line=4)
    kept = Example(messages=[U("q"), A("x")], label=False, line=5)
    out = unpair([pair, kept])
    assert [(e.messages, e.label, e.rejected, e.line) for e in out] == [
        ([S("s"), U("q"), A("a")], True, None, 4),
        ([S("s"), U("q"), A("b")], False, None, 4),
        ([U("q"), A("x")], False, None, 5),
    ]


# ---- encode_pair --------------------------------------------------------------------------------------------

TOKENIZERS = ("glm_tok", "qwen2_tok", "llama_tok")
LONG = "句子中包含了哪些信息，输出json：" * 6


def _pair(
    prompt: list[dict], chosen: str = "```json\n[主演]\n```", rejected: str = "no triplets here at all"
) -> Example:
    return Example(messages=prompt + [A(chosen)], rejected=rejected)


@pytest.mark.parametrize("fixture", TOKENIZERS)
@pytest.mark.parametrize("prompt", [[U(LONG)], [S("sys"), U("q1"), A("a1"), U(LONG)]])
def test_an_uncut_pair_is_sft_encode_of_each_side(request, fixture, prompt):
    tok = request.getfixturevalue(fixture)
    pair = _pair(prompt)
    stats = EncodeStats()
    row = encode_pair(pair, tok, 4096, stats)
    chosen = encode(Example(messages=prompt + [A(pair.answer)]), tok, 4096)
    rejected = encode(Example(messages=prompt + [A(pair.rejected)]), tok, 4096)
    assert row["prompt_ids"] + row["chosen_ids"] == chosen["input_ids"]
    assert row["prompt_ids"] + row["rejected_ids"] == rejected["input_ids"]
    assert chosen["labels"][len(row["prompt_ids"]) :] == row["chosen_ids"]  # the answer is exactly SFT's labels' tail
    assert row["chosen_ids"][-1] == tok.eos_token_id and row["rejected_ids"][-1] == tok.eos_token_id
    p, c, r = (len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert (stats.samples, stats.tokens, stats.lengths) == (1, p + c + r, [p + max(c, r)])
    assert not stats.prompt_truncated and not stats.answer_truncated
    kto = encode_pair(Example(messages=pair.messages, label=False), tok, 4096)
    assert kto == {"prompt_ids": row["prompt_ids"], "completion_ids": row["chosen_ids"], "label": False}


@pytest.mark.parametrize("fixture", TOKENIZERS)
def test_over_the_limit_the_prompt_loses_its_middle_then_the_answers_their_ends(request, fixture):
    tok = request.getfixturevalue(fixture)
    pair = _pair([U(LONG)], rejected="wrong " * 12)
    whole = encode_pair(pair, tok, 4096)
    p, c, r = (len(whole[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    longer = max(c, r)
    assert p > 40 and r > c  # the rejected answer is the longer one here

    stats = EncodeStats()
    limit = p + longer - 10  # only the prompt need shrink
    row = encode_pair(pair, tok, limit, stats)
    assert row["chosen_ids"] == whole["chosen_ids"] and row["rejected_ids"] == whole["rejected_ids"]
    kept = row["prompt_ids"]
    assert len(kept) == p - 10 and stats.prompt_truncated == 1 and not stats.answer_truncated
    head = len(kept) // 2  # its start (the instruction) and its end (the assistant marker) survive
    assert kept[:head] == whole["prompt_ids"][:head] and kept[head:] == whole["prompt_ids"][-(len(kept) - head) :]
    assert stats.lengths == [limit] and stats.tokens == len(kept) + c + r

    stats = EncodeStats()
    row = encode_pair(pair, tok, 20, stats)  # not even the answers fit: 16 prompt tokens stay, as in encode()
    assert row["prompt_ids"] == whole["prompt_ids"][:8] + whole["prompt_ids"][-8:]
    assert stats.answer_truncated == 1 and not stats.prompt_truncated
    assert row["rejected_ids"] == whole["rejected_ids"][:4] and row["chosen_ids"] == whole["chosen_ids"][:4]
    assert stats.lengths == [20]


def test_encode_pairs_keeps_every_pair_and_sums_the_stats(glm_tok):
    examples = [_pair([U(f"question {i}")]) for i in range(3)]
    rows, stats = encode_pairs(examples, glm_tok, 4096)
    assert len(rows) == 3 and stats.samples == 3
    assert stats.tokens == sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    with pytest.raises(ValueError, match="not a preference pair"):
        encode_pair(Example(messages=[U("q"), A("a")]), glm_tok, 4096)


# ---- synthetic pairs ------------------------------------------------------------------------------------------


def _diff(chosen: list[dict], rejected: list[dict], kind: str) -> bool:
    """Whether ``rejected`` is ``chosen`` with exactly the mistake ``kind``."""
    if kind == "missing":
        return len(chosen) >= 2 and len(rejected) == len(chosen) - 1 and all(t in chosen for t in rejected)
    if len(rejected) != len(chosen):
        return False
    changed = [(a, b) for a, b in zip(chosen, rejected, strict=True) if a != b]
    if len(changed) != 1:
        return False
    ((a, b),) = changed
    if kind == "swapped":
        return (b["subject"], b["object"]) == (a["object"], a["subject"]) and b["predicate"] == a["predicate"]
    if kind == "predicate":
        return b["predicate"] != a["predicate"] and (b["subject"], b["object"]) == (a["subject"], a["object"])
    return b["object"] != a["object"] and {k: v for k, v in b.items() if k != "object"} == {
        k: v for k, v in a.items() if k != "object"
    }


def test_generated_pairs_hold_each_mistake_they_name():
    pairs = generate_pairs(300, seed=3)
    assert pairs == generate_pairs(300, seed=3) and pairs != generate_pairs(300, seed=4)
    assert len({p["prompt"] for p in pairs}) == 300
    assert {p["mistake"] for p in pairs} == set(MISTAKES)
    for p in pairs:
        assert p["rejected"] != p["chosen"]
        assert _diff(parse_target(p["chosen"]), parse_target(p["rejected"]), p["mistake"]), p
        if p["mistake"] == "entity":  # invented: a name the sentence does not hold
            new = {t["object"] for t in parse_target(p["rejected"])} - {t["object"] for t in parse_target(p["chosen"])}
            assert len(new) == 1 and new.pop() not in p["prompt"]
    ex = to_example(pairs[0], detect_format(pairs[0]))  # the extra "mistake" field is ignored
    assert ex.messages == [U(pairs[0]["prompt"]), A(pairs[0]["chosen"])] and ex.rejected == pairs[0]["rejected"]


def test_generated_kto_records_are_half_good_and_avoid_given_prompts():
    avoid = [p["prompt"] for p in generate_pairs(50, seed=1)]
    rows = generate_kto(60, seed=1, avoid=avoid)
    assert rows == generate_kto(60, seed=1, avoid=avoid)
    assert not {r["prompt"] for r in rows} & set(avoid)
    assert sum(r["label"] for r in rows) == 30
    assert [r["label"] for r in rows] != sorted(r["label"] for r in rows)  # mixed, not good-then-bad
    gold = {p["prompt"]: p["chosen"] for p in generate_pairs(60, seed=1, avoid=avoid)}  # the same prompts
    for r in rows:
        if r["label"]:
            assert r["completion"] == gold[r["prompt"]] and "mistake" not in r
        else:
            assert _diff(parse_target(gold[r["prompt"]]), parse_target(r["completion"]), r["mistake"]), r


# ---- `generate-data STAGE=dpo|kto` --------------------------------------------------------------------------------


def test_generate_data_stage_dpo_writes_pairs_beside_the_sft_sample(cli, tmp_path, caplog):
    assert cli("generate-data", "STAGE=dpo")[0] == 0
    assert "next: make train STAGE=dpo DATA_PATH=data/pref.jsonl" in caplog.text
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".generated.json", "pref.jsonl", "pref_dev.jsonl"]
    train, report = read_examples(tmp_path / "data" / "pref.jsonl")
    dev, _ = read_examples(tmp_path / "data" / "pref_dev.jsonl")
    assert (report.format, len(train), len(dev)) == ("preference", 400, 50)
    assert all(e.kind == "pair" for e in train + dev)
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in dev}
    assert cli("generate-data")[0] == 0  # the SFT sample: none of its prompts is a pair's
    sft, _ = read_examples(tmp_path / "data" / "train.jsonl")
    sft_dev, _ = read_examples(tmp_path / "data" / "dev.jsonl")
    assert not {e.messages[0]["content"] for e in sft + sft_dev} & {e.messages[0]["content"] for e in train + dev}
    assert cli("generate-data", "STAGE=kto")[0] == 0
    kto, report = read_examples(tmp_path / "data" / "kto.jsonl")
    assert report.format == "kto" and len(kto) == 400 and {e.label for e in kto} == {True, False}


def test_generate_data_stage_dpo_never_replaces_a_users_file(cli, tmp_path, snapshot):
    mine = tmp_path / "data" / "pref.jsonl"
    mine.parent.mkdir()
    mine.write_text('{"prompt": "mine", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    before = snapshot(tmp_path)
    code, errors, _ = cli("generate-data", "STAGE=dpo")
    assert code == 2 and len(errors) == 1 and "data/pref.jsonl" in errors[0] and "REPLACE_DATA=1" in errors[0]
    assert snapshot(tmp_path) == before  # not even pref_dev.jsonl
    # a DATA_PATH of the user's: the pairs go there, and dev.jsonl beside it, as the SFT sample does
    code, errors, _ = cli("generate-data", "STAGE=dpo", "DATA_PATH=mine/train.jsonl")
    assert code == 0, errors
    assert read_examples(tmp_path / "mine" / "train.jsonl")[1].format == "preference"
    assert read_examples(tmp_path / "mine" / "dev.jsonl")[1].valid == 50
    assert snapshot(tmp_path, skip=("mine",)) == before
    assert cli("generate-data", "STAGE=dpo", "REPLACE_DATA=1")[0] == 0  # asked explicitly
    assert len(mine.read_text(encoding="utf-8").splitlines()) == 400
