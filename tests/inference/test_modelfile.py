"""The Ollama Modelfile beside an exported GGUF (app.inference.modelfile, issue 29).

Its TEMPLATE is rendered by Go's real text/template engine, with the data Ollama gives it
(.System, .Messages: consecutive messages of one role merged, system messages collected), and must
equal the training prompt (app.data.encode.prompt_text) byte for byte: for every tiny family, for
Chinese and JSON-looking text, with and without a system message, and for templates shaped like
the real GLM-Edge, Gemma 3 and Qwen2.5 ones. Without a Go compiler these skip, naming it;
REQUIRE_GO=1 (CI) turns the skip into a failure."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess

import pytest

FAMILIES = ("tiny", "tiny-qwen2", "tiny-qwen3", "tiny-llama", "tiny-gemma3")

GO_RENDERER = r"""
// Renders Ollama TEMPLATEs as Ollama's template.Execute does: text/template (missingkey=zero, a json
// func) over {System, Messages}, consecutive messages of one role merged, system messages joined.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func render(c Case) (string, error) {
	var system []string
	var collated []*Message
	for i := range c.Messages {
		m := c.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	err = t.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated,
		"Tools": nil, "Response": "", "Think": false, "IsThinkSet": false})
	return b.String(), err
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		s, err := render(c)
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		out = append(out, s)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""

SYSTEM = '你是信息抽取助手。只输出 JSON，例如 {"subject": "..."}。'
CHAT = [
    {"role": "user", "content": "从句子中抽取三元组：周杰伦出生于台湾省新北市。"},
    {"role": "assistant", "content": '[{"subject": "周杰伦", "predicate": "出生地", "object": "台湾省新北市"}]'},
    {"role": "user", "content": 'And in English? {"text": "Ada Lovelace was born in London."} {{ .Content }}\nend'},
]

