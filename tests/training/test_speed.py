"""Speed features that must not change what is learnt (issue 7): packing, precision choice.

Packing: each tiny family's loss on a packed batch equals the token-weighted mean of the same
samples' separate losses, and differs when the packed samples are allowed to see each other (so
the check would catch a mask that is not block-diagonal); a short training run packed and padded
gives the same losses and token counts. Nothing here times anything: bench/bench_speed.py does.
"""

from __future__ import annotations

import pytest
import torch

from app import Config, FineTuner, UserError
from app.data.encode import IGNORE, Collator, PackingCollator
from app.plan.precision import packing_choice, resolve_precision
from app.training.kernels import use_packed_attention


def rows_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(10, vocab - 1, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2 :]})
    return rows


# ---- the collator ------------------------------------------------------------------------------


def test_packing_collator_layout():
    rows = rows_of([37, 12, 25, 9, 30, 3], vocab=100)
    batch = PackingCollator(pad_id=0, row_len=64)(rows)
    ids, labels, pos, keep = batch["input_ids"], batch["labels"], batch["position_ids"], batch["logits_to_keep"]
    assert "attention_mask" not in batch  # transformers packs only without a 2D mask
    assert ids.shape == (2, 64) and int(batch["num_tokens"]) == 116  # 116 tokens: 2 rows of <= 64
    starts = [(r, c) for r in range(ids.shape[0]) for c in range(ids.shape[1]) if pos[r, c] == 0]
    placed = 0
    for r, c in starts:  # every sample sits whole in one row, positions 0..n-1, its own labels
        n = int(pos[r, c:].tolist().index(0, 1)) if 0 in pos[r, c + 1 :].tolist() else ids.shape[1] - c
        match = [x for x in rows if x["input_ids"] == ids[r, c : c + n].tolist()]
        if not match:  # the padded tail: pad tokens without labels
            assert (ids[r, c : c + n] == 0).all() and (labels[r, c : c + n] == IGNORE).all()
            continue
        placed += 1
        assert pos[r, c : c + n].tolist() == list(range(n))
        assert labels[r, c].item() == IGNORE  # never the target of the previous sample's last token
        assert labels[r, c + 1 : c + n].tolist() == match[0]["labels"][1:]
    assert placed == len(rows)
    # logits only where a label follows; their targets in order
    want = labels[:, 1:][labels[:, 1:] != IGNORE]
    assert keep[:, :-1].eq(labels[:, 1:] != IGNORE).all() and not keep[:, -1].any()
    assert torch.equal(batch["shift_labels"], want)
    assert int((Collator(0)(rows)["labels"][:, 1:] != IGNORE).sum()) == len(want)  # same targets as padded


@pytest.mark.parametrize(
    "lengths,row_len,rows",
    [([100, 90, 80, 70, 60, 50, 40, 30], 200, 3), ([300], 256, 1), ([5, 5], 512, 1), ([200] * 4, 256, 4)],
)
def test_packing_balances_rows(lengths, row_len, rows):
    packs = PackingCollator(0, row_len).rows_for(lengths)
    sums = [sum(lengths[i] for i in p) for p in packs]
    assert len(packs) == rows and sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert max(sums) <= max(row_len, max(lengths))
    assert max(sums) - min(sums) <= max(lengths)  # longest-first into the shortest row


# ---- every family: packed loss == token-weighted mean of the separate losses --------------------


@pytest.fixture(scope="module")
def extra_families(tmp_path_factory):
    from app.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("speed-models")
    return {name: build_tiny_model(name, root / name) for name in ("tiny-qwen3", "tiny-gemma3")}


