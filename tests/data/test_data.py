"""Tests for app.data.records: every file type x record format, bad records, file-level errors,
the real DuIE data, and the sampling / validation split."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest

from app.core.errors import UserError
from app.data.records import Example, LoadReport, detect_format, read_examples, to_example

S = lambda c: {"role": "system", "content": c}
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}

# ---- the format matrix -------------------------------------------------------------------------
# Each format: raw records (as a user would write them) and the normalised result expected,
# as a list of ("messages", [...]) or ("text", "...") per record, in file order.
# Values include Chinese, commas, quotes and newlines so CSV quoting and JSON escaping are exercised.

CTX1 = "Instruction: 抽取三元组。\nInput: 周星驰主演《喜剧之王》, 1999年上映。\nAnswer: "
TGT1 = '```json\n[{"predicate": "主演", "object": "周星驰"}]\n```'
CTX2 = 'Say "hi", politely.'
TGT2 = "hi, there"

RECORDS = {
    "context_target": (
        [{"context": CTX1, "target": TGT1}, {"context": CTX2, "target": TGT2}],
        [("messages", [U(CTX1), A(TGT1)]), ("messages", [U(CTX2), A(TGT2)])],
    ),
    "alpaca": (
        [
            {"instruction": "Translate to Chinese.", "input": "good morning", "output": "早上好"},
            {"instruction": "Name a colour.", "input": "", "output": "red"},
            {"instruction": "只回答数字。", "input": "1+1=?", "output": "2", "system": "You are terse."},
        ],
        [
            ("messages", [U("Translate to Chinese.\ngood morning"), A("早上好")]),
            ("messages", [U("Name a colour."), A("red")]),
            ("messages", [S("You are terse."), U("只回答数字。\n1+1=?"), A("2")]),
        ],
    ),
    "text": (
        [{"text": "### 问题: 1+1=?\n### 回答: 2"}, {"text": "plain text, with a comma"}],
        [("text", "### 问题: 1+1=?\n### 回答: 2"), ("text", "plain text, with a comma")],
    ),
    "messages": (
        [
            {"messages": [S("sys"), U("你好"), A("你好！")]},
            {"messages": [U("q1"), A("a1"), U("q2"), A("a2")]},
        ],
        [
            ("messages", [S("sys"), U("你好"), A("你好！")]),
            ("messages", [U("q1"), A("a1"), U("q2"), A("a2")]),
        ],
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "sys"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            {
                "conversations": [
                    {"from": "user", "value": "q1"},
                    {"from": "assistant", "value": "a1"},
                    {"from": "human", "value": "q2"},
                    {"from": "gpt", "value": "a2"},
                ]
            },
        ],
        [
            ("messages", [S("sys"), U("q"), A("a")]),
            ("messages", [U("q1"), A("a1"), U("q2"), A("a2")]),
        ],
    ),
}

FLAT = ("context_target", "alpaca", "text")  # what a CSV row can hold


def write_records(path: Path, records: list[dict]) -> Path:
    """Write records the way a user would for the file's suffix."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), "utf-8")
    elif suffix == ".csv":
        cols = list(dict.fromkeys(k for r in records for k in r))
        with path.open("w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, restval="")
            w.writeheader()
            w.writerows(records)
    elif suffix == ".txt":  # one sample per line; a newline inside a sample is written as \n
        path.write_text("".join(r["text"].replace("\n", "\\n") + "\n" for r in records), "utf-8")
    else:
        raise AssertionError(suffix)
    return path


MATRIX = (
    [(".jsonl", f) for f in RECORDS]
    + [(".json", f) for f in RECORDS]
    + [(".csv", f) for f in FLAT]
    + [(".txt", "text")]
)


def as_pairs(examples: list[Example]) -> list[tuple[str, object]]:
    return [("text", e.text) if e.text is not None else ("messages", e.messages) for e in examples]


@pytest.mark.parametrize("suffix,fmt", MATRIX, ids=[f"{s[1:]}-{f}" for s, f in MATRIX])
def test_every_file_type_and_format_is_normalised(tmp_path, suffix, fmt):
    """Each supported file type x record format reads to exactly the normalised messages/text."""
    records, expected = RECORDS[fmt]
    path = write_records(tmp_path / f"train{suffix}", records)
    examples, report = read_examples(path)
    assert as_pairs(examples) == expected
    assert report.format == fmt
    assert (report.total, report.valid, report.bad) == (len(records), len(records), [])
    for e in examples:  # a chat example is never also a text example, and vice versa
        assert (e.text is None) == bool(e.messages)


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_explicit_format_gives_the_same_result_as_auto(tmp_path, fmt):
    records, expected = RECORDS[fmt]
    path = write_records(tmp_path / "train.jsonl", records)
    examples, report = read_examples(path, fmt=fmt)
    assert as_pairs(examples) == expected
    assert report.format == fmt


def test_line_numbers_are_one_based_and_skip_nothing(tmp_path):
    """Example.line is the editor line (blank lines still count); .json uses the array index."""
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n", "utf-8")
    assert [e.line for e in read_examples(p)[0]] == [1, 3]
    p = write_records(tmp_path / "t.json", [{"text": "a"}, {"text": "b"}])
    assert [e.line for e in read_examples(p)[0]] == [1, 2]
    p = write_records(tmp_path / "t.csv", [{"text": "a"}, {"text": "b"}])
    assert [e.line for e in read_examples(p)[0]] == [2, 3]  # line 1 is the header


def test_utf8_bom_and_uppercase_suffix_are_accepted(tmp_path):
    """Windows editors write a BOM; file names like TRAIN.JSONL happen."""
    p = tmp_path / "TRAIN.JSONL"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"context": "c", "target": "t"}).encode() + b"\n")
    ex, report = read_examples(p)
    assert ex[0].messages == [U("c"), A("t")] and report.format == "context_target"


