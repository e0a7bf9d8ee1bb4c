"""Tests for app.data.encode on the three tiny families: loss masking, multi-turn, {text} markers,
truncation, tokenizers without a chat template, and the collator.

Expectations are built independently: the chat prompts are written out by hand per family
and the answer is tokenised here, so a wrong template, a lost EOS or a shifted mask fails.
"""

from __future__ import annotations

import copy

import pytest

from app.data.encode import IGNORE, Collator, EncodeStats, encode, encode_all, prompt_text, segments
from app.data.records import Example

S = lambda c: {"role": "system", "content": c}
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}

# Each family's chat format, written out by hand (not read from app.models.tiny): a turn, the text
# that opens the conversation, the generation prompt, and the token that ends an answer.
FAMILIES = {
    "glm": dict(
        fixture="glm_tok", bos="[gMASK]<sop>", turn="<|{role}|>\n{content}", gen="<|assistant|>\n", eos="<|endoftext|>"
    ),
    "qwen2": dict(
        fixture="qwen2_tok",
        bos="",
        turn="<|im_start|>{role}\n{content}<|im_end|>\n",
        gen="<|im_start|>assistant\n",
        eos="<|im_end|>",
    ),
    "llama": dict(
        fixture="llama_tok",
        bos="<|begin_of_text|>",
        turn="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        gen="<|start_header_id|>assistant<|end_header_id|>\n\n",
        eos="<|eot_id|>",
    ),
}


@pytest.fixture(params=list(FAMILIES))
def fam(request):
    """(family name, spec, tokenizer) for each tiny family."""
    spec = FAMILIES[request.param]
    return request.param, spec, request.getfixturevalue(spec["fixture"])


def hand_prompt(spec, messages):
    return spec["bos"] + "".join(spec["turn"].format(**m) for m in messages) + spec["gen"]


def tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def eos_id(tok, spec):
    i = tok.convert_tokens_to_ids(spec["eos"])
    assert i is not None and i != tok.unk_token_id
    return i


def labelled(row):
    return [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE]


def labelled_spans(row):
    """Contiguous runs of labelled tokens, in order."""
    spans, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"], strict=True):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def n_prompt(row):
    """Number of leading label -100 positions."""
    return next((i for i, lab in enumerate(row["labels"]) if lab != IGNORE), len(row["labels"]))


CTX = (
    "Instruction: 你现在是一个很厉害的阅读理解器，严格按照人类指令进行回答。\n"
    "Input: 句子中包含了哪些信息，输出json：\n\n"
    "《喜剧之王》是周星驰主演的电影。\nAnswer: "
)
TGT = (
    '```json\n[{"predicate": "主演", "object_type": "人物", "subject_type": "影视作品", '
    '"object": "周星驰", "subject": "喜剧之王"}]\n```'
)

SINGLE_TURN = {
    "context_target": Example(messages=[U(CTX), A(TGT)]),
    "alpaca_system": Example(messages=[S("You are terse."), U("Translate to English.\n早上好"), A("Good morning.")]),
}


# ---- masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SINGLE_TURN))
def test_only_the_answer_and_eos_are_labelled(fam, kind):
    _, spec, tok = fam
    ex = SINGLE_TURN[kind]
    prompt = hand_prompt(spec, ex.prompt_messages)
    p_ids = tokens(tok, prompt)
    a_ids = tokens(tok, ex.answer) + [eos_id(tok, spec)]

    assert prompt_text(tok, ex.prompt_messages) == prompt
    assert segments(ex, tok) == [(prompt, False), (ex.answer, True)]

    row = encode(ex, tok, 4096)
    assert row["input_ids"] == p_ids + a_ids
    assert row["labels"] == [IGNORE] * len(p_ids) + a_ids
    assert tok.decode(labelled(row)) == ex.answer + spec["eos"]
    assert tok.decode(row["input_ids"][: n_prompt(row)]) == prompt
    assert n_prompt(row) == len(p_ids)


