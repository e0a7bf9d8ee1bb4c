"""Turn Examples into token ids with loss only on the answers.

The prompt is rendered with the tokenizer's chat template (when it has one) and the answer
is tokenised separately and followed by EOS, as the ChatGLM tutorials do: the label tokens
decode to exactly ``answer + eos``. Prompt tokens get label -100.

Over-long samples are never silently dropped: the prompt loses its middle first (the
instruction at its head and the assistant marker at its tail both survive), and only if the
answer alone cannot fit is the answer's end cut. Both cases are counted and reported.
Preference pairs and KTO records (encode_pair) keep the prompt and each answer apart, cut the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from app.data.records import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE = -100
# Markers that separate prompt from answer in pre-formatted {text} records.
ANSWER_MARKERS = ("### 回答:", "### 回答：", "### Response:", "### Answer:", "\nAnswer:", "答：")
_MIN_PROMPT = 16  # keep at least this much prompt when the answer is huge


@dataclass
class EncodeStats:
    samples: int = 0
    tokens: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0
    lengths: list[int] = field(default_factory=list)

    def summary(self, max_seq_len: int) -> str:
        s = f"{self.samples} samples, {self.tokens} tokens (mean {self.tokens / max(1, self.samples):.0f}/sample)"
        if self.prompt_truncated or self.answer_truncated:
            s += (
                f"; over MAX_SEQ_LEN={max_seq_len}: {self.prompt_truncated} prompts shortened, "
                f"{self.answer_truncated} answers cut (raise MAX_SEQ_LEN to keep them whole)"
            )
        return s


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool) -> str:
    # tokenize=False: the text (the stubs' return type covers every mode)
    return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """What the model sees before it answers (used by training and by predict alike)."""
    if getattr(tokenizer, "chat_template", None):
        return _render(tokenizer, messages, gen=True)
    # Base models without a template: plain turns, the same shape the training data gets.
    return "".join(m["content"] + "\n" for m in messages)


def segments(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces whose concatenation is the full training text (minus EOS)."""
    if example.text is not None:
        for marker in ANSWER_MARKERS:
            i = example.text.find(marker)
            if i >= 0 and example.text[i + len(marker) :].strip():
                cut = i + len(marker)
                return [(example.text[:cut], False), (example.text[cut:], True)]
        return [(example.text, True)]
    msgs = example.messages
    if not getattr(tokenizer, "chat_template", None):
        return [(prompt_text(tokenizer, msgs[:-1]), False), (msgs[-1]["content"], True)]
    eos = tokenizer.eos_token or ""
    out: list[tuple[str, bool]] = []
    done = ""  # rendered text consumed so far
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, msgs[:i], gen=True)
        if not prefix.startswith(done):
            # The template rewrites history (e.g. strips reasoning): train on the last answer only.
            return [(_render(tokenizer, msgs[:-1], gen=True), False), (msgs[-1]["content"], True)]
        out += [(prefix[len(done) :], False), (m["content"], True)]
        done = prefix + m["content"]
        if eos and _render(tokenizer, msgs[: i + 1], gen=False).startswith(done + eos):
            done += eos  # the template writes EOS itself; we add it as a label token below
    return out


def encode(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, stats: EncodeStats | None = None
) -> dict[str, list[int]]:
    """input_ids / labels for one example, truncated to max_seq_len as the module doc says."""
    ids: list[int] = []
    labels: list[int] = []
    for toks, is_answer in _pieces(segments(example, tokenizer), tokenizer):
        ids += toks
        labels += toks if is_answer else [IGNORE] * len(toks)
    if len(ids) > max_seq_len:
        ids, labels, which = _truncate(ids, labels, max_seq_len)
        if stats is not None:
            setattr(stats, which, getattr(stats, which) + 1)
    if stats is not None:
        stats.samples += 1
        stats.tokens += len(ids)
        stats.lengths.append(len(ids))
    return {"input_ids": ids, "labels": labels}


