"""Quantized LoRA gives the right gradients, also after an eval pass and a generate call.

Reference: the same family's model in fp32 whose linear weights are replaced by the
*dequantized* 4-bit/8-bit weights, with identical LoRA weights. Gradients of every LoRA
tensor must point the same way (cosine >= 0.99). Without app.models.quantization's CPU fix the
4-bit case fails here ("a view of a leaf Variable…" or silently wrong gradients).
"""

from pathlib import Path

import pytest
import torch

from app.models.loading import load_model
from app.models.quantization import prepare_for_training, stored_bytes

FAMILIES = ["tiny_glm_dir", "tiny_qwen2_dir", "tiny_llama_dir"]
SMALL_SHAPE = dict(
    total_params=60_000,
    linear_params=40_000,
    other_params=20_000,
    max_linear=8192,
    lora_io=768,
    linear_in=512,
    layers=2,
    hidden=64,
    intermediate=128,
    vocab=100,
    heads=4,
    max_positions=64,
)  # an app.plan.estimator.ModelShape


def dequantized_weight(module):
    import bitsandbytes.functional as F

    w = module.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:  # Linear4bit
        return F.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float() * w.SCB.float().unsqueeze(1) / 127.0  # Linear8bitLt: int8 rows x row scale


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        ),
    )
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without gradient
            torch.nn.init.normal_(p, std=0.05)
    return pm


