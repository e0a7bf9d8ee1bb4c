"""A chat template as the prefix/suffix shape an Ollama TEMPLATE can write (app/inference/modelfile.py).

The format is derived from the tokenizer's own template, not looked up in a per-family table: the
template is rendered for conversations of sentinel messages, and the text around the sentinels gives the
preamble, each role's prefix and suffix and the generation prompt. The result is checked against the
tokenizer on probe conversations (Chinese, JSON, several turns, with and without a system message);
a template this shape cannot reproduce (one that rewrites roles or history) is refused in one line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from app.core.errors import UserError
from app.data.encode import prompt_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Sentinel contents: no whitespace or markup, so no template trims, escapes or splits them.
_S, _U1, _A1, _U2 = "SENTINELSYSTEMA7", "SENTINELUSERB3", "SENTINELASSISTANTC5", "SENTINELUSERD9"
_PROBES = (
    "从句子中抽取三元组：周杰伦出生于台湾。",
    '{"subject": "周杰伦", "predicate": "出生地", "object": "台湾"}',
    'Line one\nline two {{ .Content }} {% raw %} "quoted"',
    "[{'a': 1}, {\"b\": [2, 3]}]",
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as prefix/suffix strings, the shape an Ollama TEMPLATE can express."""

    preamble: str  # before everything ("[gMASK]<sop>", "<|begin_of_text|>", "<bos>")
    no_system: str  # written when the chat opens without a system message (a default one)
    prefix: dict[str, str]  # role -> text before its content
    suffix: dict[str, str]  # role -> text after it (left off a final assistant message: a prefill)
    generation: str  # the generation prompt, after a chat that does not end with the assistant
    system_folds: bool = False  # the system text opens the next user turn, whose prefix it replaces (Gemma 3)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen: bool) -> str:
    if gen or not getattr(tokenizer, "chat_template", None):
        return prompt_text(tokenizer, messages)  # without a template, gen changes nothing
    return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def _cut(text: str, *sentinels: str) -> list[str]:
    """The text between the sentinels, each expected exactly once and in order."""
    parts, rest = [], text
    for s in sentinels:
        if rest.count(s) != 1:
            raise ValueError(f"renders a message {rest.count(s)} times")
        head, rest = rest.split(s)
        parts.append(head)
    return parts + [rest]


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _between_tokens(tokenizer: PreTrainedTokenizerBase, text: str, cut: int) -> bool:
    """Whether text splits at cut without splitting a token ("<|" + "assistant|>" would)."""
    if cut in (0, len(text)):
        return True
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (text[:cut], text[cut:], text)]
    return ids[0] + ids[1] == ids[2]


