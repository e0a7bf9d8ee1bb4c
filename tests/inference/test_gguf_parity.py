"""The GGUF answers as the trained model does: for every family's tiny model with a LoRA adapter (random, so the
merge changes every target weight), `export-gguf` at f16, q8_0 and q4_k_m, and llama.cpp's next-token logits
compared with the torch backend's merged model along its greedy answer (32 new tokens, 5 prompts: Chinese,
English, JSON). A mismatch at f16 is allowed only where torch's top two logits are within 1e-3 (a tie that
float rounding may break either way); q8_0 agrees on >= 95% of tokens; q4_k_m's mean KL divergence of the
next-token distributions stays under a bound set from measurement. The numbers go to
tests/artifacts/gguf_parity.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FAMILIES = ("tiny", "tiny-qwen2", "tiny-qwen3", "tiny-llama", "tiny-gemma3")
PROMPTS = (
    "《星河往事》是由林远执导，陈雨桐、周景行主演的电视剧，2019年在北京首播。",
    "Extract every subject, predicate and object triplet from the sentence and answer in JSON.",
    '[{"subject": "星河往事", "predicate": "导演", "object": "林远"}]',
    "句子中包含了哪些信息，输出json：张三出生于上海。",
    "The quick brown fox jumps over the lazy dog.",
)
NEW_TOKENS = 32
TIE = 1e-3
Q4_KL_BOUND = 0.01  # mean KL(torch || llama.cpp q4_k_m) per token, nats: measured 0.0008-0.0027 here


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llamacpp, learn_briefly):
    """family -> (base dir, adapter dir): each tiny model trained briefly (learn), and a LoRA of random weights
    on it, saved as training saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.models.tiny import build_tiny_model

    root, out = tmp_path_factory.mktemp("gguf-runs"), {}
    for family in FAMILIES:
        base = build_tiny_model(family, root / family)
        learn_briefly(base, 120)
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules="all-linear"),
        )
        with torch.no_grad():  # random B (PEFT's default is 0): a change of every target weight, of the size
            for name, p in model.named_parameters():  # training gives one (~5% of the weight), not a new model
                if "lora_B" in name:
                    p.mul_(0.05)
        adapter = root / f"{family}-lora"
        model.save_pretrained(adapter)
        AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
        (adapter / "train_config.json").write_text(json.dumps({"MODEL_NAME": str(base), "QUANT_LEVEL": "none"}))
        out[family] = (base, adapter)
    return out


def export(adapter: Path, quant: str, out: Path) -> Path:
    from app.config import Config
    from app.inference.gguf_export import run_export_gguf

    cfg = Config().replace({"ADAPTER_DIR": str(adapter), "GGUF_DIR": str(out), "GGUF_QUANT": quant})
    folder = run_export_gguf(cfg)
    return folder / json.loads((folder / "gguf_info.json").read_text())["file"]


def torch_paths(base: Path, adapter: Path) -> list[tuple[list[int], int, object]]:
    """For each prompt: (prompt + greedy answer ids, prompt length, torch's logits at every answer position)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.data.encode import prompt_text

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().eval()
    paths = []
    for p in PROMPTS:
        ids = tok(prompt_text(tok, [{"role": "user", "content": p}]), add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        with torch.no_grad():  # min_new_tokens: 32 positions to compare even where EOS is likeliest
            path = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            logits = model(path).logits[0, ids.shape[1] - 1 : -1].float()
        paths.append((path[0].tolist(), ids.shape[1], logits))
    return paths


def compare(gguf: Path, paths: list, exact: bool) -> dict:
    """llama.cpp's logits along torch's greedy paths: agreement, ties, real mismatches, mean KL."""
    import numpy as np
    import torch

    from app.inference.llamacpp_model import LlamaCppCausalLM

    lm = LlamaCppCausalLM(gguf, n_seq=1, seq_ctx=512, exact=exact)
    agree = ties = bad = 0
    kls = []
    for path, n_prompt, ref in paths:
        lm.reset()
        got = [lm.prefill(path[:n_prompt])]
        for k in range(NEW_TOKENS - 1):
            got.append(lm.step_logits([path[n_prompt + k]], [n_prompt + k], [0])[0])
        got = torch.from_numpy(np.stack(got))
        for want, have in zip(ref, got, strict=True):
            top2 = torch.topk(want, 2).values
            if int(have.argmax()) == int(want.argmax()):
                agree += 1
            elif float(top2[0] - top2[1]) < TIE:
                ties += 1
            else:
                bad += 1
        kls.append(
            torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
            .sum(-1)
            .mean()
            .item()
        )
    lm.close()
    return {"agree": agree, "ties": ties, "bad": bad, "total": agree + ties + bad, "kl": sum(kls) / len(kls)}


@pytest.fixture(scope="module")
def report(artifacts):
    rows: list[str] = []
    yield rows
    (artifacts / "gguf_parity.md").write_text(
        "| family | GGUF | greedy tokens equal | ties (top-2 < 1e-3) | mismatches | mean KL |\n"
        "|---|---|---|---|---|---|\n" + "".join(rows),
        encoding="utf-8",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_answers_as_the_merged_torch_model(family, trained, tmp_path, report):
    base, adapter = trained[family]
    paths = torch_paths(base, adapter)
    results = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        r = results[quant] = compare(export(adapter, quant, tmp_path / quant), paths, exact=quant == "f16")
        report.append(
            f"| {family} | {quant} | {r['agree']}/{r['total']} | {r['ties']} | {r['bad']} | {r['kl']:.5f} |\n"
        )
    f16, q8, q4 = results["f16"], results["q8_0"], results["q4_k_m"]
    assert f16["bad"] == 0, f"{family} f16: {f16['bad']} greedy tokens differ where torch's top two are >= {TIE} apart"
    assert q8["agree"] >= 0.95 * q8["total"], f"{family} q8_0: {q8}"
    assert q4["kl"] <= Q4_KL_BOUND, f"{family} q4_k_m: {q4}"