def test_txt_unescapes_newlines_and_keeps_inner_spacing(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("  问：你好\\n答：好  \n\n   \nsecond\n", "utf-8")
    ex, report = read_examples(p)
    assert [e.text for e in ex] == ["  问：你好\n答：好  ", "second"]
    assert [e.line for e in ex] == [1, 4]
    assert report.total == 2


# ---- detect_format / to_example ----------------------------------------------------------------


@pytest.mark.parametrize(
    "rec,fmt",
    [
        ({"context": "c", "target": "t"}, "context_target"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"text": "x"}, "text"),
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"context": "c", "target": "t", "text": "x"}, "context_target"),
        ({"context": "c"}, "context_target"),  # answer fields may be absent (prediction inputs)
        ({"instruction": "i"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, None),
        ({"target": "t"}, None),
        ({}, None),
    ],
)
def test_detect_format(rec, fmt):
    assert detect_format(rec) == fmt


def test_to_example_properties_and_normalisation():
    ex = to_example(
        {
            "messages": [
                {"role": "System", "content": "s"},
                {"role": "USER", "content": "q"},
                {"role": "Assistant", "content": "a"},
            ]
        },
        "messages",
        line=7,
    )
    assert ex.messages == [S("s"), U("q"), A("a")] and ex.line == 7
    assert ex.prompt_messages == [S("s"), U("q")] and ex.answer == "a"
    ex = to_example({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": 42}]}, "sharegpt")
    assert ex.messages == [U("q"), A("42")]
    ex = to_example({"context": "c", "target": 3.5}, "context_target")
    assert ex.messages == [U("c"), A("3.5")]
    text = to_example({"text": "t"}, "text")
    assert text.text == "t" and text.messages == [] and text.answer == "" and text.prompt_messages == []


@pytest.mark.parametrize(
    "rec,fmt,reason",
    [
        (ValueError("bad JSON"), "context_target", "bad JSON"),
        ([1, 2], "context_target", "not an object"),
        ({"context": "c"}, "context_target", "target"),
        ({"context": "c", "target": "  \n"}, "context_target", "empty answer"),
        ({"context": " ", "target": "t"}, "context_target", "empty prompt"),
        ({"context": ["c"], "target": "t"}, "context_target", "not text"),
        ({"instruction": "i"}, "alpaca", "output"),
        ({"text": "   "}, "text", "empty text"),
        ({"messages": [U("q")]}, "messages", "last turn"),
        ({"messages": [U("q"), A("a"), U("again")]}, "messages", "last turn"),
        ({"messages": [U("q"), {"role": "tool", "content": "x"}]}, "messages", "unknown role"),
        ({"messages": []}, "messages", "empty conversation"),
        ({"messages": "hello"}, "messages", "empty conversation"),
        ({"messages": [{"role": "user"}, A("a")]}, "messages", "turn without"),
        (
            {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "a"}]},
            "sharegpt",
            "unknown role",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
            "sharegpt",
            "empty answer",
        ),
    ],
)
def test_to_example_rejects_with_a_reason(rec, fmt, reason):
    with pytest.raises(ValueError, match=reason):
        to_example(rec, fmt)