# Templates shaped like the real ones the tiny families stand for: GLM-Edge writes "<|assistant|>" after
# the chat whatever add_generation_prompt says, Gemma 3 folds the system text into the first user turn,
# Qwen2.5 writes a default system message when the chat has none; and a base model has no template.
GLM_EDGE = (
    "{% for item in messages %}{% if item['role'] == 'system' %}<|system|>\n{{ item['content'] }}"
    "{% elif item['role'] == 'user' %}<|user|>\n{{ item['content'] }}{% elif item['role'] == 'assistant' %}"
    "<|assistant|>\n{{ item['content'] }}{% endif %}{% endfor %}<|assistant|>"
)
GEMMA3_FOLD = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for m in loop_messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
    "m['role'] }}\n{{ first if loop.first else '' }}{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN25_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a \"helpful\" assistant {{ '{{' }}"
    " \\ 助手.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPES = {
    "glm-edge": ("tiny", GLM_EDGE),
    "gemma3-system-fold": ("tiny-gemma3", GEMMA3_FOLD),
    "qwen2.5-default-system": ("tiny-qwen2", QWEN25_DEFAULT),
    "no-template": ("tiny-llama", None),
}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, chats) -> what Go's text/template writes for each chat, as Ollama runs it;
    the renderer is built once per module. A skip naming Go where there is none (REQUIRE_GO=1: a failure)."""
    go = shutil.which("go")
    if go is None:
        why = "no Go compiler here for the Ollama TEMPLATE tests (apt-get install golang-go)"
        if os.environ.get("REQUIRE_GO", "0") not in ("", "0"):
            pytest.fail(f"REQUIRE_GO=1: {why}", pytrace=False)
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("go-render")
    (folder / "render.go").write_text(GO_RENDERER)
    subprocess.run(
        [go, "build", "-o", str(folder / "render"), "render.go"],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=600,
    )

    def render(template: str, chats: list[list[dict[str, str]]]) -> list[str]:
        cases = [{"template": template, "messages": c} for c in chats]
        proc = subprocess.run(
            [str(folder / "render")], input=json.dumps(cases), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"Go rejected the template: {proc.stderr}\n{template}"
        return json.loads(proc.stdout)

    return render


@pytest.fixture(scope="module")
def tokenizer():
    """tokenizer(family, chat_template=...) -> a tiny family's tokenizer (built once; a copy when the
    template is replaced)."""
    from app.models.tiny import build_tokenizer

    built: dict = {}

    def get(name: str, **template):
        if name not in built:
            built[name] = build_tokenizer(name)
        if not template:
            return built[name]
        tok = copy.deepcopy(built[name])
        tok.chat_template = template["chat_template"]
        return tok

    return get


def _chats() -> list[list[dict[str, str]]]:
    with_system = [{"role": "system", "content": SYSTEM}] + CHAT
    return [CHAT, with_system, CHAT[:1], with_system[:2]]


def _template_in(modelfile: str) -> str:
    """TEMPLATE as Ollama's Modelfile parser reads it: from the opening triple quote to the first closing
    one that whitespace follows."""
    found = re.search(r'^TEMPLATE """(.*?)"""(?=\s)', modelfile, re.S | re.M)
    assert found, modelfile
    return found.group(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_modelfile_template_writes_the_training_prompt_byte_for_byte(family, tokenizer, go_render):
    from app.data.encode import prompt_text
    from app.inference.modelfile import modelfile_text

    tok = tokenizer(family)
    template = _template_in(modelfile_text("model-q4_k_m.gguf", tok, [], None, {}))
    chats = _chats()
    for chat, got in zip(chats, go_render(template, chats), strict=True):
        assert got == prompt_text(tok, chat), f"{family}, {len(chat)} messages:\n{template}"


@pytest.mark.parametrize("shape", SHAPES)
def test_templates_shaped_like_the_real_families_are_derived_not_looked_up(shape, tokenizer, go_render):
    from app.data.encode import prompt_text
    from app.inference.modelfile import ollama_template

    family, chat_template = SHAPES[shape]
    tok = tokenizer(family, chat_template=chat_template)
    chats = _chats()
    for chat, got in zip(chats, go_render(ollama_template(tok), chats), strict=True):
        assert got == prompt_text(tok, chat), f"{shape}, {len(chat)} messages"


@pytest.mark.parametrize("shape", ("tiny-qwen2", "glm-edge"))
def test_a_final_assistant_message_continues_the_training_text(shape, tokenizer, go_render):
    """Ollama's prefill: a chat ending with a partial answer renders as training wrote prompt + answer
    (GLM-Edge's history turns open with "<|assistant|>\n", its generation prompt with "<|assistant|>")."""
    from app.data.encode import prompt_text
    from app.inference.modelfile import ollama_template

    tok = tokenizer(SHAPES[shape][0], chat_template=SHAPES[shape][1]) if shape in SHAPES else tokenizer(shape)
    partial = {"role": "assistant", "content": '[{"subject": "周'}
    got = go_render(ollama_template(tok), [CHAT + [partial]])[0]
    assert got == prompt_text(tok, CHAT) + partial["content"]


def test_the_system_prompt_goes_where_training_put_it(tokenizer, go_render):
    """SYSTEM in the Modelfile: Ollama sends it as the chat's first message."""
    from app.data.encode import prompt_text
    from app.inference.modelfile import modelfile_text

    tok = tokenizer("tiny-qwen3")
    text = modelfile_text("model-q8_0.gguf", tok, [], SYSTEM, {})
    assert f'\nSYSTEM """{SYSTEM}"""\n' in text
    chat = [{"role": "system", "content": SYSTEM}] + CHAT
    assert go_render(_template_in(text), [chat])[0] == prompt_text(tok, chat)


def test_a_bos_the_runtime_adds_is_not_written_twice(tokenizer, go_render):
    from app.core.errors import UserError
    from app.data.encode import prompt_text
    from app.inference.modelfile import ollama_template

    tok = tokenizer("tiny-llama")
    got = go_render(ollama_template(tok, runtime_bos=tok.bos_token), [CHAT])[0]
    assert tok.bos_token + got == prompt_text(tok, CHAT) and not got.startswith(tok.bos_token)
    with pytest.raises(UserError, match="add_bos_token"):
        ollama_template(tokenizer("tiny-qwen2"), runtime_bos="<|endoftext|>")  # training never wrote it


def test_the_stop_lines_are_every_eos_the_run_trained_with(tiny_glm_dir, glm_tok, tiny_qwen2_dir, qwen2_tok):
    from app.inference.modelfile import modelfile_text, stop_tokens
    from app.models.tiny import FAMILIES as TINY

    for name, folder, tok in (("tiny", tiny_glm_dir, glm_tok), ("tiny-qwen2", tiny_qwen2_dir, qwen2_tok)):
        stop = stop_tokens(tok, folder)
        assert stop == list(dict.fromkeys((TINY[name].eos, *TINY[name].stop)))
        text = modelfile_text("model-q4_k_m.gguf", tok, stop, None, {"num_ctx": 2048})
        lines = text.splitlines()
        assert "FROM ./model-q4_k_m.gguf" in lines
        assert [x for x in lines if x.startswith("PARAMETER stop ")] == [f'PARAMETER stop "{t}"' for t in stop]
        assert "PARAMETER temperature 0" in lines and "PARAMETER num_ctx 2048" in lines
        assert not any(x.startswith("SYSTEM") for x in lines)
    assert "PARAMETER temperature 0.7" in modelfile_text("m.gguf", qwen2_tok, [], None, {"temperature": 0.7})


BAD_TEMPLATES = {
    "numbers its turns": "{% for m in messages %}<turn {{ loop.index }}>{{ m['content'] }}{% endfor %}<turn>",
    "keeps only the last message": "<|user|>\n{{ messages[-1]['content'] }}<|assistant|>\n",
    "writes the chat backwards": "{% for m in messages|reverse %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}",
    # these two pass the sentinel chats; only the probe chats (JSON, five messages) show them
    "rewrites the quotes in JSON": "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{{ m['content'] | replace('\"', \"'\") }}{% endfor %}<|assistant|>\n",
    "marks turns after the fourth": "{% for m in messages %}{% if loop.index > 4 %}<late>{% endif %}<|{{ m['role'] }}|>"
    "\n{{ m['content'] }}{% endfor %}<|assistant|>\n",
}


@pytest.mark.parametrize("why", BAD_TEMPLATES)
def test_a_template_that_rewrites_the_chat_is_refused_in_one_line(why, tokenizer):
    from app.core.errors import UserError
    from app.inference.modelfile import modelfile_text

    tok = tokenizer("tiny", chat_template=BAD_TEMPLATES[why])
    with pytest.raises(UserError) as e:
        modelfile_text("model-q4_k_m.gguf", tok, [], None, {})
    assert "\n" not in str(e.value) and "chat template" in str(e.value) and "llama.cpp" in str(e.value)


def test_a_template_that_fails_on_a_system_message_is_written_without_system(tokenizer, go_render, caplog):
    """A template that breaks on a system message in its own way (here a TypeError, not raise_exception) has
    no system role: the export still writes the chats without one and says so, instead of refusing."""
    from app.data.encode import prompt_text
    from app.inference.modelfile import ollama_template

    tok = tokenizer(
        "tiny",
        chat_template="{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + 1 }}{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    )
    with caplog.at_level(logging.INFO, logger="app"):
        template = ollama_template(tok)
    assert "chat template has no system role" in caplog.text
    chats = [c for c in _chats() if c[0]["role"] != "system"]
    assert go_render(template, chats) == [prompt_text(tok, c) for c in chats]


def test_a_template_that_strips_messages_is_written_and_says_so(tokenizer, go_render, caplog):
    """Llama 3 and Gemma templates trim each message, which a Go template cannot: the chats training saw
    still match, and the export says that padded messages will not."""
    from app.data.encode import prompt_text
    from app.inference.modelfile import ollama_template

    tok = tokenizer(
        "tiny-qwen2", chat_template=QWEN25_DEFAULT.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    )
    template = ollama_template(tok)
    assert "strips spaces around each message" in caplog.text
    chats = _chats()
    assert go_render(template, chats) == [prompt_text(tok, c) for c in chats]


def test_what_the_modelfile_syntax_cannot_hold_is_refused(tokenizer):
    from app.core.errors import UserError
    from app.inference.modelfile import modelfile_text

    tok = tokenizer("tiny")
    with pytest.raises(UserError, match="system prompt"):
        modelfile_text("m.gguf", tok, [], 'say """hi"""', {})
    with pytest.raises(UserError, match="stop token"):
        modelfile_text("m.gguf", tok, ['<|"end|>'], None, {})


def test_the_readme_names_the_exact_commands():
    from app.inference.modelfile import readme_text

    text = readme_text("model-q4_k_m.gguf", "Qwen2-LoRA", "q4_k_m", system="你是 'JSON' 助手")
    assert "llama-cli -m model-q4_k_m.gguf --jinja" in text and "llama-server -m model-q4_k_m.gguf --jinja" in text
    assert "ollama create qwen2-lora -f Modelfile" in text and "ollama run qwen2-lora" in text
    assert "-sys '你是 '\"'\"'JSON'\"'\"' 助手'" in text and "--lora" not in text
    lora = readme_text(
        "model-q4_k_m.gguf", "x", "q4_k_m", adapter_gguf="adapter-f16.gguf", base_gguf="base-q4_k_m.gguf"
    )
    assert "llama-cli -m base-q4_k_m.gguf --lora adapter-f16.gguf" in lora
