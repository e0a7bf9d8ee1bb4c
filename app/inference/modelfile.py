"""The Ollama Modelfile and the README written beside an exported GGUF (`make export-gguf`).

Ollama does not run the tokenizer's Jinja chat template: it formats a chat with a Go text/template
over its own data (``.System``, and ``.Messages`` with ``.Role`` / ``.Content``). The Modelfile's
TEMPLATE therefore has to write exactly what training wrote (app.data.encode.prompt_text). It is
derived from the tokenizer's own template, not looked up in a per-family table: the template is
rendered for conversations of sentinel messages, and the text around the sentinels gives the
preamble, each role's prefix and suffix and the generation prompt. The result is checked against
the tokenizer on probe conversations (Chinese, JSON, several turns, with and without a system
message) before anything is written; a template this shape cannot reproduce (one that rewrites
roles or history) is refused in one line, and llama.cpp, which reads the GGUF's own Jinja
template, is the way to run that model.

BOS: llama.cpp and Ollama put the GGUF's BOS token before every prompt themselves when its
``tokenizer.ggml.add_bos_token`` is true. Training wrote the template's literal BOS once (prompts
are tokenized without special tokens), so the caller passes ``runtime_bos``, the text of the token
the runtime adds (None when the GGUF adds none), and it is cut from the TEMPLATE's front; kept, it
would be doubled. The GGUF decides, not this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

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


def _literal(text: str) -> str:
    """Template text that Go and the Modelfile parser both keep byte for byte."""
    if not text:
        return ""
    if (
        all(c.isprintable() or c in "\n\t" for c in text)
        and "{{" not in text
        and '"' not in text
        and not text.endswith("{")
    ):
        return text
    # A Go string constant: Ollama's Modelfile parser drops unprintable runes, a '"""' would end the
    # TEMPLATE, "{{" would start an action.
    body = "".join(
        c
        if c.isprintable() and c not in '"\\'
        else {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}.get(c, f"\\U{ord(c):08x}")
        for c in text
    )
    return '{{ "' + body + '" }}'


def ollama_template(tokenizer: PreTrainedTokenizerBase, runtime_bos: str | None = None) -> str:
    """An Ollama TEMPLATE (Go text/template) writing the training prompt; ``runtime_bos``: see the module doc."""
    return _go_template(chat_format(tokenizer), runtime_bos)


def _go_template(fmt: ChatFormat, runtime_bos: str | None) -> str:
    preamble = fmt.preamble
    if runtime_bos:
        if not preamble.startswith(runtime_bos):
            raise UserError(
                f"the GGUF adds {runtime_bos!r} before every prompt (tokenizer.ggml.add_bos_token) but "
                f"training prompts start with {preamble[:40]!r}: convert it with add_bos_token false"
            )
        preamble = preamble[len(runtime_bos) :]
    lit = {k: {r: _literal(v) for r, v in d.items()} for k, d in (("p", fmt.prefix), ("x", fmt.suffix))}
    out = [_literal(preamble)]
    if fmt.no_system:
        body = _literal(fmt.no_system)
        out.append(
            '{{ if .Messages }}{{ if ne (index .Messages 0).Role "system" }}'
            + body
            + "{{ end }}{{ else }}"
            + body
            + "{{ end }}"
        )
    folds = fmt.system_folds
    out.append(
        ("{{ $folded := false }}" if folds else "") + '{{ $role := "" }}{{ range $i, $_ := .Messages }}'
        "{{ $role = .Role }}"
    )
    for n, role in enumerate(r for r in ROLES if r in fmt.prefix):
        body = lit["p"][role] + "{{ .Content }}" + lit["x"][role]
        if role == "user" and folds:
            body = "{{ if not $folded }}" + lit["p"][role] + "{{ end }}{{ .Content }}" + lit["x"][role]
        if role == "assistant":  # the last one is a prefill, as in apply_format
            body = (
                "{{ if eq (len (slice $.Messages $i)) 1 }}"
                + _literal(fmt.generation)
                + "{{ .Content }}{{ else }}"
                + body
                + "{{ end }}"
            )
        if folds:
            body += "{{ $folded = true }}" if role == "system" else "{{ $folded = false }}"
        out.append(("{{ if" if n == 0 else "{{ else if") + f' eq .Role "{role}" }}}}' + body)
    out.append("{{ end }}{{ end }}")
    if fmt.generation:
        out.append('{{ if ne $role "assistant" }}' + _literal(fmt.generation) + "{{ end }}")
    return "".join(out)