def _pieces(parts: list[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], bool]]:
    """Each segment's token ids, tokenized on its own; an answer is followed by EOS."""
    eos_id = tokenizer.eos_token_id
    out = []
    for text, is_answer in parts:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        out.append((toks + [eos_id] if is_answer and eos_id is not None else toks, is_answer))
    return out


def _truncate(ids: list[int], labels: list[int], limit: int) -> tuple[list[int], list[int], str]:
    # Index where the final answer starts: everything before is prompt/history.
    last_prompt = max((i for i, lab in enumerate(labels) if lab == IGNORE), default=-1)
    p_len = last_prompt + 1
    a_len = len(ids) - p_len
    keep_prompt = min(p_len, _MIN_PROMPT)
    if a_len + keep_prompt <= limit:
        budget = limit - a_len
        head = budget // 2
        tail = budget - head
        keep = list(range(head)) + list(range(p_len - tail, len(ids)))
        which = "prompt_truncated"
    else:
        head = keep_prompt // 2
        keep = (
            list(range(head))
            + list(range(p_len - (keep_prompt - head), p_len))
            + list(range(p_len, p_len + limit - keep_prompt))
        )
        which = "answer_truncated"
    return [ids[i] for i in keep], [labels[i] for i in keep], which


def encode_all(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> tuple[list[dict], EncodeStats]:
    stats = EncodeStats()
    rows = []
    for ex in examples:
        row = encode(ex, tokenizer, max_seq_len, stats)
        if any(lab != IGNORE for lab in row["labels"]):
            rows.append(row)
    return rows, stats


def encode_pair(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, stats: EncodeStats | None = None
) -> dict[str, Any]:
    """A preference pair as {prompt_ids, chosen_ids, rejected_ids}; a KTO record as {prompt_ids, completion_ids,
    label}.

    The prompt is what encode() puts before the final answer (earlier turns, their answers and EOS included) and
    each answer is tokenized on its own plus EOS, so prompt_ids + chosen_ids is encode()'s input_ids for the
    chosen conversation. Over max_seq_len, the prompt and the longer answer are cut as encode() cuts one sample
    (the prompt's middle first); the answers keep their starts."""
    if example.kind == "sft":
        raise ValueError(f"line {example.line}: not a preference pair or KTO record")
    *head, (answer, _) = _pieces(segments(example, tokenizer), tokenizer)
    prompt = [t for toks, _ in head for t in toks]
    answers = [answer]
    if example.kind == "pair":
        assert example.rejected is not None  # a pair is read with both answers (app.data.preference_records)
        answers.append(_pieces([(example.rejected, True)], tokenizer)[0][0])
    longest = max(len(a) for a in answers)
    if len(prompt) + longest > max_seq_len:
        ids, labels, which = _truncate(prompt + [0] * longest, [IGNORE] * len(prompt) + [0] * longest, max_seq_len)
        prompt = [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE]
        answers = [a[: len(ids) - len(prompt)] for a in answers]
        if stats is not None:
            setattr(stats, which, getattr(stats, which) + 1)
    if stats is not None:
        stats.samples += 1
        stats.tokens += len(prompt) + sum(len(a) for a in answers)
        stats.lengths.append(len(prompt) + max(len(a) for a in answers))  # what one forward pass holds
    if example.kind == "pair":
        return {"prompt_ids": prompt, "chosen_ids": answers[0], "rejected_ids": answers[1]}
    return {"prompt_ids": prompt, "completion_ids": answers[0], "label": example.label}


def encode_pairs(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> tuple[list[dict], EncodeStats]:
    """encode_pair for each record, as encode_all does for SFT (a record whose answers left no token is dropped)."""
    stats = EncodeStats()
    rows = []
    for ex in examples:
        row = encode_pair(ex, tokenizer, max_seq_len, stats)
        if all(v for k, v in row.items() if k.endswith("_ids") and k != "prompt_ids"):
            rows.append(row)
    return rows, stats


class Collator:
    """Pad a batch to its own longest sample (never to MAX_SEQ_LEN: real data is mostly short)."""

    def __init__(self, pad_id: int, multiple_of: int = 8):
        self.pad_id, self.multiple_of = pad_id, multiple_of

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        n = -(-n // self.multiple_of) * self.multiple_of
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackingCollator:
    """Concatenate a micro-batch's samples into a few rows with no padding between them (PACKING=on).

    The samples of one micro-batch are spread over ``ceil(tokens / row_len)`` rows (longest first
    into the shortest row, so the rows come out nearly equal and only their tails are padded), or
    all go into one row when ``row_len`` is 0 (no tails at all; for ``packed_sdpa``, whose cost
    does not grow with the row).
    ``position_ids`` restart at 0 for every sample and no ``attention_mask`` is passed: from the
    restarts transformers builds a block-diagonal causal mask (``find_packed_sequence_indices``),
    so a sample attends only to itself and sees the positions it would see alone. Each sample keeps
    its own label mask; its first label is cleared so the previous sample's last token is never
    trained to predict it (unpacked, that label is dropped by the shift anyway). The padded tail
    of a row is one more "sample" of pad tokens without labels.

    The loss is the same token-weighted mean over the same samples as with ``Collator``: the
    micro-batch (and so every optimizer step) holds exactly the samples it would hold unpacked.
    ``label_logits_only`` also asks the model for logits only where a label follows
    (``logits_to_keep`` as a boolean mask, targets as ``shift_labels``): prompt positions skip
    the vocabulary projection and its float32 cross-entropy, which change nothing in the loss.
    ``num_tokens`` (the real tokens, for throughput) is popped before the model sees the batch;
    ``packed_seq_lens`` (each row's sample lengths, its tail last) travels on to the attention, where
    ``packed_sdpa`` (app/training/kernels.py) uses it and every other implementation ignores it.
    """

    def __init__(self, pad_id: int, row_len: int, multiple_of: int = 8, label_logits_only: bool = True):
        self.pad_id, self.row_len, self.multiple_of = pad_id, row_len, multiple_of
        self.label_logits_only = label_logits_only

    def rows_for(self, lengths: list[int]) -> list[list[int]]:
        """Sample indices per row: the fewest rows of at most ``row_len`` tokens, balanced
        (``row_len`` 0: one row, for attention that runs per sample anyway)."""
        if self.row_len <= 0:
            return [list(range(len(lengths)))]
        cap = max(self.row_len, max(lengths))
        n = max(1, -(-sum(lengths) // cap))
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        while True:
            bins: list[list[int]] = [[] for _ in range(n)]
            sums = [0] * n
            for i in order:
                b = min(range(n), key=lambda j: (sums[j], j))
                bins[b].append(i)
                sums[b] += lengths[i]
            if max(sums) <= cap:
                return [sorted(b) for b in bins if b]
            n += 1

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        packs = self.rows_for([len(r["input_ids"]) for r in rows])
        width = max(sum(len(rows[i]["input_ids"]) for i in p) for p in packs)
        width = -(-width // self.multiple_of) * self.multiple_of
        ids = torch.full((len(packs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(packs), width), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(packs), width), dtype=torch.long)
        seq_lens: list[list[int]] = []
        for r, pack in enumerate(packs):
            at, seq_lens_r = 0, []
            for i in pack:
                k = len(rows[i]["input_ids"])
                ids[r, at : at + k] = torch.tensor(rows[i]["input_ids"])
                labels[r, at + 1 : at + k] = torch.tensor(rows[i]["labels"][1:])
                pos[r, at : at + k] = torch.arange(k)
                at += k
                seq_lens_r.append(k)
            pos[r, at:] = torch.arange(width - at)  # the padded tail: its own label-free "sample"
            seq_lens.append(seq_lens_r + ([width - at] if width > at else []))
        batch = {
            "input_ids": ids,
            "labels": labels,
            "position_ids": pos,
            "packed_seq_lens": seq_lens,
            "num_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows)),
        }
        if self.label_logits_only:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != IGNORE
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = labels[:, 1:][keep[:, :-1]]
        return batch
