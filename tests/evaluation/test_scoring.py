"""Tests for app.evaluation.scoring: tolerant answer parsing, exact P/R/F1 arithmetic, reports, file input;
free-text answers' exact match, ROUGE-L and BLEU-4 (app.evaluation.textmetrics), and which a file gets."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest

from app.core.errors import UserError
from app.core.ownership import MARKER
from app.evaluation.reports import write_reports
from app.evaluation.scoring import Triplet, answers_are_triplets, normalize, parse_answer, score, score_file
from app.evaluation.textmetrics import bleu4, rouge_l, tokens

KEYS = ("predicate", "object_type", "subject_type", "object", "subject")


def trip(s: str, p: str, o: str, st: str = "人物", ot: str = "人物") -> dict[str, str]:
    return dict(zip(KEYS, (p, ot, st, o, s), strict=True))


def fenced(triplets: list[dict]) -> str:
    """Exactly the real dataset's target layout."""
    return "```json\n" + json.dumps(triplets, ensure_ascii=False) + "\n```"


GOLD4 = [
    trip("花样男子", "编剧", "神尾叶子", "影视作品"),
    trip("花样男子", "出版社", "集英社", "书籍", "出版社"),
    trip("古刹钟声", "导演", "朱文顺", "影视作品"),
    trip("古刹钟声", "主演", "庞学勤", "影视作品"),
]


def prf(report) -> tuple[float, float, float]:
    return report.triplet_precision, report.triplet_recall, report.triplet_f1


# ---- real data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_records(real_data_dir) -> list[dict]:
    path = real_data_dir / "dev.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_gold_against_itself_scores_perfectly(dev_records):
    # Independent count: triplet targets are fenced, classification targets are bare lists.
    n_fenced = sum(r["target"].lstrip().startswith("```") for r in dev_records)
    rep = score((r["target"], r["target"]) for r in dev_records)
    assert rep.n_samples == len(dev_records) == 122
    assert rep.n_bad_gold == 0
    assert rep.n_triplet_samples == n_fenced > 0
    assert rep.n_classification_samples == 122 - n_fenced > 0
    assert (rep.triplet_f1, rep.triplet_f1_typed, rep.classification_accuracy, rep.json_valid_rate) == (1, 1, 1, 1)
    assert rep.fp == rep.fn == 0 and rep.tp == sum(m["support"] for m in rep.per_predicate.values())
    assert all(m["f1"] == 1.0 for m in rep.per_predicate.values())


def test_every_real_model_failure_lowers_the_score(dev_records):
    # Answering every triplet sample with a label must not score well: guards against a no-op scorer.
    rep = score((r["target"], '["平板"]') for r in dev_records)
    assert rep.triplet_f1 == 0.0 and rep.fn > 0
    assert 0 < rep.classification_accuracy < 1


# ---- exact arithmetic on hand-built perturbations -----------------------------------------


def one(pred: list[dict], gold: list[dict] = GOLD4):
    return score([(fenced(gold), fenced(pred))])


def test_drop_one_of_four():
    rep = one(GOLD4[:3])
    assert prf(rep) == pytest.approx((1.0, 0.75, 6 / 7))
    assert [t["object"] for t in rep.rows[0]["missing"]] == ["庞学勤"] and rep.rows[0]["spurious"] == []