def stop_tokens(tokenizer: PreTrainedTokenizerBase, model_dir: str | Path | None) -> list[str]:
    """The EOS and every stop token the run trained with, as text: the tokenizer's eos_token, then the
    eos_token_id list of generation_config.json in ``model_dir`` (the merged or base model)."""
    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    texts = [tokenizer.eos_token or ""] + [tokenizer.decode([i]) for i in ids]
    return list(dict.fromkeys(t for t in texts if t))


def _value(v: Any) -> str:
    return (
        str(v).lower() if isinstance(v, bool) else json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v)
    )


def modelfile_text(
    gguf_file: str,
    tokenizer: PreTrainedTokenizerBase,
    stop: list[str],
    system: str | None,
    params: dict[str, Any],
    runtime_bos: str | None = None,
) -> str:
    """The Modelfile beside ``gguf_file`` (a file name in the same folder): FROM, TEMPLATE, a stop per
    token, temperature 0 unless ``params`` says otherwise (extraction decodes greedily), SYSTEM if given."""
    if Path(gguf_file).name != gguf_file or re.search(r'[\s"]', gguf_file):
        raise ValueError(f"gguf_file must be a plain file name beside the Modelfile, not {gguf_file!r}")
    fmt = chat_format(tokenizer)
    template = _go_template(fmt, runtime_bos)
    lines = [
        "# Ollama Modelfile written by `make export-gguf`: ollama create <name> -f Modelfile",
        "# TEMPLATE writes the prompt exactly as training did (checked against the tokenizer's chat template).",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{template}"""',
    ]
    for tok in stop:
        if '"' in tok or not tok.isprintable():
            raise UserError(
                f"stop token {tok!r} cannot be written in an Ollama Modelfile (a quote or an "
                "unprintable character); use llama.cpp, which reads the GGUF's EOS tokens"
            )
        lines.append(f'PARAMETER stop "{tok}"')
    lines += [f"PARAMETER {k} {_value(v)}" for k, v in {"temperature": 0, **params}.items()]
    if system is not None:
        if '"""' in system or not all(c.isprintable() or c in "\n\t" for c in system):
            raise UserError(
                'the system prompt cannot be written in an Ollama Modelfile (it holds """ or an '
                "unprintable character); remove it, or pass it with each request"
            )
        if "system" not in fmt.prefix:
            raise UserError(
                f"the chat template of {tokenizer.name_or_path} has no system role, so the Modelfile "
                "cannot carry a system prompt; pass none for this model"
            )
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def readme_text(
    gguf_file: str,
    name: str,
    quant: str,
    system: str | None = None,
    adapter_gguf: str | None = None,
    base_gguf: str | None = None,
) -> str:
    """The result dir's README: what each file is and the exact commands to run it."""
    tag = re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-.") or "model"
    sys_arg = f" -sys {shlex.quote(system)}" if system else ""
    lines = [
        f"# {name}: GGUF ({quant})",
        "",
        "Written by `make export-gguf`: the trained adapter merged into its base, converted with llama.cpp's own "
        "converter and quantized. The chat template and the stop tokens the run trained with are in the GGUF's "
        "metadata.",
        "",
        f"- `{gguf_file}`: the model.",
        "- `Modelfile`: for Ollama; its TEMPLATE writes the training prompt format byte for byte.",
        "- `gguf_info.json`: what was exported, from which adapter and base.",
    ]
    if adapter_gguf and base_gguf:
        lines.append(f"- `{adapter_gguf}` and `{base_gguf}`: the LoRA alone as a llama.cpp adapter, and its base.")
    lines += [
        "",
        "## llama.cpp",
        "",
        "llama.cpp formats chats with the GGUF's own chat template (`--jinja`). "
        "`--temp 0` decodes greedily, as `make predict` does by default (TEMPERATURE=0).",
        "",
        "```bash",
        f"llama-cli -m {gguf_file} --jinja -cnv --temp 0{sys_arg}",
        f"llama-server -m {gguf_file} --jinja --temp 0 --port 8080   "
        "# OpenAI-compatible API: http://127.0.0.1:8080/v1/chat/completions",
    ]
    if adapter_gguf and base_gguf:
        lines.append(f"llama-cli -m {base_gguf} --lora {adapter_gguf} --jinja -cnv --temp 0{sys_arg}")
    lines += [
        "```",
        "",
        "## Ollama",
        "",
        "In this folder:",
        "",
        "```bash",
        f"ollama create {tag} -f Modelfile",
        f"ollama run {tag}",
        "```",
        "",
    ]
    return "\n".join(lines)
