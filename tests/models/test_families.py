"""Every tiny family trains, saves, reloads and predicts through the one training path, with
LoRA targets found automatically and the family's chat template used for prompts and labels."""

import json

import pytest
import torch

from app import Config, FineTuner
from app.inference.predict import Predictor
from app.models.tiny import FAMILIES, build_tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_saves_reloads_and_predicts(family, data_dir, tmp_path, monkeypatch, read_metrics):
    model_dir = build_tiny_model(family, tmp_path / family)
    out = tmp_path / "out"
    cfg = Config.from_dict(
        {
            "MODEL_NAME": str(model_dir),
            "DATA_PATH": str(data_dir / "train.jsonl"),
            "OUTPUT_DIR": str(out),
            "MAX_STEPS": 3,
            "BATCH_SIZE": 2,
            "GRAD_ACCUM": 1,
            "MAX_SAMPLES": 20,
            "TIER": "none",
            "LEARNING_RATE": 1e-2,
            "SEED": 0,
            "LOGGING_STEPS": 1,
            "WARMUP_RATIO": 0,
            # fp32: the reloaded model (fp32 on CPU) must equal the trained one exactly;
            # under bf16 autocast the trained model keeps its frozen weights in bf16
            "PRECISION": "fp32",
        }
    )
    monkeypatch.chdir(tmp_path)
    ft = FineTuner(cfg)
    result = ft.run()
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert {"q_proj", "v_proj", "o_proj", "down_proj"} <= targets and "lm_head" not in targets
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert result.steps == 3 and losses[-1] < losses[0]
    # labels are the answer + the family's end-of-turn token, prompts go through its template
    row = ft.train_rows[0]
    answer = ft.tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])
    assert answer.endswith(FAMILIES[family].eos)
    prompt = ft.tokenizer.decode(row["input_ids"][: row["labels"].index(next(x for x in row["labels"] if x != -100))])
    assert prompt.endswith(
        ft.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
        ).split("x")[-1]
    )
    pred = Predictor(Config.from_dict({"ADAPTER_DIR": str(out), "MAX_NEW_TOKENS": 4}))
    ids = torch.tensor([row["input_ids"]])
    ft.model.eval()
    with torch.no_grad():
        assert torch.equal(pred.model(input_ids=ids).logits, ft.model(input_ids=ids).logits)
    assert isinstance(pred.generate([{"role": "user", "content": "你好"}]), str)


def test_chatglm_style_remote_tokenizer_without_padding_side_is_patched(tmp_path):
    """ChatGLM-6B/2/3's remote code fails on current transformers with "_pad() got an unexpected
    keyword argument 'padding_side'". A local remote-code tokenizer with the same old `_pad`
    reproduces it; after load_tokenizer, padded batches work on both sides."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from app.models.loading import load_tokenizer

    src = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_tokenizer"
    shutil.copytree(src, tmp_path / "legacy")
    raw = AutoTokenizer.from_pretrained(tmp_path / "legacy", trust_remote_code=True)
    with pytest.raises(TypeError, match="padding_side"):
        raw(["ab", "abcd"], padding=True)
    tok = load_tokenizer(str(tmp_path / "legacy"), trust_remote_code=True)
    right = tok(["ab", "abcd"], padding=True)
    assert right["input_ids"][0][2:] == [tok.pad_token_id] * 2 and right["attention_mask"][0] == [1, 1, 0, 0]
    tok.padding_side = "left"
    left = tok(["ab", "abcd"], padding=True)
    assert left["input_ids"][0][:2] == [tok.pad_token_id] * 2 and left["attention_mask"][0] == [0, 0, 1, 1]


def test_known_remote_code_breakage_names_the_fix():
    from app.models.loading import load_error

    err = AttributeError("'ChatGLMForConditionalGeneration' object has no attribute '_extract_past_from_model_output'")
    msg = str(load_error("THUDM/chatglm2-6b", err))
    assert msg.startswith("MODEL_NAME=THUDM/chatglm2-6b:") and "glm-4-9b-chat-hf" in msg and "\n" not in msg
    assert "not found locally" in str(load_error("THUDM/chatglm2-6b", OSError("no such repo")))


def test_a_random_model_can_be_built_and_saved_in_bf16(tmp_path):
    """The GPU tier builds its ~0.5B/1.5B random models in bf16: half the time and disk of fp32."""
    from transformers import AutoModelForCausalLM

    out = build_tiny_model("tiny-qwen2", tmp_path / "m", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(AutoModelForCausalLM.from_pretrained(out, dtype="auto").parameters()).dtype == torch.bfloat16