def test_add_one_spurious():
    rep = one(GOLD4 + [trip("古刹钟声", "主演", "田烈", "影视作品")])
    assert prf(rep) == pytest.approx((0.8, 1.0, 8 / 9))
    assert [t["object"] for t in rep.rows[0]["spurious"]] == ["田烈"]
    assert rep.per_predicate["主演"] == pytest.approx(
        {"tp": 1, "fp": 1, "fn": 0, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )


def test_change_one_object():
    rep = one(GOLD4[:3] + [trip("古刹钟声", "主演", "浦克", "影视作品")])
    assert prf(rep) == pytest.approx((0.75, 0.75, 0.75))
    assert (rep.tp, rep.fp, rep.fn) == (3, 1, 1)


def test_type_change_only_hurts_typed_f1():
    rep = one(GOLD4[:3] + [trip("古刹钟声", "主演", "庞学勤", "电影")])
    assert prf(rep) == (1.0, 1.0, 1.0)
    assert rep.triplet_f1_typed == pytest.approx(0.75)


def test_swapped_subject_and_object_is_wrong():
    swapped = [trip(t["object"], t["predicate"], t["subject"], t["subject_type"], t["object_type"]) for t in GOLD4]
    rep = one(swapped[:1] + GOLD4[1:])
    assert prf(rep) == pytest.approx((0.75, 0.75, 0.75))


def test_full_width_and_spaces_still_match():
    gold = [trip("B站2020", "作者", "ABC 出版", "网站")]
    pred = [trip("Ｂ站２０２０ ", "作者", "  ＡＢＣ \t 出版", "网站")]
    assert prf(one(pred, gold)) == (1.0, 1.0, 1.0)
    assert Triplet("Ｘ１", "p", "a  b").subject == "X1"


# What normalize() claims to fold: NFKC turns the full-width ASCII block (U+FF01-U+FF5E) and the
# ideographic space into their half-width forms; whitespace is stripped and collapsed. Letter case is
# kept (matching is exact after that, as the README says), and CJK punctuation with no half-width
# form (、。《》) stays as it is.
FOLDS = [
    ("（１９９８）", "(1998)"),
    ("甲，乙", "甲,乙"),
    ("比分：２：１", "比分:2:1"),
    ("ＡＢＣ ｘｙｚ", "ABC xyz"),
    ("！？；［］｛｝＂＇", "!?;[]{}\"'"),
    ("＋－＊／＝＜＞％＆＃＠", "+-*/=<>%&#@"),
    ("张\u3000三", "张 三"),
    (" a \t\n b\u3000", "a b"),
    ("Ｎｕｍｂｅｒ", "Number"),
]


@pytest.mark.parametrize("variant, canonical", FOLDS)
def test_normalize_folds_full_width_and_whitespace(variant, canonical):
    assert normalize(variant) == canonical


def test_normalize_keeps_case_and_cjk_punctuation():
    assert (normalize("number"), normalize("Ｎumber"), normalize("ｎｕｍｂｅｒ")) == ("number", "Number", "number")
    assert normalize("《书》、。") == "《书》、。"


FIELDS = ("subject", "predicate", "object", "subject_type", "object_type")
CANON = {
    "subject": "花样男子(1998)",
    "predicate": "出版社:ABC",
    "object": "集英社,东京",
    "subject_type": "Text",
    "object_type": "Number",
}
VARIANT = {
    "subject": " 花样男子（１９９８） ",
    "predicate": "出版社：ＡＢＣ\u3000",
    "object": "\t集英社，东京  ",
    "subject_type": "\u3000Ｔｅｘｔ",
    "object_type": "Ｎｕｍｂｅｒ \n",
}


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_is_normalized_before_matching(field):
    # Only one field carries the full-width / whitespace variant; the match must still be exact and typed.
    rep = score([(fenced([CANON]), fenced([{**CANON, field: VARIANT[field]}]))])
    assert prf(rep) == (1.0, 1.0, 1.0) and rep.triplet_f1_typed == 1.0
    assert rep.rows[0]["parsed"] == [CANON]  # reported in the normalized form
    assert list(rep.per_predicate) == ["出版社:ABC"]
    # and the normalization is what makes it match: a real difference in that field still counts
    other = score([(fenced([CANON]), fenced([{**CANON, field: CANON[field] + "x"}]))])
    assert other.triplet_f1_typed == 0.0


@pytest.mark.parametrize("field", FIELDS)
def test_case_still_matters_in_every_field(field):
    # Exact matching after NFKC: a different letter case is a different string (even full-width).
    lower = score([(fenced([CANON]), fenced([{**CANON, field: VARIANT[field].lower()}]))])
    changed = field in ("predicate", "subject_type", "object_type")  # the fields with letters in them
    assert lower.triplet_f1_typed == (0.0 if changed else 1.0)


def test_duplicates_count_once_and_micro_average_across_samples():
    dup = score(
        [
            (fenced(GOLD4[:2]), fenced([GOLD4[0], GOLD4[0]])),  # tp 1, fn 1
            (fenced(GOLD4[2:]), fenced(GOLD4[2:] + [trip("x", "主演", "y")])),
        ]
    )  # tp 2, fp 1
    assert (dup.tp, dup.fp, dup.fn) == (3, 1, 1)
    p, r = Fraction(3, 4), Fraction(3, 4)
    assert prf(dup) == pytest.approx((float(p), float(r), float(2 * p * r / (p + r))))


def test_broken_output_scores_zero_but_labels_are_compared_as_sets():
    rep = score(
        [
            (fenced(GOLD4), "我不知道"),
            ('["平板"]', '```json\n["平板"]\n```'),
            ('["衣服"]', '["酒店"]'),
            ('["书籍"]', fenced(GOLD4)),
        ]
    )
    assert prf(rep) == (0.0, 0.0, 0.0) and rep.fn == 4
    assert rep.classification_accuracy == pytest.approx(1 / 3)
    assert rep.json_valid_rate == 0.75
    assert [r["label_correct"] for r in rep.rows] == [None, True, False, False]


def test_labels_compare_as_sets():
    rep = score(
        [
            ('["水果", "衣服"]', '["衣服", "水果"]'),
            ('["水果", "衣服"]', '["水果"]'),
            ('["水果"]', '["水果", "水果"]'),
            ('["水果"]', '["水果", "平板"]'),
            ('["水果"]', '[" 水果 "]'),
        ]
    )
    assert [r["label_correct"] for r in rep.rows] == [True, False, True, False, True]


def test_empty_kinds_give_zero_or_none(tmp_path):
    # Triplet metrics follow the 0/0 -> 0.0 convention; accuracy is None without label samples.
    only_labels = score([('["平板"]', '["平板"]')])
    assert prf(only_labels) == (0.0, 0.0, 0.0) and only_labels.triplet_f1_typed == 0.0
    assert write_reports(only_labels, tmp_path)["per_predicate_f1.png"].stat().st_size > 0  # placeholder chart
    assert score([(fenced(GOLD4), fenced(GOLD4))]).classification_accuracy is None


def test_malformed_gold_is_counted_not_scored():
    rep = score(
        [
            ("not json at all", fenced(GOLD4)),
            ('```json\n[{"predicate": "导演", "obj', fenced(GOLD4)),  # truncated gold
            (fenced([{"predicate": "导演"}]), fenced(GOLD4)),  # gold triplet missing keys
            (fenced(GOLD4), fenced(GOLD4)),
            (None, "x"),
        ]
    )
    assert rep.n_bad_gold == 4 and rep.n_samples == 5 and rep.n_triplet_samples == 1
    assert prf(rep) == (1.0, 1.0, 1.0)
    assert [r["bad_gold"] for r in rep.rows] == [True, True, True, False, True]


# ---- parser --------------------------------------------------------------------------

ONE = (
    '{"predicate": "导演", "object_type": "人物", "subject_type": "影视作品", '
    '"object": "朱文顺", "subject": "古刹钟声"}'
)
EXPECTED = Triplet("古刹钟声", "导演", "朱文顺", "影视作品", "人物")


@pytest.mark.parametrize(
    "text",
    [
        f"```json\n[{ONE}]\n```",
        f"```\n[{ONE}]\n```",
        f"[{ONE}]",
        f"  [{ONE}]\n以上是抽取结果。",
        f"好的，结果如下：\n```json\n[{ONE}]\n```\n希望有帮助",
        f"参考[1]：[{ONE}]",
        f"[\n  {ONE}\n]",
    ],
)
def test_parser_finds_the_list(text):
    p = parse_answer(text)
    assert (p.kind, p.triplets, p.valid_json, p.recovered) == ("triplets", [EXPECTED], True, False)


def test_half_closed_list_recovers_complete_items():
    p = parse_answer(f'```json\n[{ONE}, {ONE.replace("朱文顺", "王二")}, {{"predicate": "主')
    assert p.kind == "triplets" and not p.valid_json and p.recovered
    assert [t.object for t in p.triplets] == ["朱文顺", "王二"]
    assert parse_answer(f"[{ONE}, ").triplets == [EXPECTED]
    assert parse_answer(ONE).recovered and parse_answer(ONE).triplets == [EXPECTED]  # a dict with no list


def test_labels_empty_list_and_garbage():
    p = parse_answer('["平板"]')
    assert (p.kind, p.labels, p.valid_json) == ("labels", ["平板"], True)
    assert parse_answer('```json\n["水果", "衣服"]\n```').labels == ["水果", "衣服"]
    empty = parse_answer("[]")
    assert (empty.kind, empty.triplets, empty.valid_json) == ("triplets", [], True)
    for junk in ("", "无法回答", "[1, 2", "{not json}", "```json\n```", '["平', "[1, 2]"):
        j = parse_answer(junk)
        assert (j.kind, j.valid_json, j.recovered) == ("invalid", False, False), junk


def test_missing_keys_non_strings_and_escapes():
    text = json.dumps(
        [
            {"predicate": "身高", "subject": "张三", "object": 180, "subject_type": "人物", "object_type": "Number"},
            {"predicate": "导演", "subject": "x"},  # no object: skipped
            {"predicate": "作者", "subject": '《"引号"\\书》', "object": "李四\n"},
        ],
        ensure_ascii=False,
    )
    p = parse_answer(text)
    assert p.valid_json and p.skipped == 1
    assert p.triplets == [Triplet("张三", "身高", "180", "人物", "Number"), Triplet('《"引号"\\书》', "作者", "李四")]
    assert parse_answer('[{"subject": "a]", "predicate": "b\\"}", "object": "c"}]').triplets == [
        Triplet("a]", 'b"}', "c")
    ]


# ---- reports and files ---------------------------------------------------------------


def test_write_reports(tmp_path):
    rep = score([(fenced(GOLD4), fenced(GOLD4[1:] + [trip("a", "主演", "b")])), ('["平板"]', "乱码")])
    paths = write_reports(rep, tmp_path / "out", title="unit")
    names = {"report.json", "report.md", "predictions.jsonl", "per_predicate_f1.png"}
    assert set(paths) == names and all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())
    assert {p.name for p in (tmp_path / "out").iterdir()} == names | {MARKER}  # no temp files left behind
    assert paths["per_predicate_f1.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["report.json"].read_text(encoding="utf-8"))
    for key in (
        "triplet_precision",
        "triplet_recall",
        "triplet_f1",
        "triplet_f1_typed",
        "classification_accuracy",
        "json_valid_rate",
        "n_samples",
        "n_triplet_samples",
        "n_classification_samples",
        "n_bad_gold",
    ):
        assert key in data, key
    assert "rows" not in data and set(data["per_predicate"]["主演"]) >= {"tp", "fp", "fn", "f1", "support"}
    assert data["triplet_f1"] == pytest.approx(0.75)
    rows = [json.loads(line) for line in paths["predictions.jsonl"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and [r["index"] for r in rows] == [0, 1]
    assert (len(rows[0]["correct"]), len(rows[0]["missing"]), len(rows[0]["spurious"])) == (3, 1, 1)
    assert rows[1]["label_correct"] is False and rows[1]["valid_json"] is False
    md = paths["report.md"].read_text(encoding="utf-8")
    assert md.startswith("# unit") and md.index("| 主演 | 1 |") < md.index("| 编剧 | 1 |")  # support, then name


def test_score_file_and_bad_lines(tmp_path):
    good = tmp_path / "pred.jsonl"
    lines = [
        json.dumps({"target": fenced(GOLD4), "output": fenced(GOLD4[:3])}, ensure_ascii=False),
        "",
        json.dumps({"reference": '["平板"]', "output": '["平板"]', "line": 7}),
    ]  # predict's file-mode row
    good.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rep = score_file(good)
    assert rep.n_samples == 2 and rep.triplet_recall == 0.75 and rep.classification_accuracy == 1.0
    for bad_line in ("{oops", json.dumps({"target": "[]"}), "[1]", json.dumps({"output": "x"})):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"target": "[]", "output": "[]"}) + "\n\n" + bad_line + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=r"--predictions .*bad.jsonl: line 3: .*\"target\".*\"output\""):
            score_file(bad)
    with pytest.raises(UserError, match="--predictions"):
        score_file(tmp_path / "missing.jsonl")


