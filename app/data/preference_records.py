"""The shapes of preference-tuning records, read into an Example's fields by app/data/records.py.

``preference`` (STAGE=dpo): a prompt with a chosen and a rejected answer. Read from
- ``{prompt, chosen, rejected}`` strings (optional ``system``);
- TRL's conversational ``{prompt: [turns], chosen: [turns], rejected: [turns]}`` (the last assistant turn of
  each side is its answer), and TRL's implicit prompt: ``chosen`` and ``rejected`` are whole conversations
  that share everything but their last assistant turn;
- LLaMA-Factory's pairs: sharegpt ``{conversations, chosen: {from, value}, rejected: {from, value}}``,
  messages ``{messages, chosen: {role, content}, rejected: {...}}`` and alpaca
  ``{instruction, input, chosen, rejected}`` (all with an optional ``system``).
``kto`` (STAGE=kto): ``{prompt, completion, label}``, prompt and completion as text or turns, label
true/false (1/0, "true"/"false").

The Example gets the prompt turns plus the chosen (or KTO's only) answer as ``messages``, exactly what an
SFT record of the same conversation gets, and ``rejected`` / ``label`` beside them. A record that cannot be
read raises ValueError with a short reason, which the loader counts against MAX_BAD_RATIO.
"""

from __future__ import annotations

from typing import Any

PREFERENCE_FORMATS = ("preference", "kto")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "bot": "assistant",
    "model": "assistant",
}
_CHAT = ("role", "content", None)  # (role key, text key, role names) of a {role, content} turn
_SHAREGPT = ("from", "value", SHAREGPT_ROLES)
_LABELS = {"true": True, "false": False, "1": True, "0": False}

Turns = list[dict[str, str]]


def text_field(rec: dict[str, Any], key: str, required: bool = True) -> str:
    v = rec.get(key)
    if type(v) is str:  # the common case first: a 20 GB file calls this twice per record
        return v
    if v is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    if not isinstance(v, (str, int, float)):
        raise ValueError(f"field '{key}' is not text")
    return str(v)


def turns(items: Any, role_key: str, text_key: str, roles: dict[str, str] | None) -> Turns:
    if not isinstance(items, list) or not items:
        raise ValueError("empty conversation")
    msgs = []
    for t in items:
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise ValueError(f"turn without '{role_key}'/'{text_key}'")
        if not isinstance(t[text_key], (str, int, float)):  # e.g. null content of a tool-call turn
            raise ValueError(f"'{text_key}' is not text")
        role = str(t[role_key]).lower()
        role = roles.get(role, "") if roles else role
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {t[role_key]!r}")
        msgs.append({"role": role, "content": str(t[text_key])})
    return msgs


def read_preference(rec: dict[str, Any], fmt: str) -> tuple[Turns, dict[str, Any]]:
    """(messages, the Example's other fields) of a ``preference`` or ``kto`` record."""
    if fmt == "kto":
        prompt = _check_prompt(_prompt(rec))
        answer = _answer(rec.get("completion"), "completion", _CHAT)
        return _with_system(rec, prompt) + [_assistant(answer)], {"label": _label(rec.get("label"))}
    prompt, chosen, rejected = _pair(rec)
    _check_prompt(prompt)
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty answer")
    if chosen.strip() == rejected.strip():
        raise ValueError("chosen equals rejected")
    return _with_system(rec, prompt) + [_assistant(chosen)], {"rejected": rejected}


def _pair(rec: dict[str, Any]) -> tuple[Turns, str, str]:
    for side in ("chosen", "rejected"):
        if rec.get(side) is None:
            raise ValueError(f"missing field '{side}'")
    for key, style in (("conversations", _SHAREGPT), ("messages", _CHAT)):
        if key in rec:  # LLaMA-Factory: the prompt's turns, then one turn per side
            prompt = turns(rec[key], *style)
            return prompt, _answer(rec["chosen"], "chosen", style), _answer(rec["rejected"], "rejected", style)
    if "instruction" in rec:  # LLaMA-Factory's alpaca pairs
        user = text_field(rec, "instruction")
        if text_field(rec, "input", required=False).strip():
            user += "\n" + text_field(rec, "input")
        return [{"role": "user", "content": user}], text_field(rec, "chosen"), text_field(rec, "rejected")
    if "prompt" in rec:
        return _prompt(rec), _answer(rec["chosen"], "chosen", _CHAT), _answer(rec["rejected"], "rejected", _CHAT)
    if not isinstance(rec["chosen"], list):
        raise ValueError("missing field 'prompt'")
    chosen, rejected = turns(rec["chosen"], *_CHAT), turns(rec["rejected"], *_CHAT)  # TRL's implicit prompt
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected differ before their last turn")
    return chosen[:-1], _last_answer(chosen, "chosen"), _last_answer(rejected, "rejected")


def _prompt(rec: dict[str, Any]) -> Turns:
    v = rec.get("prompt")
    return turns(v, *_CHAT) if isinstance(v, list) else [{"role": "user", "content": text_field(rec, "prompt")}]


def _check_prompt(prompt: Turns) -> Turns:
    if not prompt:
        raise ValueError("empty prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError("prompt does not end with a user turn")
    return prompt


def _answer(v: Any, side: str, style: tuple) -> str:
    """One side's answer: text, one turn, or turns whose last is the assistant's."""
    if v is None:
        raise ValueError(f"missing field '{side}'")
    if isinstance(v, (str, int, float)):
        return str(v)
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise ValueError(f"field '{side}' is not text or turns")
    return _last_answer(turns(v, *style), side)


def _last_answer(msgs: Turns, side: str) -> str:
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"'{side}' does not end with an assistant turn")
    return msgs[-1]["content"]


def _with_system(rec: dict[str, Any], prompt: Turns) -> Turns:
    system = text_field(rec, "system", required=False)
    if system.strip() and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system}] + prompt
    return prompt


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _label(v: Any) -> bool:
    """KTO's verdict: true/false, 1/0 or their strings (a CSV's are all strings); anything else is bad."""
    if v is None:
        raise ValueError("missing field 'label'")
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _LABELS:
        return _LABELS[v.strip().lower()]
    raise ValueError("label is not true/false")
