"""encode() for a chunk of records at once, for the token cache (app/data/cache_build.py).

Why: the cache tokenizes whole files (gigabytes), and per record, encode() spends about as long around the
tokenizer (a call per segment, Python lists per token) as in it. Here every record's segments are made as
encode() makes them (app/data/encode.segments), all segments of the chunk are tokenized in one batched call,
each on its own as encode() does, and the rows come back as flat numpy arrays built from the segments'
lengths: the same ids, label mask and answer start as encode() gives for each record, at about the
tokenizer's own batched speed (the chat template's rendering is most of the rest). tests/data/test_encode_batch.py
compares them with encode() on every record format and several tokenizer families.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.data.encode import segments
from app.data.records import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class EncodedRows:
    """The rows of a chunk that hold an answer token (encode_all drops the others), as flat arrays."""

    ids: Any  # int32: the kept rows' tokens, one after another
    mask: Any  # uint8 per token: 1 = trained on (encode()'s label is the token), 0 = label -100
    lengths: Any  # int64 per kept row
    plen: Any  # int32 per kept row: the index after its last prompt token (0: none)
    kept: Any  # bool per example given: whether its row is here


def encode_rows(examples: list[Example], tokenizer: PreTrainedTokenizerBase) -> EncodedRows:
    """encode(example, tokenizer, no limit) of each example, whole (the cache cuts to MAX_SEQ_LEN on read)."""
    import numpy as np

    parts = [segments(ex, tokenizer) for ex in examples]
    toks = iter(token_lists([text for p in parts for text, _ in p if text], tokenizer))
    eos = tokenizer.eos_token_id
    flat: list[Any] = []  # each segment's tokens, and EOS after an answer's, in order
    lens, answer, owner = [], [], []
    for row, pieces in enumerate(parts):
        for text, is_answer in pieces:
            t = next(toks) if text else []
            flat.append(t)
            n = len(t)
            if is_answer and eos is not None:
                flat.append((eos,))
                n += 1
            lens.append(n)
            answer.append(is_answer)
            owner.append(row)
    return _rows(
        flat,
        np.array(lens, dtype=np.int64),
        np.array(answer, dtype=bool),
        np.array(owner, dtype=np.int64),
        len(examples),
    )


def _rows(flat: list[Any], lens: Any, answer: Any, owner: Any, n: int) -> EncodedRows:
    """The arrays from the segments' lengths: no Python object per token but the ints the tokenizer returned."""
    import numpy as np

    ids = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.int32, count=int(lens.sum()))
    mask = np.repeat(answer.astype(np.uint8), lens)
    lengths = np.bincount(owner, weights=lens, minlength=n).astype(np.int64)
    kept = np.bincount(owner, weights=lens * answer, minlength=n) > 0
    ends = np.cumsum(lens) - (np.cumsum(lengths) - lengths)[owner]  # each segment's end within its row
    plen = np.zeros(n, dtype=np.int32)
    prompt = ~answer & (lens > 0)
    np.maximum.at(plen, owner[prompt], ends[prompt].astype(np.int32))
    if not kept.all():
        keep_tokens = np.repeat(kept, lengths)
        ids, mask, lengths, plen = ids[keep_tokens], mask[keep_tokens], lengths[kept], plen[kept]
    return EncodedRows(ids, mask, lengths, plen, kept)


def token_lists(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]`` of each text: one batched call of the Rust
    tokenizer where that is all transformers' call would do, else that call itself, text by text (a slow
    tokenizer's batch is such a loop anyway; a tokenizer class of its own may treat a batch differently)."""
    if not texts:
        return []
    backend = _plain_backend(tokenizer)
    if backend is not None:  # what transformers' call runs, without building its per-text Python dicts
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer, where transformers' call would pass the texts to it unchanged and take its ids as they
    are: a fast tokenizer whose class changes neither step, with no truncation, padding or special-token
    setting left on the backend that the call would change first (the first call changes them, so later chunks
    take this path). Otherwise None."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        not isinstance(tokenizer, PreTrainedTokenizerFast)
        or cls.__call__ is not PreTrainedTokenizerBase.__call__
        or cls._encode_plus is not PreTrainedTokenizerFast._encode_plus
        or backend is None
        or not hasattr(backend, "encode_batch_fast")
    ):
        return None
    if (
        backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return None
    return backend