def test_null_assistant_content_is_rejected_not_trained_as_the_word_None():
    """OpenAI-style exports have ``"content": null`` (e.g. tool-call turns); str(None) would
    silently train the model to answer "None"."""
    with pytest.raises(ValueError):
        to_example({"messages": [U("q"), {"role": "assistant", "content": None}]}, "messages")
    with pytest.raises(ValueError):
        to_example({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]}, "sharegpt")


def test_to_example_unknown_format_is_a_user_error_naming_data_format():
    with pytest.raises(UserError, match="DATA_FORMAT"):
        to_example({"x": 1}, "parquet")


# ---- bad records in files -----------------------------------------------------------------------


def test_bad_jsonl_lines_are_skipped_and_counted_with_line_numbers(tmp_path):
    good = json.dumps({"context": "c", "target": "t"})
    lines = [
        good,  # 1
        '{"context": "c", "target": ',  # 2 bad JSON
        "",  # 3 blank: ignored, not counted
        "[1, 2]",  # 4 not an object
        json.dumps({"context": "only context"}),  # 5 missing field
        json.dumps({"context": "c", "target": "   "}),  # 6 empty answer
        good,  # 7
        good,  # 8
    ]
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n", "utf-8")
    examples, report = read_examples(p)
    assert [e.line for e in examples] == [1, 7, 8]
    assert (report.total, report.valid) == (7, 3)
    assert [n for n, _ in report.bad] == [2, 4, 5, 6]
    reasons = dict(report.bad)
    assert "JSON" in reasons[2]
    assert "not an object" in reasons[4]
    assert "missing" in reasons[5] and "target" in reasons[5]
    assert "empty answer" in reasons[6]
    s = report.summary()
    assert "3/7" in s and "lines 2, 4, 5, 6" in s
    for r in reasons.values():
        assert r in s


def test_bad_chat_records_last_turn_and_unknown_role(tmp_path):
    recs = [
        {"messages": [U("q"), A("a")]},  # 1
        {"messages": [U("q"), A("a"), U("no answer")]},  # 2 last turn not assistant
        {"messages": [U("q"), {"role": "tool", "content": "x"}, A("a")]},  # 3 unknown role
        {"messages": [S("s"), U("q"), A("a")]},  # 4
    ]
    p = write_records(tmp_path / "chat.jsonl", recs)
    examples, report = read_examples(p)
    assert [e.line for e in examples] == [1, 4]
    assert [n for n, _ in report.bad] == [2, 3]
    assert "last turn" in report.bad[0][1]
    assert "unknown role" in report.bad[1][1] and "tool" in report.bad[1][1]
    assert "lines 2, 3" in report.summary()


def test_bad_json_array_entries_use_the_index_as_line(tmp_path):
    p = write_records(tmp_path / "d.json", [{"text": "a"}, "oops", {"text": ""}, {"text": "b"}])
    examples, report = read_examples(p)
    assert [e.text for e in examples] == ["a", "b"]
    assert [n for n, _ in report.bad] == [2, 3]