def test_multi_turn_labels_every_assistant_answer(fam):
    """Both answers (each + EOS) are trained on; system and user text never are, and the
    training text is exactly what the chat template would render (no doubled EOS)."""
    name, spec, tok = fam
    msgs = [
        S("你是抽取助手。"),
        U("第一句：周星驰主演《喜剧之王》。"),
        A("[周星驰, 主演, 喜剧之王]"),
        U("Second: LoRA adapts large models."),
        A("[LoRA, adapts, large models]"),
    ]
    row = encode(Example(messages=msgs), tok, 4096)
    e = spec["eos"]

    spans = [tok.decode(s) for s in labelled_spans(row)]
    assert spans == [msgs[2]["content"] + e, msgs[4]["content"] + e]

    def t(m):
        return spec["turn"].format(**m)

    if name == "glm":  # GLM's template writes no EOS after an answer: training inserts it
        full = (
            spec["bos"]
            + t(msgs[0])
            + t(msgs[1])
            + spec["gen"]
            + msgs[2]["content"]
            + e
            + t(msgs[3])
            + spec["gen"]
            + msgs[4]["content"]
            + e
        )
    else:  # ChatML / Llama 3 close each answer with EOS themselves: exactly one, not two
        full = spec["bos"] + "".join(t(m) for m in msgs)
        full = full.removesuffix("\n")  # ChatML's newline after the final <|im_end|> isn't trained
    assert tok.decode(row["input_ids"]) == full

    unlabelled = tok.decode([tid for tid, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == IGNORE])
    for m in msgs[:2] + msgs[3:4]:
        assert m["content"] in unlabelled
    for m in (msgs[2], msgs[4]):
        assert m["content"] not in unlabelled


def test_template_that_rewrites_history_trains_on_the_last_answer_only(qwen2_tok):
    """A template that renders past answers differently (e.g. strips reasoning) cannot be
    split turn by turn; then only the final answer is labelled, after the full prompt."""
    tok = copy.deepcopy(qwen2_tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "<|im_start|>assistant\n[earlier]<|im_end|>\n{% else %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    msgs = [U("q1"), A("<think>x</think>a1"), U("q2"), A("a2")]
    row = encode(Example(messages=msgs), tok, 4096)
    prompt = (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n[earlier]<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert row["input_ids"] == tokens(tok, prompt) + tokens(tok, "a2") + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode(labelled(row)) == "a2<|im_end|>"


# ---- {text} records -------------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["### 回答:", "### 回答：", "### Response:", "答："])
def test_text_record_labels_only_what_follows_the_marker(fam, marker):
    _, spec, tok = fam
    head = f"### 指令:\n把下面的句子翻译成英文。\n早上好\n{marker}"
    answer = " Good morning."
    ex = Example(text=head + answer)
    assert segments(ex, tok) == [(head, False), (answer, True)]
    row = encode(ex, tok, 4096)
    h_ids, a_ids = tokens(tok, head), tokens(tok, answer) + [eos_id(tok, spec)]
    assert row["input_ids"] == h_ids + a_ids
    assert row["labels"] == [IGNORE] * len(h_ids) + a_ids
    assert tok.decode(labelled(row)) == answer + spec["eos"]
    assert tok.decode(row["input_ids"][: n_prompt(row)]) == head


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.\n第二行。",
        "### 回答:",  # a marker with nothing after it is not a split point
        "### 回答:   \n",
    ],
)
def test_text_record_without_a_usable_marker_is_all_answer(fam, text):
    _, spec, tok = fam
    row = encode(Example(text=text), tok, 4096)
    want = tokens(tok, text) + [eos_id(tok, spec)]
    assert row["input_ids"] == want and row["labels"] == want
    assert tok.decode(labelled(row)) == text + spec["eos"]


