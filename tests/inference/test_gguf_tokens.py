"""llama.cpp tokenizes as the HF tokenizer does, for every tiny family: the GGUF's vocabulary (llama.cpp's own
converter, told the tiny tokenizers' pre-tokenizer by app.inference.gguf_convert) turns the rendered prompts of
Chinese, English and JSON text into the same token ids. Ollama and llama-cli tokenize prompts themselves, so
this is what makes their answers the trained model's (INFER_BACKEND=llama.cpp passes the HF tokenizer's ids)."""

from __future__ import annotations

import pytest

from app.data.encode import prompt_text

FAMILIES = ("tiny", "tiny-qwen2", "tiny-qwen3", "tiny-llama", "tiny-gemma3")
TEXTS = (
    "《星河往事》是由林远执导，陈雨桐、周景行主演的电视剧，2019年在北京首播。",
    "句子中包含了哪些信息，输出json：\n\n张三出生于上海，毕业于复旦大学。",
    "Extract every subject, predicate and object triplet from the sentence and answer in JSON.",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 -- isn't it?  Two  spaces\ttab\n\nlines",
    '[{"subject": "星河往事", "predicate": "导演", "object": "林远"}, {"subject": "A", "object": [1, 22, 333]}]',
    "混合 mixed 文本 with 数字 12345 and emoji 🚀 and Ünïcödé",
)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_gives_the_hf_tokenizers_ids(family, llamacpp, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    from app.inference import llamacpp as lcpp
    from app.models.tiny import build_tiny_model

    model = build_tiny_model(family, tmp_path / family)
    tok = AutoTokenizer.from_pretrained(model)
    vocab = tmp_path / "vocab.gguf"
    lcpp.convert(model, vocab, "f16", tmp_path / "convert.log", vocab_only=True)
    llm = llama_cpp.Llama(str(vocab), vocab_only=True, verbose=False)
    differ = []
    for text in TEXTS:
        for shown in (
            text,
            prompt_text(tok, [{"role": "user", "content": text}]),
            prompt_text(
                tok,
                [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": "继续 go on"},
                ],
            ),
        ):
            want = tok(shown, add_special_tokens=False)["input_ids"]
            have = llm.tokenize(shown.encode("utf-8"), add_bos=False, special=True)
            if have != want:
                differ.append((shown[:40], want[:12], have[:12]))
    assert not differ, f"{family}: llama.cpp tokenizes {len(differ)} texts differently: {differ[:3]}"