def test_bad_csv_rows_report_file_line_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("context,target\nc1,t1\nc2,\nc3,t3,extra\nc4,t4\n", "utf-8")
    examples, report = read_examples(p)
    assert [e.messages for e in examples] == [[U("c1"), A("t1")], [U("c4"), A("t4")]]
    assert [n for n, _ in report.bad] == [3, 4]
    assert "empty answer" in report.bad[0][1] and "column" in report.bad[1][1].lower()


def test_bad_first_line_does_not_break_format_detection(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("not json\n" + json.dumps({"instruction": "i", "output": "o"}) + "\n", "utf-8")
    examples, report = read_examples(p)
    assert report.format == "alpaca" and examples[0].messages == [U("i"), A("o")]
    assert report.bad == [(1, report.bad[0][1])] and "JSON" in report.bad[0][1]


def test_summary_without_bad_records_lists_no_lines():
    r = LoadReport("x.jsonl", "text", total=5)
    assert r.summary() == "x.jsonl: 5/5 valid records (text)"
    r = LoadReport("x.jsonl", "text", total=12)
    for i in range(1, 11):
        r.skip(i, "bad JSON")
    s = r.summary()
    assert "2/12" in s and "10 bad JSON" in s and "lines 1, 2, 3, 4, 5, 6, 7, 8…" in s and ", 9" not in s


# ---- file-level errors ------------------------------------------------------------------------


def test_all_bad_file_is_a_user_error_naming_the_setting(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("{oops\n" + json.dumps({"context": "c", "target": ""}) + "\n", "utf-8")
    with pytest.raises(UserError, match="DATA_PATH") as ei:
        read_examples(p)
    assert "no valid records" in str(ei.value)
    with pytest.raises(UserError, match="VAL_PATH"):
        read_examples(p, setting="VAL_PATH")


def _three_bad_of_ten(tmp_path) -> Path:
    recs = [{"context": "c", "target": "t"}] * 7 + [{"context": "c", "target": ""}] * 3
    return write_records(tmp_path / "train.jsonl", recs)


def test_bad_ratio_above_max_is_a_user_error_naming_max_bad_ratio(tmp_path):
    p = _three_bad_of_ten(tmp_path)
    with pytest.raises(UserError, match="MAX_BAD_RATIO") as ei:
        read_examples(p, max_bad_ratio=0.2)
    assert "DATA_PATH" in str(ei.value) and "3 of 10" in str(ei.value)


def test_bad_ratio_at_or_below_max_is_accepted(tmp_path):
    p = _three_bad_of_ten(tmp_path)
    examples, report = read_examples(p, max_bad_ratio=0.3)
    assert len(examples) == 7 and len(report.bad) == 3
    assert len(read_examples(p)[0]) == 7  # the function's default tolerates any ratio


@pytest.mark.parametrize("setting", ["DATA_PATH", "VAL_PATH"])
def test_missing_file_names_the_setting_and_suggests_make_data(tmp_path, setting):
    with pytest.raises(UserError) as ei:
        read_examples(tmp_path / "data" / "train.jsonl", setting=setting)
    msg = str(ei.value)
    assert f"{setting}=" in msg and "make data" in msg


def test_missing_relative_data_file_is_not_mistaken_for_a_hub_dataset(tmp_path, monkeypatch):
    """``data/train.jsonl`` looks like ``owner/name`` but is a file the user forgot to create."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as ei:
        read_examples("data/train.jsonl")
    assert "DATA_PATH=data/train.jsonl" in str(ei.value) and "make data" in str(ei.value)
    assert "hub" not in str(ei.value)


def test_directory_without_data_shards_is_a_user_error(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match=r"DATA_PATH=.* is a directory with no \.jsonl/\.json/\.parquet/\.csv files"):
        read_examples(tmp_path)


def _write_unsupported(p: Path) -> Path:
    p = p / "train.xlsx"
    p.write_text("whatever", "utf-8")
    return p


def _write_json_object(p: Path) -> Path:
    p = p / "train.json"
    p.write_text(json.dumps({"data": [{"context": "c", "target": "t"}]}), "utf-8")
    return p


def _write_json_lines_as_json(p: Path) -> Path:  # a .jsonl saved as .json: invalid JSON
    p = p / "train.json"
    p.write_text(
        json.dumps({"context": "c", "target": "t"}) + "\n" + json.dumps({"context": "d", "target": "u"}), "utf-8"
    )
    return p


def _write_unknown_fields(p: Path) -> Path:
    return write_records(p / "train.jsonl", [{"prompt": "p", "completion": "c"}])


FILE_ERRORS = {
    "unsupported-suffix": (_write_unsupported, ".xlsx"),
    "json-not-array": (_write_json_object, "array"),
    "json-invalid": (_write_json_lines_as_json, ".jsonl"),
    "unknown-fields": (_write_unknown_fields, "DATA_FORMAT"),
}


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_file_level_problems_are_user_errors(tmp_path, case):
    write, hint = FILE_ERRORS[case]
    with pytest.raises(UserError) as ei:
        read_examples(write(tmp_path))
    assert hint in str(ei.value)


@pytest.mark.parametrize("setting", ["DATA_PATH", "VAL_PATH"])
@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_file_level_problems_name_the_setting(tmp_path, case, setting):
    """errors.UserError's contract: the message names the setting the user must fix (a bad
    VAL_PATH file must not be blamed on DATA_PATH)."""
    write, _ = FILE_ERRORS[case]
    with pytest.raises(UserError) as ei:
        read_examples(write(tmp_path), setting=setting)
    assert f"{setting}=" in str(ei.value)


def test_non_utf8_file_is_a_user_error_not_a_traceback(tmp_path):
    """Excel on a Chinese Windows saves CSV as GBK: the run must stop with one clear line."""
    p = tmp_path / "train.csv"
    p.write_bytes("context,target\n你好,世界\n".encode("gbk"))
    with pytest.raises(UserError, match="DATA_PATH"):
        read_examples(p)


@pytest.fixture
def hub_state(monkeypatch):
    """Let the app's own offline detection run for real, then undo the process-wide switches it
    flips (env var and library constants) so later tests see the original state."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE") or "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)