def test_text_record_ignores_the_chat_template(qwen2_tok):
    row = encode(Example(text="Question: 1+1?\nAnswer: 2"), qwen2_tok, 4096)
    assert "<|im_start|>" not in qwen2_tok.decode(row["input_ids"])
    assert qwen2_tok.decode(labelled(row)) == " 2<|im_end|>"


# ---- truncation ---------------------------------------------------------------------------------


def is_head_plus_tail(part, full, min_each):
    """part == full[:h] + full[-(len(part) - h):] for some h leaving >= min_each on each side."""
    n = len(part)
    return any(part == full[:h] + full[len(full) - (n - h) :] for h in range(min_each, n - min_each + 1))


LONG_CTX = "HEAD 抽取句子中的三元组。\nInput: " + "这是一段很长的填充文本，" * 150 + "TAIL 句子结束。\nAnswer: "


def test_long_prompt_loses_its_middle_and_keeps_the_answer(fam):
    _, spec, tok = fam
    limit = 64
    answer = '```json\n[{"a": "b"}]\n```'
    ex = Example(messages=[U(LONG_CTX), A(answer)])
    p_ids = tokens(tok, hand_prompt(spec, ex.prompt_messages))
    a_ids = tokens(tok, answer) + [eos_id(tok, spec)]
    assert len(p_ids) > 4 * limit  # really over-long

    stats = EncodeStats()
    row = encode(ex, tok, limit, stats)
    assert len(row["input_ids"]) == len(row["labels"]) == limit
    assert row["input_ids"][-len(a_ids) :] == a_ids and row["labels"][-len(a_ids) :] == a_ids
    assert tok.decode(labelled(row)) == answer + spec["eos"]
    kept = row["input_ids"][: limit - len(a_ids)]
    assert row["labels"][: len(kept)] == [IGNORE] * len(kept)
    assert is_head_plus_tail(kept, p_ids, min_each=8)
    text = tok.decode(kept)
    assert text.startswith(spec["bos"]) and "HEAD" in text  # the instruction survives
    full_prompt = hand_prompt(spec, ex.prompt_messages)
    assert text.endswith(full_prompt[full_prompt.index("TAIL") :])  # ...and so does the assistant marker
    assert (stats.samples, stats.tokens, stats.lengths) == (1, limit, [limit])
    assert (stats.prompt_truncated, stats.answer_truncated) == (1, 0)
    assert "MAX_SEQ_LEN=64" in stats.summary(limit)


def test_huge_answer_is_cut_at_its_end_and_some_prompt_survives(fam):
    _, spec, tok = fam
    limit = 64
    ctx = "Instruction: 抽取句子中的三元组，用JSON回答。\nInput: 周星驰主演《喜剧之王》。\nAnswer: "
    answer = "很长很长的答案，" * 200
    ex = Example(messages=[U(ctx), A(answer)])
    p_ids = tokens(tok, hand_prompt(spec, ex.prompt_messages))
    a_ids = tokens(tok, answer) + [eos_id(tok, spec)]
    assert len(a_ids) > 4 * limit

    stats = EncodeStats()
    row = encode(ex, tok, limit, stats)
    assert len(row["input_ids"]) == len(row["labels"]) == limit
    k = n_prompt(row)
    assert 0 < k < limit
    assert row["labels"][:k] == [IGNORE] * k and IGNORE not in row["labels"][k:]
    assert row["input_ids"][k:] == a_ids[: limit - k]  # the answer's start, in order
    assert is_head_plus_tail(row["input_ids"][:k], p_ids, min_each=1)
    assert tok.decode(row["input_ids"][:k]).endswith(spec["gen"])  # the assistant marker survives
    assert (stats.prompt_truncated, stats.answer_truncated) == (0, 1)
    assert "MAX_SEQ_LEN=64" in stats.summary(limit)