def _derive(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    u1, a1, u2 = ("user", _U1), ("assistant", _A1), ("user", _U2)
    head, x_u_p_a, x_a_p_u, tail_u = _cut(_render(tokenizer, _msgs(u1, a1, u2), gen=True), _U1, _A1, _U2)
    # Without the generation prompt a template may still write a trailer after the last turn (GLM-Edge
    # always writes "<|assistant|>", Phi an EOS): the shortest common ending that leaves a consistent
    # split is that trailer (usually none), and what precedes it each role's suffix.
    end_u = _cut(_render(tokenizer, _msgs(u1, a1, u2), gen=False), _U1, _A1, _U2)[3]
    end_a = _cut(_render(tokenizer, _msgs(u1, a1), gen=False), _U1, _A1)[2]
    for n in range(_common_suffix(end_u, end_a) + 1):
        x_u, x_a = end_u[: len(end_u) - n], end_a[: len(end_a) - n]
        p_u = x_a_p_u[len(x_a) :]
        if (
            x_a_p_u.startswith(x_a)
            and x_u_p_a.startswith(x_u)
            and tail_u.startswith(x_u)
            and head.endswith(p_u)
            and all(_between_tokens(tokenizer, t, k) for t, k in ((end_u, len(x_u)), (end_a, len(x_a))))
        ):
            break
    else:
        raise ValueError("writes a turn differently depending on what follows it")
    opening = head[: len(head) - len(p_u)]  # preamble + any default system block
    prefix, suffix = {"user": p_u, "assistant": x_u_p_a[len(x_u) :]}, {"user": x_u, "assistant": x_a}
    generation = tail_u[len(x_u) :]
    try:
        sys_head, between = _cut(_render(tokenizer, _msgs(("system", _S), u1, a1, u2), gen=True), _S, _U1)[:2]
    # Any failure of the system probe (raise_exception, a system text we cannot place, a template that
    # indexes messages its own way) means the same: no system role, which the Modelfile can do without
    except Exception as e:  # noqa: BLE001
        log.info("chat template has no system role (%s): the Modelfile leaves system messages out", e)
        return ChatFormat(opening, "", prefix, suffix, generation)
    # Where the preamble ends and the system prefix begins only matters for a system message that is
    # not the first (Qwen2.5's default system text shares its opening): Ollama sends SYSTEM first.
    preamble = sys_head[: len(os.path.commonprefix([sys_head, opening]))]
    folds = not between.endswith(p_u)
    prefix["system"], suffix["system"] = (
        sys_head[len(preamble) :],
        between if folds else between[: len(between) - len(p_u)],
    )
    return ChatFormat(preamble, opening[len(preamble) :], prefix, suffix, generation, folds)


def apply_format(fmt: ChatFormat, messages: list[dict[str, str]]) -> str:
    """What the TEMPLATE writes for these messages (the Go template below, in Python). A final assistant
    message is a prefill: it follows the generation prompt, so the text is the training text so far."""
    out = [fmt.preamble, "" if messages and messages[0]["role"] == "system" else fmt.no_system]
    folded = False
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "assistant" and i == len(messages) - 1:
            out += [fmt.generation, m["content"]]
        elif role in fmt.prefix:
            out += ["" if folded and role == "user" else fmt.prefix[role], m["content"], fmt.suffix[role]]
            folded = role == "system" and fmt.system_folds
    if not messages or messages[-1]["role"] != "assistant":
        out.append(fmt.generation)
    return "".join(out)


def _probe_chats(system: bool) -> list[list[dict[str, str]]]:
    p = _PROBES
    chats = [
        _msgs(("user", p[0])),
        _msgs(("user", p[0]), ("assistant", p[1]), ("user", p[2])),
        _msgs(("user", p[2]), ("assistant", p[3]), ("user", p[0]), ("assistant", p[1]), ("user", p[3])),
    ]
    return chats + [_msgs(("system", p[2])) + c for c in chats] if system else chats


def chat_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The tokenizer's prompt format as a ChatFormat, checked on probe chats, or a one-line UserError."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    try:
        fmt = _derive(tokenizer)
        wrong = next(
            (c for c in _probe_chats("system" in fmt.prefix) if apply_format(fmt, c) != prompt_text(tokenizer, c)), None
        )
    except Exception as e:  # a template error, or a shape _derive rejects
        why = e if isinstance(e, ValueError) else f"fails on a plain chat: {e}"
        raise UserError(
            f"the chat template of {name} cannot be written as an Ollama TEMPLATE (it {why}); run the "
            "GGUF with llama.cpp (llama-server --jinja), which reads the template itself"
        ) from e
    if wrong is not None:
        raise UserError(
            f"the chat template of {name} cannot be written as an Ollama TEMPLATE (it rewrites a "
            f"{len(wrong)}-message chat beyond per-role prefixes and suffixes); run the GGUF with "
            "llama.cpp (llama-server --jinja), which reads the template itself"
        )
    edge = _msgs(("user", "  padded \n"))
    if apply_format(fmt, edge) != prompt_text(tokenizer, edge):
        log.warning(
            "the chat template of %s strips spaces around each message and Ollama does not: strip your "
            "messages to get exactly the training prompt",
            name,
        )
    return fmt