# ---- free-text answers: which report, and exact match / ROUGE-L / BLEU-4 ----------------------------------


def test_real_triplet_data_is_scored_as_triplets(dev_records):
    assert answers_are_triplets(r["target"] for r in dev_records)


def test_the_report_follows_the_answers():
    assert answers_are_triplets([fenced(GOLD4), '["平板"]', fenced([])])  # triplets, a label list, none found
    assert not answers_are_triplets(["Paris is the capital of France.", "4", fenced(GOLD4)])  # 1 of 3
    assert not answers_are_triplets(["见上文[1]", '{"a": 1}', "好的"])


def test_tokens_are_cjk_characters_and_words_of_other_scripts():
    assert tokens("用Python写一个hello-world程序。") == [
        "用",
        "Python",
        "写",
        "一",
        "个",
        "hello",
        "-",
        "world",
        "程",
        "序",
        "。",
    ]
    assert tokens("  Ｈｅｌｌｏ，  it's 3.5 ") == ["Hello", ",", "it", "'", "s", "3", ".", "5"]  # NFKC first


def test_bleu4_worked_by_hand():
    # 猫坐在垫子上 / 猫坐在地上: 1-grams 4 of 5 match, 2-grams 2/4, 3-grams 1/3, 4-grams 0 of 2 -> method3's
    # 1 / (2 x 2); 5 tokens against 6: brevity penalty exp(1 - 6/5)
    assert bleu4(tokens("猫坐在垫子上"), tokens("猫坐在地上")) == pytest.approx(
        math.exp(1 - 6 / 5) * (4 / 5 * 2 / 4 * 1 / 3 * 1 / (2 * 2)) ** 0.25
    )
    # words: 5/6 (the twice), 3/5, 1/4, 4-grams 0 of 3 -> 1 / (2 x 3); equal lengths, no penalty
    assert bleu4("the cat is on the mat".split(), "the cat sat on the mat".split()) == pytest.approx(
        (5 / 6 * 3 / 5 * 1 / 4 * 1 / (2 * 3)) ** 0.25
    )
    # every order above 1 unmatched: the k-th such gets 1 / (2^k x its n-gram count)
    assert bleu4(list("abcd"), list("dcba")) == pytest.approx((1 * 1 / (2 * 3) * 1 / (4 * 2) * 1 / (8 * 1)) ** 0.25)
    # a one-token answer has no 2-, 3- or 4-grams (count 1, as nltk's): 1/2, 1/4, 1/8 even when it is right
    assert bleu4(["猫"], ["猫"]) == pytest.approx((1 / 2 * 1 / 4 * 1 / 8) ** 0.25)
    assert bleu4(list("abcde"), list("abcde")) == pytest.approx(1.0)
    assert bleu4(list("abc"), list("xyz")) == 0.0 == bleu4(list("abc"), [])  # no unigram in common: 0, unsmoothed


