"""The token cache's batched encode (app/data/encode_batch.py) is encode(), record by record: the same token ids,
label mask and answer start for 1,000 records of each format the reader takes (.jsonl and .txt), on three tiny
families, a tokenizer without a chat template and a template that rewrites history; and its batched tokenizer
call is the tokenizer's own call on each text, whatever settings the tokenizer carries."""

import copy
import json

import numpy as np
import pytest

from app.data.cache import open_or_build
from app.data.encode import ANSWER_MARKERS, IGNORE, encode, encode_all, segments
from app.data.encode_batch import encode_rows, token_lists
from app.data.records import Example, read_examples
from app.data.synthetic import generate_samples

N = 1000
# Content that tokenizes differently alone than beside its neighbours: emoji, special tokens' text, blank runs.
ODD = ["", " 🙂", "<|endoftext|>", "\n\n", "  ", "<|im_end|> 尾", "\t答："]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}
# A template that renders past answers differently (as reasoning templates do): encode() then labels the last
# answer only.
REWRITES = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "<|im_start|>assistant\n[earlier]<|im_end|>\n{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation(s, i):
    """1 to 3 turns (a system message on every third), answers with odd endings."""
    msgs = [{"role": "system", "content": "你是抽取助手。"}] if i % 3 == 0 else []
    for j in range(1 + i % 3):
        msgs += [
            {"role": "user", "content": s[i + j]["context"]},
            {"role": "assistant", "content": s[i + j]["target"] + ODD[(i + j) % len(ODD)]},
        ]
    return msgs


def record(fmt, s, i):
    context, target = s[i]["context"] + ODD[i % len(ODD)], s[i]["target"]
    if fmt == "context_target":
        return {"context": context, "target": target}
    if fmt == "alpaca":
        rec = {
            "instruction": context,
            "input": ["", "补充：" + s[i + 1]["context"][:40], "  "][i % 3],
            "output": target,
        }
        return {**rec, "system": "你是抽取助手。"} if i % 4 == 0 else rec
    if fmt == "messages":
        return {"messages": conversation(s, i)}
    if fmt == "sharegpt":
        return {"conversations": [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in conversation(s, i)]}
    head = s[i]["context"].split("\nAnswer:")[0] + ODD[(i // 7) % len(ODD)]  # without the context's own marker
    marker = (*ANSWER_MARKERS, "")[i % 7]  # no marker, or one with nothing after it: the whole text is trained on
    return {"text": head + marker + ("" if i % 5 == 0 else " " + target)}


def write(path, fmt):
    s = generate_samples(N + 3, seed=7)
    recs = [record(fmt, s, i) for i in range(N)]
    if path.suffix == ".txt":  # one record a line, its newlines written as \n
        path.write_text("".join(r["text"].replace("\n", "\\n") + "\n" for r in recs), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


@pytest.fixture(params=["glm", "qwen2", "llama", "no-template", "rewrites-history"])
def tok(request):
    if request.param in ("glm", "qwen2", "llama"):
        return request.getfixturevalue(f"{request.param}_tok")
    t = copy.deepcopy(request.getfixturevalue("glm_tok" if request.param == "no-template" else "qwen2_tok"))
    t.chat_template = None if request.param == "no-template" else REWRITES
    return t


def test_the_cache_holds_encodes_rows_for_every_record_format(tok, tmp_path):
    files = [
        ("context_target", ".jsonl"),
        ("alpaca", ".jsonl"),
        ("messages", ".jsonl"),
        ("sharegpt", ".jsonl"),
        ("text", ".jsonl"),
        ("text", ".txt"),
    ]
    for fmt, suffix in files:
        path = write(tmp_path / f"{fmt}{suffix}", fmt)
        examples, report = read_examples(path)
        assert (report.format, len(examples), report.bad_count) == (fmt, N, 0)
        cache = open_or_build(str(path), "auto", tok, str(tmp_path / "c"), 1)
        rows = [encode(ex, tok, 1 << 62) for ex in examples]
        flat = {f: cache.arrays[f][:].tolist() for f in ("ids", "mask", "offsets", "plen")}
        assert flat["ids"] == [t for r in rows for t in r["input_ids"]], path.name
        assert flat["mask"] == [int(lab != IGNORE) for r in rows for lab in r["labels"]], path.name
        assert flat["offsets"] == [0, *np.cumsum([len(r["input_ids"]) for r in rows]).tolist()], path.name
        assert flat["plen"] == [
            max((i for i, lab in enumerate(r["labels"]) if lab == IGNORE), default=-1) + 1 for r in rows
        ], path.name
        for i in range(0, N, 97):  # each row's record, read again at its byte offset
            again = cache.example(str(path), i)
            assert (again.messages, again.text) == (examples[i].messages, examples[i].text), (path.name, i)
        if fmt == "messages":  # every answer trained on, or the last only where the template rewrites history
            several = sum(len(segments(ex, tok)) > 2 for ex in examples)
            assert (several > 0) == (tok.chat_template not in (None, REWRITES)), several


def test_a_row_without_an_answer_token_is_dropped_as_encode_all_drops_it(glm_tok):
    tok = copy.deepcopy(glm_tok)
    tok.eos_token = None  # no EOS after the answer: an empty one leaves its row without a trained token
    u = {"role": "user", "content": "问题"}
    examples = [Example(messages=[u, {"role": "assistant", "content": a}]) for a in ("甲", "", "乙丙")]
    got = encode_rows(examples, tok)
    want, _ = encode_all(examples, tok, 1 << 30)
    assert got.kept.tolist() == [True, False, True] and len(want) == 2
    assert got.ids.tolist() == [t for r in want for t in r["input_ids"]]
    assert got.mask.tolist() == [int(lab != IGNORE) for r in want for lab in r["labels"]]
    assert got.lengths.tolist() == [len(r["input_ids"]) for r in want]


TEXTS = ["早上好<|endoftext|>", "", "Answer: 周星驰 <|im_end|>", " 🙂\n\n", "x" * 50]


@pytest.mark.parametrize("setting", ["none", "bos", "truncation", "padding", "split_special_tokens"])
def test_the_batched_call_is_the_tokenizers_own_call_per_text(glm_tok, setting):
    """A backend left truncating or padding (a tokenizer.json may ship so), or splitting special tokens, is what
    transformers' call changes before it tokenizes, and a BOS its post-processor adds is left out: the batched
    call must give that call's ids too."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(glm_tok)
    if setting == "bos":
        sop = tok.convert_tokens_to_ids("<sop>")
        tok.backend_tokenizer.post_processor = TemplateProcessing(single="<sop> $A", special_tokens=[("<sop>", sop)])
    elif setting == "truncation":
        tok.backend_tokenizer.enable_truncation(4)
    elif setting == "padding":
        tok.backend_tokenizer.enable_padding(length=64)
    elif setting == "split_special_tokens":
        tok.split_special_tokens = True
    got = token_lists(TEXTS, tok)
    assert got == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert got == token_lists(TEXTS, tok)  # and again, with the backend as the call left it
    assert (glm_tok.eos_token_id in got[0]) == (setting != "split_special_tokens")
