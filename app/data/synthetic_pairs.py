"""Synthetic preference data from the triplet generator: the gold answer against a realistic mistake.

A pair's prompt is a synthetic sample's context, its chosen answer the gold target, its rejected answer the
same target with one mistake a model makes, picked at random among those the sample allows:
- ``missing``: one triplet left out (only when there are two or more);
- ``swapped``: one triplet's subject and object exchanged;
- ``predicate``: one triplet's predicate replaced by another of the schema (one with the same subject and
  object types where there is one: 导演 for 主演), the types following it;
- ``entity``: one triplet's object replaced by a plausible name from the word tables that the sentence does
  not hold (a person, place, company...).
The kind is recorded in a ``mistake`` field, which the reader ignores. The rejected answer never equals the
chosen one, and the same seed gives the same records.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from app.data.synthetic import (
    PREDICATES,
    _company,
    _person,
    _pick,
    _press,
    _school,
    format_target,
    generate_samples,
    parse_target,
)
from app.data.synthetic_tables import ALBUM_B, CAPITAL, CITIES, CLIMATE, NATIONS, PLACES, SITE_X, SITE_Y, TITLE_A

MISTAKES = ("missing", "swapped", "predicate", "entity")
SEED_OFFSET = 7919  # pairs come from another stream than the SFT sample of the same SEED
# object_type (or predicate, first) -> a generator of plausible names for it (the sample generator's own)
NAMES = {
    "首都": _pick(CAPITAL),
    "人物": _person,
    "地点": _pick(PLACES),
    "城市": _pick(CITIES),
    "国家": _pick(NATIONS),
    "企业": _company,
    "学校": _school,
    "出版社": _press,
    "网站": _pick(SITE_X, SITE_Y),
    "音乐专辑": _pick(TITLE_A, ALBUM_B),
    "气候": _pick(CLIMATE),
}

Triplet = dict[str, str]


def mistake(r: random.Random, context: str, triplets: list[Triplet]) -> tuple[str, list[Triplet]]:
    """(kind, the triplets with that mistake); never the triplets themselves."""
    entity = _invented(r, context, triplets)
    kinds = [k for k in MISTAKES if (k != "missing" or len(triplets) >= 2) and (k != "entity" or entity)]
    kind = r.choice(kinds)
    out = [dict(t) for t in triplets]
    if kind == "missing":
        del out[r.randrange(len(out))]
    elif kind == "entity":
        assert entity is not None  # a kind only where there is one
        i, name = entity
        out[i]["object"] = name
    else:
        t = out[r.randrange(len(out))]
        if kind == "swapped":
            t["subject"], t["object"] = t["object"], t["subject"]
        else:
            t["predicate"] = _other_predicate(r, t)
            t["subject_type"], t["object_type"] = PREDICATES[t["predicate"]]
    return kind, out


def _other_predicate(r: random.Random, t: Triplet) -> str:
    others = [p for p in PREDICATES if p != t["predicate"]]
    same = [p for p in others if PREDICATES[p] == (t["subject_type"], t["object_type"])]
    same_subject = [p for p in others if PREDICATES[p][0] == t["subject_type"]]
    return r.choice(same or same_subject or others)


def _invented(r: random.Random, context: str, triplets: list[Triplet]) -> tuple[int, str] | None:
    """(index, name): a triplet whose object can be named otherwise, and a name of its type not in the sentence."""
    names = [NAMES.get(t["predicate"], NAMES.get(t["object_type"])) for t in triplets]
    nameable = [(i, gen) for i, gen in enumerate(names) if gen]
    if not nameable:
        return None
    i, gen = r.choice(nameable)  # draws as a choice among the indices did: only the length counts
    for _ in range(50):
        name = gen(r, "")
        if name not in context:
            return i, name
    return None


def _samples(n: int, seed: int, avoid: Iterable[str]) -> list[dict[str, str]]:
    avoid = set(avoid)
    pool = generate_samples(n + len(avoid), seed=seed + SEED_OFFSET)  # a prefix of the seed's one sequence
    return [s for s in pool if s["context"] not in avoid][:n]


def generate_pairs(n: int, seed: int = 42, avoid: Iterable[str] = ()) -> list[dict[str, str]]:
    """n {prompt, chosen, rejected, mistake} records with distinct prompts, none of them a context in
    ``avoid`` (e.g. the SFT sample's); identical for identical seeds."""
    r = random.Random(f"pairs:{seed}")
    out = []
    for s in _samples(n, seed, avoid):
        kind, wrong = mistake(r, s["context"], parse_target(s["target"]))
        out.append({"prompt": s["context"], "chosen": s["target"], "rejected": format_target(wrong), "mistake": kind})
    return out


def generate_kto(n: int, seed: int = 42, avoid: Iterable[str] = ()) -> list[dict]:
    """n {prompt, completion, label} records with distinct prompts: half the gold answer (label true), half a
    mistake (label false, and its ``mistake``), in a random order; identical for identical seeds."""
    r = random.Random(f"kto:{seed}")
    samples = _samples(n, seed, avoid)
    good = set(r.sample(range(len(samples)), len(samples) // 2))
    out: list[dict] = []
    for i, s in enumerate(samples):
        if i in good:
            out.append({"prompt": s["context"], "completion": s["target"], "label": True})
            continue
        kind, wrong = mistake(r, s["context"], parse_target(s["target"]))
        out.append({"prompt": s["context"], "completion": format_target(wrong), "label": False, "mistake": kind})
    return out