def test_rouge_l_worked_by_hand():
    assert rouge_l(tokens("猫坐在垫子上"), tokens("猫坐在地上")) == pytest.approx(8 / 11)  # LCS 猫坐在上: P 4/5, R 4/6
    assert rouge_l("the cat is on the mat".split(), "the cat sat on the mat".split()) == pytest.approx(5 / 6)
    assert rouge_l(list("abcd"), list("dcba")) == pytest.approx(1 / 4)  # LCS 1: P = R = 1/4
    assert rouge_l(list("abcbdab"), list("bdcaba")) == pytest.approx(2 * (4 / 6) * (4 / 7) / (4 / 6 + 4 / 7))  # LCS 4
    assert rouge_l(list("ab"), []) == 0.0 == rouge_l([], list("ab"))


def test_bleu4_equals_nltks_sentence_bleu_with_method3():
    bleu = pytest.importorskip("nltk.translate.bleu_score", reason="nltk is not installed in .venv")
    rng, smooth = random.Random(0), bleu.SmoothingFunction().method3
    for _ in range(300):
        ref = [rng.choice("abcdef") for _ in range(rng.randint(1, 15))]
        hyp = [rng.choice("abcdefg") for _ in range(rng.randint(0, 15))]
        assert bleu4(ref, hyp) == pytest.approx(float(bleu.sentence_bleu([ref], hyp, smoothing_function=smooth)))