def lora_grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("level", ["4bit", "8bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_lora_gradients_match_dequantized_reference_after_eval(family, level, request):
    model_dir = request.getfixturevalue(family)
    quant = prepare_for_training(load_model(str(model_dir), quant=level), level, gradient_checkpointing=False)
    qtypes = {type(m).__name__ for m in quant.modules()}
    assert ("Linear4bit" if level == "4bit" else "Linear8bitLt") in qtypes

    ref = load_model(str(model_dir))
    qmods = dict(quant.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if type(qmods.get(name)).__name__ in ("Linear4bit", "Linear8bitLt"):
                mod.weight.copy_(dequantized_weight(qmods[name]))
    quant, ref = lora(quant), lora(ref)
    ref.load_state_dict({k: v for k, v in quant.state_dict().items() if "lora_" in k}, strict=False)

    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    # What training with evaluation does between steps: eval forward, then a generate call.
    quant.eval()
    with torch.no_grad():
        quant(input_ids=ids)
    with torch.inference_mode():
        quant.generate(input_ids=ids[:1, :6], max_new_tokens=3, do_sample=False)

    got, want = lora_grads(quant, ids), lora_grads(ref, ids)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
        assert cos >= 0.99, f"{name}: cosine {cos:.4f}"


def test_stored_bytes_shrink_with_quantization(tiny_qwen2_dir):
    full = stored_bytes(load_model(str(tiny_qwen2_dir)))
    q8 = stored_bytes(load_model(str(tiny_qwen2_dir), quant="8bit"))
    q4 = stored_bytes(load_model(str(tiny_qwen2_dir), quant="4bit"))
    # The tiny model is embedding-heavy (vocab 3000 x 64 twice vs. 2 small layers), so only the
    # layers shrink: check the order and that the linear part really is smaller.
    assert q4 < q8 < full
    model = load_model(str(tiny_qwen2_dir))
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    assert full - q4 > linear * 4 * 0.8  # at least ~80% of fp32 linear bytes saved


def _mapped(path) -> bool:
    name = str(Path(path).resolve())
    with open("/proc/self/maps") as fh:
        return any(name in line for line in fh)


@pytest.mark.parametrize("level", ["4bit", "8bit", "none"])
def test_quantized_load_leaves_no_checkpoint_mapped(tiny_llama_dir, level):
    """A quantized model must not keep the fp32 checkpoint's pages resident (they would count in
    RSS next to the quantized copy); an unquantized one uses the mapping zero-copy, as it should."""
    ckpt = Path(tiny_llama_dir) / "model.safetensors"
    model = load_model(str(tiny_llama_dir), quant=level)
    assert _mapped(ckpt) == (level == "none")
    del model


@pytest.mark.parametrize("level", ["4bit", "8bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_embeddings_stay_bf16_and_train_like_the_fp32_reference(family, level, request):
    """The 6B-in-8-GB lever (bench/scale.md): a CPU k-bit model loaded in bf16 keeps its embeddings and
    head in bf16 (peft would upcast them: 2 GB at ChatGLM3-6B's vocabulary), the norms still go to fp32,
    nothing keeps an fp32 copy, and the LoRA gradients and loss are the fp32-embedding model's."""
    model_dir = request.getfixturevalue(family)
    half = prepare_for_training(
        load_model(str(model_dir), quant=level, bf16=True), level, gradient_checkpointing=True, half_embeddings=True
    )
    upcast = prepare_for_training(
        load_model(str(model_dir), quant=level, bf16=True), level, gradient_checkpointing=True
    )
    emb, head = half.get_input_embeddings().weight, half.get_output_embeddings().weight
    assert emb.dtype == head.dtype == torch.bfloat16
    assert upcast.get_input_embeddings().weight.dtype == torch.float32  # what peft alone does
    norms = [p for n, p in half.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    saved = (emb.numel() + head.numel()) * 2  # bytes: bf16 instead of fp32
    assert stored_bytes(upcast) - stored_bytes(half) == saved

    ref = load_model(str(model_dir))  # fp32 everywhere, with the quantized model's exact values
    qmods = dict(half.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if type(qmods.get(name)).__name__ in ("Linear4bit", "Linear8bitLt"):
                mod.weight.copy_(dequantized_weight(qmods[name]))
                if mod.bias is not None:
                    mod.bias.copy_(qmods[name].bias.float())
        ref.get_input_embeddings().weight.copy_(emb.float())
        ref.get_output_embeddings().weight.copy_(head.float())
    half, ref = lora(half), lora(ref)
    ref.load_state_dict({k: v for k, v in half.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    got, want = lora_grads(half, ids), lora_grads(ref, ids)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
        assert cos >= 0.99, f"{name}: cosine {cos:.4f}"
    with torch.no_grad():
        a, b = half(input_ids=ids, labels=ids).loss.item(), ref(input_ids=ids, labels=ids).loss.item()
    assert abs(a - b) / b < 0.01, (a, b)


@pytest.mark.parametrize(
    ("precision", "bf16_gpu", "want"),
    [("bf16", True, "bfloat16"), ("auto", True, "bfloat16"), ("fp32", True, "float32"), ("fp16", False, "float32")],
)
def test_a_gpu_run_stores_weights_in_bf16_unless_precision_is_fp32(monkeypatch, precision, bf16_gpu, want):
    """PRECISION=fp32 promises fp32 compute: on a GPU the weights used to load in bf16 whatever it said (the base's
    matmuls then ran in bf16). The estimator counts the same bytes the loader stores."""
    from app.models import quantization
    from app.plan.estimator import ModelShape, estimate

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert quantization.load_dtype(False, True, precision) == getattr(torch, want)
    assert quantization.load_dtype(False, False, precision) == torch.float32  # a CPU's default stays fp32
    assert quantization.load_dtype(False, True) == (torch.bfloat16 if bf16_gpu else torch.float32)  # inference
    shape = ModelShape(**SMALL_SHAPE)
    fp32 = not quantization.gpu_weights_bf16(precision)
    gpu = estimate(shape, "none", 8, 1, 64, False, cuda=True, fp32_weights=fp32)
    cpu = estimate(shape, "none", 8, 1, 64, False)
    assert gpu.weights_mb == pytest.approx(cpu.weights_mb / (1 if want == "float32" else 2))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_full_tuning_on_a_bf16_gpu_keeps_fp32_master_weights(monkeypatch, method):
    """METHOD=full trains the weights themselves: on a bf16 GPU they used to load in bf16, so AdamW stepped bf16
    weights (and kept bf16 moments), losing every step below ~2**-9 of a weight. Full tuning now keeps them fp32
    under bf16 autocast, frozen weights stay bf16, and the plan's estimate counts the bytes the loader stores."""
    from app.config import Config
    from app.models import quantization
    from app.plan.estimator import ModelShape
    from app.plan.peak import predict_peak

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    full = method == "full"
    want = torch.float32 if full else torch.bfloat16
    for precision in ("auto", "bf16"):
        assert quantization.load_dtype(False, True, precision, trains_all=full) == want
    assert quantization.load_dtype(False, True, "bf16") == torch.bfloat16  # inference, and a full run's reference
    shape = ModelShape(**SMALL_SHAPE)
    cfg = Config.from_dict({"MODEL_NAME": "tiny", "METHOD": method, "QUANT_LEVEL": "none", "PRECISION": "bf16"})
    weights_mb = predict_peak(cfg, shape, cuda=True).weights_mb
    assert weights_mb == pytest.approx(shape.total_params * (4 if full else 2) / 2**20)
