"""Scoring free-text answers: exact match, ROUGE-L and BLEU-4 per sample, and their means.

These are the figures LLaMA-Factory's `predict` reports for instruction tuning, computed here without its
dependencies (jieba, rouge-chinese, nltk), on one tokenization: each CJK character is a token, a run of
letters and digits of any other script is a word, other symbols are one token each, whitespace separates.
Text is NFKC-normalized first (full-width = half-width). LLaMA-Factory segments Chinese into jieba words for
ROUGE and takes BLEU-4 over every raw character (spaces included), so the numbers are close on Chinese, not
equal, and differ more on other scripts (words here); all are on a 0-1 scale here (it prints them x100).

* BLEU-4: nltk's ``sentence_bleu`` with one reference, weights 1/4 each, ``SmoothingFunction().method3``
  (NIST geometric: the k-th n-gram order with no match counts 1 / (2^k x its n-gram count)).
* ROUGE-L: F1 of the longest common subsequence (precision over the answer's tokens, recall over the
  reference's), 0 when either has no token, as rouge-chinese gives.
* Exact match: equal after NFKC (full-width = half-width) and whitespace normalization.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def normalize(value: Any) -> str:
    """NFKC (full-width → half-width), strip, collapse inner whitespace; non-strings via str()."""
    return " ".join(unicodedata.normalize("NFKC", str(value)).split())


def tokens(text: str) -> list[str]:
    """CJK characters one by one, other scripts by word, punctuation by symbol ('用Python写' -> 用 Python 写),
    after NFKC, so a full-width comma or letter matches its half-width form as in exact match and triplets."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text))


def exact_match(reference: str, answer: str) -> bool:
    return normalize(reference) == normalize(answer)


def bleu4(reference: list[str], hypothesis: list[str]) -> float:
    """Sentence BLEU-4 of ``hypothesis`` against one ``reference`` (token lists), smoothed as nltk's method3."""
    precisions = []  # (clipped matches, hypothesis n-grams) per order, as nltk's modified_precision
    for n in range(1, 5):
        hyp = Counter(zip(*(hypothesis[i:] for i in range(n)), strict=False))
        ref = Counter(zip(*(reference[i:] for i in range(n)), strict=False))
        precisions.append((sum(min(c, ref[g]) for g, c in hyp.items()), max(1, sum(hyp.values()))))
    if precisions[0][0] == 0:  # no token in common (or no answer): nltk returns 0 before smoothing
        return 0.0
    log_sum, k = 0.0, 1
    for matched, total in precisions:
        if matched:
            log_sum += math.log(matched / total) / 4
        else:
            log_sum += math.log(1 / (2**k * total)) / 4
            k += 1
    c, r = len(hypothesis), len(reference)
    return (1.0 if c > r else math.exp(1 - r / c)) * math.exp(log_sum)


def rouge_l(reference: list[str], hypothesis: list[str]) -> float:
    """ROUGE-L F1: the longest common subsequence over the answer's and the reference's token counts."""
    if not reference or not hypothesis:
        return 0.0
    prev = [0] * (len(hypothesis) + 1)
    for r in reference:  # one row of the LCS table at a time
        row = [0]
        for j, h in enumerate(hypothesis):
            row.append(prev[j] + 1 if r == h else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, rec = lcs / len(hypothesis), lcs / len(reference)
    return 2 * p * rec / (p + rec)


@dataclass
class TextReport:
    """Free-text answers' scores (triplet answers get app.evaluation.scoring.Report instead)."""

    n_samples: int = 0
    exact_match: float = 0.0
    rouge_l: float = 0.0
    bleu_4: float = 0.0
    loss: float | None = None  # the reference answers' mean loss under the model; none in --predictions mode
    scored_as: str = "text"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "rows"}

    def headline(self) -> str:
        loss = "" if self.loss is None else f", loss {self.loss:.4f}"
        return f"exact match {self.exact_match:.4f}, ROUGE-L {self.rouge_l:.4f}, BLEU-4 {self.bleu_4:.4f}{loss}"


def score_text(pairs: Iterable[tuple[str, str]]) -> TextReport:
    """Score (reference, answer) pairs: each sample's exact match, ROUGE-L and BLEU-4, and their means."""
    rep = TextReport()
    for index, (gold, output) in enumerate(pairs):
        ref, hyp = tokens(gold), tokens(output)
        rep.rows.append(
            {
                "index": index,
                "gold": gold,
                "output": output,
                "exact_match": exact_match(gold, output),
                "rouge_l": rouge_l(ref, hyp),
                "bleu_4": bleu4(ref, hyp),
            }
        )
    rep.n_samples = len(rep.rows)
    for key in ("exact_match", "rouge_l", "bleu_4"):
        setattr(rep, key, sum(float(r[key]) for r in rep.rows) / rep.n_samples if rep.n_samples else 0.0)
    return rep