def test_free_text_predictions_get_text_scores_not_f1(tmp_path):
    pairs = [
        ("猫坐在垫子上", "猫坐在地上"),
        ("the cat is on the mat", "the cat sat on the mat"),
        ("Ｈｅｌｌｏ  world", "Hello world "),
    ]  # equal after NFKC and whitespace
    src = tmp_path / "pred.jsonl"
    src.write_text(
        "".join(json.dumps({"target": g, "output": o}, ensure_ascii=False) + "\n" for g, o in pairs), encoding="utf-8"
    )
    rep = score_file(src)
    d = rep.to_dict()
    assert d["scored_as"] == "text" and d["n_samples"] == 3 and d["loss"] is None and "triplet_f1" not in d
    rouge = [8 / 11, 5 / 6, 1.0]
    # two equal tokens: no 3- or 4-grams, smoothed to 1/2 and 1/4 (BLEU-4 is harsh on short answers)
    bleu = [
        math.exp(-0.2) * (4 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25,
        (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25,
        (1 * 1 * 1 / 2 * 1 / 4) ** 0.25,
    ]
    assert [r["exact_match"] for r in rep.rows] == [False, False, True]
    assert [r["rouge_l"] for r in rep.rows] == pytest.approx(rouge) and [
        r["bleu_4"] for r in rep.rows
    ] == pytest.approx(bleu)
    assert (d["exact_match"], d["rouge_l"], d["bleu_4"]) == pytest.approx((1 / 3, sum(rouge) / 3, sum(bleu) / 3))
    paths = write_reports(rep, tmp_path / "out", title="text")
    assert set(paths) == {"report.json", "report.md", "predictions.jsonl"}  # no predicates: no chart
    assert {p.name for p in (tmp_path / "out").iterdir()} == set(paths) | {MARKER}
    md = paths["report.md"].read_text(encoding="utf-8")
    assert md.startswith("# text") and f"| rouge_l | {sum(rouge) / 3:.4f} |" in md and "| loss | n/a |" in md
    assert json.loads(paths["report.json"].read_text(encoding="utf-8")) == json.loads(json.dumps(d))
