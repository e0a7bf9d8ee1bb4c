"""The Ollama Modelfile and the README written beside an exported GGUF (`make export-gguf`).

Ollama does not run the tokenizer's Jinja chat template: it formats a chat with a Go text/template
over its own data (``.System``, and ``.Messages`` with ``.Role`` / ``.Content``). The Modelfile's
TEMPLATE therefore has to write exactly what training wrote (app.data.encode.prompt_text): it is
written from the template's own prefix/suffix shape, derived and checked on probe chats before anything
is written (app/inference/chat_format.py). A template that shape cannot reproduce is refused in one
line, and llama.cpp, which reads the GGUF's own Jinja template, is the way to run that model.

BOS: llama.cpp and Ollama put the GGUF's BOS token before every prompt themselves when its
``tokenizer.ggml.add_bos_token`` is true. Training wrote the template's literal BOS once (prompts
are tokenized without special tokens), so the caller passes ``runtime_bos``, the text of the token
the runtime adds (None when the GGUF adds none), and it is cut from the TEMPLATE's front; kept, it
would be doubled. The GGUF decides, not this module.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import UserError
from app.inference.chat_format import ROLES, ChatFormat, chat_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


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
