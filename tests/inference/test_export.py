"""ONNX export: a trained tiny GLM and Qwen2 adapter is merged and exported; ONNX Runtime must give
PyTorch's logits (prompt and a KV-cached decode step) and PyTorch's greedy tokens, batched and
streamed, and `predict` must run on the export from the command line."""

import numpy as np
import pytest
import torch

from app import Config, FineTuner, UserError
from app.data.encode import prompt_text
from app.inference.export import run_export
from app.inference.onnx_model import OnnxCausalLM
from app.models.artifacts import is_onnx_dir

PROMPTS = ["《星河往事》是由林远执导的电视剧。", "Extract every triplet: The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen2"])
def exported(request, data_dir, tmp_path_factory):
    """(merged PyTorch model, ONNX dir, tokenizer, base model dir) for a LoRA adapter trained 2 steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = request.getfixturevalue("tiny_glm_dir" if request.param == "tiny" else "tiny_qwen2_dir")
    work = tmp_path_factory.mktemp(f"export-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # models/.last_run goes there, not into the checkout
        FineTuner(
            Config.from_dict(
                {
                    "MODEL_NAME": str(base),
                    "DATA_PATH": str(data_dir / "train.jsonl"),
                    "OUTPUT_DIR": str(work / "out"),
                    "MAX_STEPS": 2,
                    "GRAD_ACCUM": 1,
                    "BATCH_SIZE": 2,
                    "TIER": "none",
                    "SEED": 0,
                    "VAL_SIZE": 0,
                    "MAX_SAMPLES": 8,
                    "LEARNING_RATE": 1e-2,
                    "QUANT_LEVEL": "none",
                }
            )
        ).run()
        onnx_dir = run_export(Config.from_dict({"ADAPTER_DIR": str(work / "out")}))
    merged_dir = work / "out" / "merged"
    assert onnx_dir == merged_dir / "onnx" and is_onnx_dir(onnx_dir)  # merged first, exported inside
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    return merged, onnx_dir, AutoTokenizer.from_pretrained(onnx_dir), base


def encode(tok, prompts, **kw):
    texts = [prompt_text(tok, [{"role": "user", "content": p}]) for p in prompts]
    return tok(texts, return_tensors="pt", add_special_tokens=False, **kw)


def test_prompt_and_cached_decode_logits_match_pytorch(exported):
    from transformers import AutoModelForCausalLM

    merged, onnx_dir, tok, base = exported
    ort = OnnxCausalLM(onnx_dir)
    ids = encode(tok, PROMPTS[:1])["input_ids"]
    with torch.no_grad():
        ref = merged(input_ids=ids, use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        ref_step = merged(input_ids=nxt, past_key_values=ref.past_key_values, use_cache=True).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
    logits, past = ort.forward(ids.numpy(), keep_all=True)
    assert logits.shape == tuple(ref.logits.shape)
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    assert len(past) == 2 * len(ref.past_key_values.layers) and past[0].shape[2] == ids.shape[1]
    step, past2 = ort.forward(nxt.numpy(), past=past)  # one token on the KV cache: last-position logits only
    assert step.shape == (1, 1, ref_step.shape[-1]) and past2[0].shape[2] == ids.shape[1] + 1
    np.testing.assert_allclose(step, ref_step.numpy(), atol=1e-4, rtol=0)
    # it is the merged adapter that was exported, not the base model
    assert np.abs(logits - base_logits.numpy()).max() > 1e-3
    assert torch.allclose(ort(ids).logits, ref.logits, atol=1e-4)


def test_greedy_generation_matches_pytorch_batched_and_with_stop_tokens(exported):
    merged, onnx_dir, tok, _ = exported
    ort = OnnxCausalLM(onnx_dir)
    tok.padding_side = "left"
    enc = encode(tok, PROMPTS, padding=True)  # two prompts of different lengths: left padding
    assert (enc["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = merged.generate(**enc, **kw, output_logits=True, return_dict_in_generate=True)
    steps, run = [], ort.forward

    def spy(*args, **kwargs):  # record ORT's next-token logits at every step
        logits, past = run(*args, **kwargs)
        steps.append(logits[:, -1])
        return logits, past

    ort.forward = spy
    out = ort.generate(**enc, **kw)
    assert out.shape[1] > enc["input_ids"].shape[1] and torch.equal(out, ref.sequences)
    # random tiny models' argmax barely depends on the context, so compare every step's logits too
    # (this is what catches wrong positions or masks for the padded row, or a stale cache)
    np.testing.assert_allclose(np.stack(steps), torch.stack(ref.logits).numpy(), atol=1e-4, rtol=0)
    # a token greedy reaches mid-way, made a stop token: both stop at its first occurrence
    one = encode(tok, PROMPTS[:1])
    with torch.no_grad():
        free = merged.generate(**one, max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=0)
    stop = int(free[0, one["input_ids"].shape[1] + 5])
    with torch.no_grad():
        ref = merged.generate(**one, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=0)
    out = ort.generate(**one, max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(out, ref) and out.shape[1] <= one["input_ids"].shape[1] + 6 and int(out[0, -1]) == stop


def test_sampling_and_streaming(exported):
    from transformers import TextStreamer

    _, onnx_dir, tok, _ = exported
    ort = OnnxCausalLM(onnx_dir)
    one = encode(tok, PROMPTS[:1])
    torch.manual_seed(0)
    a = ort.generate(**one, max_new_tokens=8, do_sample=True, temperature=1.0, eos_token_id=[])
    torch.manual_seed(0)
    b = ort.generate(**one, max_new_tokens=8, do_sample=True, temperature=1.0, eos_token_id=[])
    greedy = ort.generate(**one, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(a, b) and a.shape == greedy.shape and not torch.equal(a, greedy)  # seeded, not greedy

    seen = []

    class Capture(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            seen.append(text)

    out = ort.generate(**one, max_new_tokens=8, eos_token_id=[], streamer=Capture(tok, skip_prompt=True))
    assert "".join(seen) == tok.decode(out[0, one["input_ids"].shape[1] :])


def test_predict_runs_on_the_export_from_the_command_line(exported, run_app):
    from app.inference.predict import Predictor

    _, onnx_dir, _, _ = exported
    proc = run_app(["predict", f"ADAPTER_DIR={onnx_dir}", f"PROMPT={PROMPTS[0]}", "MAX_NEW_TOKENS=10"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ONNX Runtime" in proc.stderr
    answer = proc.stdout.split("---\n", 1)[1].strip()
    # the same answer as PyTorch on the merged model
    torch_pred = Predictor(Config.from_dict({"ADAPTER_DIR": str(onnx_dir.parent), "MAX_NEW_TOKENS": 10}))
    assert answer and answer == torch_pred.generate([{"role": "user", "content": PROMPTS[0]}]).strip()


def test_exporting_an_export_names_the_fix(exported):
    _, onnx_dir, _, _ = exported
    with pytest.raises(UserError, match="already an ONNX export"):
        run_export(Config.from_dict({"ADAPTER_DIR": str(onnx_dir)}))


def test_a_ptuning_adapter_is_refused_with_the_reason(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING", "base_model_name_or_path": "x"}')
    with pytest.raises(UserError, match="METHOD=ptuning.*cannot be merged"):
        run_export(Config.from_dict({"ADAPTER_DIR": str(tmp_path)}))
    assert not (tmp_path / "merged").exists()
