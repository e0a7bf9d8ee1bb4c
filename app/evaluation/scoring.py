"""Score model answers against gold targets: SPO triplet P/R/F1 and label accuracy, or as free text.

Gold and model outputs share one format (a fenced or bare JSON list of triplet dicts, or
a JSON list of one class label), so both go through the same tolerant parser.  Model
output is often imperfect — prose around the JSON, a list cut off by ``max_new_tokens``,
full-width characters — and the parser salvages what it can instead of scoring zero.
Gold that cannot be read is counted (``n_bad_gold``) and left out, never a crash.

Which report a file gets is decided from its gold answers (``answers_are_triplets``): answers that are
mostly such JSON lists get P/R/F1; any other answers (an alpaca file's prose) get exact match, ROUGE-L
and BLEU-4 (app.evaluation.textmetrics), since triplet F1 would be a meaningless 0 there.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.core.errors import UserError
from app.evaluation.textmetrics import TextReport, normalize, score_text

log = logging.getLogger(__name__)

SPO_KEYS = ("subject", "predicate", "object")
TYPE_KEYS = ("subject_type", "object_type")
MAX_LIST_STARTS = 64  # bound the '[' positions tried, so a pathological output can't go quadratic
_decoder = json.JSONDecoder()
_LIST_OPEN = re.compile(r'\[\s*[{"]')  # a list whose first item is a dict or a string


@dataclass(frozen=True)
class Triplet:
    subject: str
    predicate: str
    object: str
    subject_type: str = ""
    object_type: str = ""

    def __post_init__(self) -> None:
        # Normalize on construction, so equal-looking triplets always compare equal.
        for name in ("subject", "predicate", "object", "subject_type", "object_type"):
            object.__setattr__(self, name, normalize(getattr(self, name)))

    @property
    def spo(self) -> tuple[str, str, str]:
        return self.subject, self.predicate, self.object

    @property
    def typed(self) -> tuple[str, str, str, str, str]:
        return self.spo + (self.subject_type, self.object_type)


@dataclass
class Parsed:
    kind: str  # "triplets" | "labels" | "invalid"
    triplets: list[Triplet] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    valid_json: bool = False  # a complete JSON list was found
    recovered: bool = False  # items were salvaged from broken / truncated JSON
    skipped: int = 0  # list items that could not be used (missing keys, nested lists, ...)

    def items(self) -> list[Any]:
        return [asdict(t) for t in self.triplets] if self.kind == "triplets" else list(self.labels)


def _complete_list(text: str) -> list | None:
    """First complete JSON list of dicts/strings in text (skips e.g. a '[1]' footnote before it)."""
    start, tries = text.find("["), 0
    while start != -1 and tries < MAX_LIST_STARTS:
        tries += 1
        try:
            value, _ = _decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and all(isinstance(v, (dict, str)) for v in value):
            return value
        start = text.find("[", start + 1)
    return None


def _salvage(text: str) -> list:
    """Complete items of a list the model never closed (or dicts with no list around them)."""
    m = _LIST_OPEN.search(text)
    pos = m.end() - 1 if m else text.find("{")  # no list bracket at all: maybe bare dicts
    if pos == -1:
        return []
    items: list = []
    while pos < len(text):
        while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            value, pos = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the cut-off item: everything before it is kept
        items.append(value)
    return items


def _triplet(item: dict) -> Triplet | None:
    # subject/predicate/object are required; types are optional so an answer without them
    # still earns untyped credit (it just never matches typed).
    if any(item.get(k) is None for k in SPO_KEYS):
        return None
    return Triplet(*(item[k] for k in SPO_KEYS), *(item.get(k) if item.get(k) is not None else "" for k in TYPE_KEYS))


def parse_answer(text: str) -> Parsed:
    """Parse a gold target or model answer into triplets or labels; never raises."""
    text = text if isinstance(text, str) else str(text)
    items = _complete_list(text)
    valid = items is not None
    if items is None:
        items = _salvage(text)
        if not items:
            return Parsed("invalid")
    # Any dict means the answer is meant as triplets; stray strings in it are noise (skipped).
    if not items or any(isinstance(i, dict) for i in items):
        triplets = [t for t in (_triplet(i) for i in items if isinstance(i, dict)) if t is not None]
        return Parsed("triplets", triplets, valid_json=valid, recovered=not valid, skipped=len(items) - len(triplets))
    # Only lists of dicts/strings are accepted or salvaged, so at least the first item is a label.
    labels = [normalize(i) for i in items if isinstance(i, (str, int, float, bool))]
    return Parsed("labels", labels=labels, valid_json=valid, recovered=not valid, skipped=len(items) - len(labels))


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


@dataclass
class Report:
    n_samples: int = 0
    n_triplet_samples: int = 0
    n_classification_samples: int = 0
    n_bad_gold: int = 0
    n_valid_json: int = 0
    n_recovered: int = 0
    n_invalid_output: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tp_typed: int = 0
    fp_typed: int = 0
    fn_typed: int = 0
    n_label_correct: int = 0
    loss: float | None = None  # the reference answers' mean loss under the model; none in --predictions mode
    scored_as: str = "triplets"
    per_predicate: dict[str, dict[str, float | int]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def _triplet_prf(self, typed: bool) -> tuple[float, float, float]:
        # No triplet samples gives 0.0 (0/0 convention), so callers can always format it as a number.
        return _prf(self.tp_typed, self.fp_typed, self.fn_typed) if typed else _prf(self.tp, self.fp, self.fn)

    triplet_precision = property(lambda self: self._triplet_prf(False)[0])
    triplet_recall = property(lambda self: self._triplet_prf(False)[1])
    triplet_f1 = property(lambda self: self._triplet_prf(False)[2])
    triplet_precision_typed = property(lambda self: self._triplet_prf(True)[0])
    triplet_recall_typed = property(lambda self: self._triplet_prf(True)[1])
    triplet_f1_typed = property(lambda self: self._triplet_prf(True)[2])

    @property
    def classification_accuracy(self) -> float | None:
        n = self.n_classification_samples
        return self.n_label_correct / n if n else None

    @property
    def json_valid_rate(self) -> float:
        return self.n_valid_json / self.n_samples if self.n_samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        """All metrics and counts, per_predicate included, rows excluded."""
        out = {
            k: getattr(self, k)
            for k in (
                "triplet_precision",
                "triplet_recall",
                "triplet_f1",
                "triplet_precision_typed",
                "triplet_recall_typed",
                "triplet_f1_typed",
                "classification_accuracy",
                "json_valid_rate",
            )
        }
        out.update({k: v for k, v in asdict(self).items() if k != "rows"})
        return out

    def headline(self) -> str:
        acc, loss = self.classification_accuracy, "" if self.loss is None else f", loss {self.loss:.4f}"
        return (
            f"F1 {self.triplet_f1:.4f} (typed {self.triplet_f1_typed:.4f}), P {self.triplet_precision:.4f}, "
            f"R {self.triplet_recall:.4f}, classification accuracy {'-' if acc is None else f'{acc:.4f}'}, "
            f"valid JSON {100 * self.json_valid_rate:.1f}%{loss}"
        )


def answers_are_triplets(golds: Iterable[str]) -> bool:
    """Whether most gold answers are complete JSON lists of triplets (or of labels, which the same report
    scores as accuracy): the data this report is for. Anything else is scored as text."""
    golds = list(golds)
    structured = sum(p.valid_json and p.kind != "invalid" for p in map(parse_answer, golds))
    return 2 * structured > len(golds)


def score_answers(pairs: Iterable[tuple[str, str]]) -> Report | TextReport:
    """(gold, output) pairs scored as their gold answers call for: P/R/F1 for triplet data, else as text."""
    pairs = list(pairs)
    return score(pairs) if answers_are_triplets(g for g, _ in pairs) else score_text(pairs)


def score(pairs: Iterable[tuple[str, str]]) -> Report:
    """Score (gold_text, output_text) pairs; triplet matching is exact on normalized strings."""
    rep = Report()
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0})
    for index, (gold_text, output_text) in enumerate(pairs):
        gold, pred = parse_answer(gold_text), parse_answer(output_text)
        rep.n_samples += 1
        rep.n_valid_json += pred.valid_json
        rep.n_recovered += pred.recovered
        rep.n_invalid_output += pred.kind == "invalid"
        row: dict[str, Any] = {
            "index": index,
            "gold": gold_text,
            "output": output_text,
            "kind": pred.kind,
            "parsed": pred.items(),
            "correct": [],
            "missing": [],
            "spurious": [],
            "label_correct": None,
            "valid_json": pred.valid_json,
            "bad_gold": False,
        }
        rep.rows.append(row)
        # Gold that is truncated or has unusable items would mis-score good answers: exclude it.
        if gold.kind == "invalid" or not gold.valid_json or gold.skipped:
            rep.n_bad_gold += 1
            row["bad_gold"] = True
            log.debug("sample %d: unreadable gold target %r", index, str(gold_text)[:80])
            continue
        if gold.kind == "labels":
            rep.n_classification_samples += 1
            ok = pred.kind == "labels" and set(pred.labels) == set(gold.labels)
            rep.n_label_correct += ok
            row["label_correct"] = ok
            continue
        rep.n_triplet_samples += 1
        # Keyed sets: duplicates count once; the first triplet per key is the one reported.
        g = {t.spo: t for t in reversed(gold.triplets)}
        p = {t.spo: t for t in reversed(pred.triplets)} if pred.kind == "triplets" else {}
        gt = {t.typed for t in gold.triplets}
        pt = {t.typed for t in pred.triplets} if pred.kind == "triplets" else set()
        rep.tp_typed += len(gt & pt)
        rep.fp_typed += len(pt - gt)
        rep.fn_typed += len(gt - pt)
        for kind, keys in (("tp", p.keys() & g.keys()), ("fp", p.keys() - g.keys()), ("fn", g.keys() - p.keys())):
            for key in keys:
                counts[key[1]][kind] += 1  # key[1] is the predicate
        row["correct"] = [asdict(p[k]) for k in p if k in g]
        row["spurious"] = [asdict(p[k]) for k in p if k not in g]
        row["missing"] = [asdict(g[k]) for k in g if k not in p]
        rep.tp += len(row["correct"])
        rep.fp += len(row["spurious"])
        rep.fn += len(row["missing"])
    for pred_name, c in sorted(counts.items()):
        prec, rec, f1 = _prf(c["tp"], c["fp"], c["fn"])
        rep.per_predicate[pred_name] = {**c, "precision": prec, "recall": rec, "f1": f1, "support": c["tp"] + c["fn"]}
    if rep.n_bad_gold:
        log.warning(
            "%d of %d gold targets could not be parsed; they are excluded from scoring", rep.n_bad_gold, rep.n_samples
        )
    return rep


def score_file(path: str | Path) -> Report | TextReport:
    """Score a JSONL of {"target" (or "reference"): gold, "output": model text} lines (score_answers)."""
    path = Path(path)
    expected = 'expected one JSON object per line with "target" (or "reference") and "output" strings'
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise UserError(f"--predictions {path}: cannot read file ({e.strerror or e})") from None
    pairs: list[tuple[str, str]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--predictions {path}: line {n}: not valid JSON ({e.msg}); {expected}") from None
        gold = rec.get("target", rec.get("reference")) if isinstance(rec, dict) else None
        out = rec.get("output") if isinstance(rec, dict) else None
        if not isinstance(gold, str) or not isinstance(out, str):
            have = sorted(rec)[:6] if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"--predictions {path}: line {n}: has {have}; {expected}")
        pairs.append((gold, out))
    if not pairs:
        raise UserError(f"--predictions {path}: no records; {expected}")
    return score_answers(pairs)