def test_text_without_marker_over_the_limit_keeps_its_start(qwen2_tok):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    stats = EncodeStats()
    row = encode(Example(text=text), qwen2_tok, 32, stats)
    assert row["input_ids"] == tokens(qwen2_tok, text)[:32] == row["labels"]
    assert stats.answer_truncated == 1


def test_exact_fit_is_not_truncated_and_one_more_token_is(qwen2_tok):
    ex = Example(messages=[U(LONG_CTX[:300]), A("ok")])
    n = len(encode(ex, qwen2_tok, 100000)["input_ids"])
    stats = EncodeStats()
    assert len(encode(ex, qwen2_tok, n, stats)["input_ids"]) == n
    assert (stats.prompt_truncated, stats.answer_truncated) == (0, 0)
    assert "MAX_SEQ_LEN" not in stats.summary(n)
    row = encode(ex, qwen2_tok, n - 1, stats)
    assert len(row["input_ids"]) == n - 1 and stats.prompt_truncated == 1
    assert qwen2_tok.decode(labelled(row)) == "ok<|im_end|>"


def test_encode_all_counts_and_keeps_order(qwen2_tok):
    exs = [
        SINGLE_TURN["context_target"],
        Example(text="x ### Response: y"),
        Example(messages=[U(LONG_CTX), A("short")]),
    ]
    full = [len(encode(e, qwen2_tok, 10**6)["input_ids"]) for e in exs]
    cap = max(full[:2])  # only the long-context example goes over
    assert full[2] > cap
    rows, stats = encode_all(exs, qwen2_tok, cap)
    assert rows == [encode(e, qwen2_tok, cap) for e in exs]
    assert stats.samples == 3 and stats.lengths == [len(r["input_ids"]) for r in rows]
    assert stats.tokens == sum(stats.lengths) and stats.prompt_truncated == 1
    s = stats.summary(cap)
    assert s.startswith(f"3 samples, {stats.tokens} tokens") and f"MAX_SEQ_LEN={cap}" in s and "1 prompts" in s


# ---- no chat template --------------------------------------------------------------------------


def test_tokenizer_without_chat_template_still_masks(fam):
    _, spec, tok = fam
    base = copy.deepcopy(tok)
    base.chat_template = None
    ex = SINGLE_TURN["context_target"]
    prompt = CTX + "\n"  # plain turns: each message's text and a newline
    assert prompt_text(base, ex.prompt_messages) == prompt
    row = encode(ex, base, 4096)
    p_ids, a_ids = tokens(base, prompt), tokens(base, TGT) + [eos_id(base, spec)]
    assert row["input_ids"] == p_ids + a_ids
    assert row["labels"] == [IGNORE] * len(p_ids) + a_ids
    assert base.decode(labelled(row)) == TGT + spec["eos"]
    assert tok.chat_template  # the session's tokenizer was not touched


# ---- Collator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths,padded", [([3, 10, 1], 16), ([8], 8), ([8, 9], 16), ([17], 24)])
def test_collator_pads_to_longest_rounded_to_8(lengths, padded):
    import torch

    rows = [
        {"input_ids": list(range(100, 100 + n)), "labels": [IGNORE] + list(range(200, 200 + n - 1))} for n in lengths
    ]
    batch = Collator(pad_id=7)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].shape == (len(rows), padded) and batch[key].dtype == torch.long
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i].tolist() == r["input_ids"] + [7] * (padded - n)
        assert batch["labels"][i].tolist() == r["labels"] + [IGNORE] * (padded - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (padded - n)


def test_collator_on_encoded_rows(llama_tok):
    rows = [encode(SINGLE_TURN[k], llama_tok, 4096) for k in SINGLE_TURN]
    batch = Collator(llama_tok.pad_token_id, multiple_of=4)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape[1] == -(-longest // 4) * 4
    assert int(batch["attention_mask"].sum()) == sum(len(r["input_ids"]) for r in rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert (batch["input_ids"][short, n:] == llama_tok.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE).all()