@pytest.mark.parametrize("family", ["glm", "qwen2", "llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed_sdpa"])
def test_packed_loss_is_the_token_weighted_mean_of_separate_losses(family, attn, request, extra_families):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = (
        extra_families[f"tiny-{family}"]
        if family in ("qwen3", "gemma3")
        else request.getfixturevalue(
            {"glm": "tiny_glm_dir", "qwen2": "tiny_qwen2_dir", "llama": "tiny_llama_dir"}[family]
        )
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa" if attn == "packed_sdpa" else attn)
    if attn == "packed_sdpa":  # what training uses: SDPA per packed sample, from packed_seq_lens
        assert use_packed_attention(base) and base.config._attn_implementation == "packed_sdpa"
    base.config.use_cache = False  # as in training: a KV cache would turn the packed-sequence mask off
    assert packing_choice(Config.from_dict({"MODEL_NAME": "x"}), base.config.model_type)[0]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    rows = rows_of([37, 12, 25, 9, 30], vocab=base.config.vocab_size)
    with torch.no_grad():
        packed = PackingCollator(0, 64)(rows)
        packed.pop("num_tokens")
        assert packed["input_ids"].shape[0] < len(rows)  # really several samples per row
        loss = model(**packed).loss.item()
        if attn == "packed_sdpa":  # the per-sample path really ran: a whole-row causal mask changes nothing
            whole_row = model(**packed, attention_mask=torch.ones_like(packed["input_ids"])).loss.item()
            assert whole_row == pytest.approx(loss, rel=1e-5, abs=1e-6)
        total = count = 0
        for r in rows:
            n = sum(lab != IGNORE for lab in r["labels"][1:])
            total += model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item() * n
            count += n
        # the same rows with one causal mask over the whole row: samples see their neighbours
        same = {k: packed[k] for k in ("input_ids", "position_ids")}
        isolated = model(**same).logits
        leaky = model(**same, attention_mask=torch.ones_like(same["input_ids"])).logits
        leaky_loss = model(**same, labels=packed["labels"], attention_mask=torch.ones_like(same["input_ids"])).loss
    assert loss == pytest.approx(total / count, rel=1e-5, abs=1e-6)
    # the check can tell a leaking mask from the right one (a random tiny model's loss hardly moves)
    assert (leaky - isolated).abs().max() > 1e-2 and leaky_loss.item() != pytest.approx(loss, rel=1e-5, abs=1e-6)


# ---- training: packed == padded ----------------------------------------------------------------


def test_packed_training_equals_padded_training(tiny_glm_dir, tmp_path, monkeypatch, read_metrics, write_dataset):
    """LORA_DROPOUT=0 (dropout masks follow the tensor shape): the same losses, eval losses and
    real-token counts step by step, packed and padded."""
    write_dataset(tmp_path / "data", n_train=40, n_dev=4, seed=1)
    monkeypatch.chdir(tmp_path)
    runs = {}
    for packing in ("on", "off"):
        out = tmp_path / packing
        cfg = Config.from_dict(
            {
                "MODEL_NAME": str(tiny_glm_dir),
                "DATA_PATH": str(tmp_path / "data" / "train.jsonl"),
                "OUTPUT_DIR": str(out),
                "MAX_SAMPLES": 24,
                "MAX_STEPS": 4,
                "BATCH_SIZE": 4,
                "GRAD_ACCUM": 2,
                "LEARNING_RATE": 1e-2,
                "WARMUP_RATIO": 0,
                "LOGGING_STEPS": 1,
                "EVAL_STEPS": 4,
                "SAVE_STEPS": 100,
                "MAX_SEQ_LEN": 256,
                "SEED": 0,
                "NUM_THREADS": 2,
                "QUANT_LEVEL": "none",
                "PRECISION": "fp32",
                "LORA_DROPOUT": 0,
                "PACKING": packing,
            }
        )
        FineTuner(cfg).run()
        runs[packing] = read_metrics(out)
    for key in ("loss", "eval_loss", "tokens_seen"):
        got = [r[key] for r in runs["on"] if key in r]
        want = [r[key] for r in runs["off"] if key in r]
        assert got and got == pytest.approx(want, rel=1e-5), key


# ---- choices -------------------------------------------------------------------------------------


def config_with(**kw):
    return Config.from_dict({"MODEL_NAME": "x", **kw})


def test_packing_choice():
    assert packing_choice(config_with(), "qwen2") == (True, "native model code, no prefixes")
    assert packing_choice(config_with(PACKING="off"), "qwen2")[0] is False
    assert packing_choice(config_with(METHOD="ptuning"), "glm")[0] is False
    assert packing_choice(config_with(TRUST_REMOTE_CODE="true"), "chatglm")[0] is False
    assert packing_choice(config_with(), "gpt2")[0] is False
    pack, why = packing_choice(config_with(TORCH_COMPILE="true"), "qwen2")
    assert pack is False and why.startswith("TORCH_COMPILE=true")
    with pytest.raises(UserError, match="PACKING=on: TORCH_COMPILE=true"):
        packing_choice(config_with(PACKING="on", TORCH_COMPILE="true"), "qwen2")
    with pytest.raises(UserError, match="PACKING=on: .*'gpt2'"):
        packing_choice(config_with(PACKING="on"), "gpt2")
    with pytest.raises(UserError, match="PACKING=on"):
        Config.from_dict({"MODEL_NAME": "x", "PACKING": "on", "METHOD": "ptuning"}).validate()


def test_precision_choice(monkeypatch):
    import app.models.quantization as q

    for fast in (True, False):
        monkeypatch.setattr(q, "bf16_supported", lambda cuda, fast=fast: fast)
        assert resolve_precision(config_with(), cuda=False) == ("bf16" if fast else "fp32")
        assert resolve_precision(config_with(QUANT_LEVEL="4bit"), cuda=False) == "fp32"  # its layers pick their dtype
        assert resolve_precision(config_with(), cuda=True) == ("bf16" if fast else "fp16")
        assert resolve_precision(config_with(PRECISION="fp32"), cuda=False) == "fp32"
    with pytest.raises(UserError, match="PRECISION=bf16"):
        resolve_precision(config_with(PRECISION="bf16"), cuda=False)
    with pytest.raises(UserError, match="PRECISION=fp16"):
        resolve_precision(config_with(PRECISION="fp16"), cuda=False)


def test_fast_lora_dropout_is_dropout():
    """Kept with probability 1 - p, scaled by 1 / (1 - p), the same mask in backward, identity in eval."""
    from peft import LoraConfig, get_peft_model

    from app.training.kernels import fast_dropout_class, fast_lora_dropout

    torch.manual_seed(0)
    drop = fast_dropout_class()(0.05).train()
    x = (torch.rand(400, 500) + 1).requires_grad_()
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.95, abs=0.003)
    assert torch.allclose(y[kept], x[kept] / 0.95)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.95))
    assert drop.eval()(x) is x

    lin = torch.nn.Sequential()
    lin.add_module("q_proj", torch.nn.Linear(8, 8))
    model = get_peft_model(lin, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1))
    assert fast_lora_dropout(model) == 1
    assert [type(m).__name__ for m in model.modules() if "Dropout" in type(m).__name__] == ["FastDropout"]