class _AskedAgain(BaseException):  # not an Exception: no retry loop or `except Exception` swallows it
    pass


def test_unknown_hub_dataset_is_a_user_error_naming_data_path(hub_state, tmp_path, monkeypatch):
    """Without network it must fail fast with one line, not retry with back-off for a minute.

    Counted, not timed: the hub's host does not resolve (as in an offline container, on any machine),
    and after that one failed lookup nothing may ask for it again; retrying would look it up again
    (huggingface_hub's back-off makes ~9 lookups in ~25 s), which fails the test at the second lookup."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # so the name can't resolve to a local path
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online by configuration: only the missing network stops it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        if len(lookups) > 1:
            raise _AskedAgain(f"{host} looked up again after it did not resolve: {lookups}")
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(UserError) as ei:
        read_examples("nobody/no-such-dataset-xyz")
    assert len(lookups) == 1  # the one reachability probe, then the local cache only
    msg = str(ei.value)
    assert "DATA_PATH=nobody/no-such-dataset-xyz" in msg and "\n" not in msg


# ---- the real data ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_dir(real_data_dir):  # conftest: skips where ../shared is absent, fails under REQUIRE_REAL_DATA=1
    return real_data_dir


@pytest.mark.parametrize("name,n", [("train.jsonl", 902), ("dev.jsonl", 122)])
def test_real_duie_data_reads_completely(real_dir, name, n):
    path = real_dir / name
    n_lines = sum(1 for line in path.read_text("utf-8").splitlines() if line.strip())
    examples, report = read_examples(path, max_bad_ratio=0.0)
    assert n_lines == n
    assert (report.format, report.total, report.valid, report.bad) == ("context_target", n, n, [])
    first = json.loads(path.read_text("utf-8").splitlines()[0])
    assert examples[0].messages == [U(first["context"]), A(first["target"])]
    assert all(
        len(e.messages) == 2 and e.prompt_messages[0]["content"].endswith("\nAnswer: ") and e.answer.strip()
        for e in examples
    )
