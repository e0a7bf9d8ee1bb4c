"""The LoRA variants and NEFTune that LLaMA-Factory and TRL users look for (USE_DORA, USE_RSLORA,
LORA_TARGETS=all-linear, NEFTUNE_ALPHA): each a setting that reaches PEFT or the Trainer, recorded with the run,
and honoured when the adapter is loaded again and merged. Each trains the golden recipe (tests/conftest.py) for
a few steps on the tiny GLM."""

from __future__ import annotations

import json

import pytest

STEPS = 3


@pytest.fixture(scope="module")
def runs(tiny_glm_dir, data_dir, tmp_path_factory, recipe):
    """name -> output dir of a 3-step run: plain LoRA and each variant, the same recipe and seed otherwise."""
    from app.training.train import FineTuner

    variants = {
        "plain": {},
        "dora": {"USE_DORA": True},
        "rslora": {"USE_RSLORA": True},
        "all_linear": {"LORA_TARGETS": "all-linear"},
        "neftune": {"NEFTUNE_ALPHA": 5.0},
    }
    root = tmp_path_factory.mktemp("variants")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # training notes its output in models/.last_run: here, not in the checkout
        for name, extra in variants.items():
            cfg = recipe(tiny_glm_dir, data_dir, root / name, MAX_STEPS=STEPS, EVAL_STEPS=100, SAVE_STEPS=100, **extra)
            FineTuner(cfg).run()
            out[name] = root / name
    return out


def _peft_config(run) -> dict:
    return json.loads((run / "adapter_config.json").read_text())


def _saved(run) -> dict:
    return json.loads((run / "train_config.json").read_text())


def test_each_setting_is_recorded_and_reaches_peft(runs):
    assert _peft_config(runs["dora"])["use_dora"] is True and _saved(runs["dora"])["USE_DORA"] is True
    assert _peft_config(runs["rslora"])["use_rslora"] is True and _saved(runs["rslora"])["USE_RSLORA"] is True
    plain = _peft_config(runs["plain"])
    assert plain["use_dora"] is False and plain["use_rslora"] is False
    assert _saved(runs["neftune"])["NEFTUNE_ALPHA"] == 5.0 and _saved(runs["all_linear"])["LORA_TARGETS"] == [
        "all-linear"
    ]
    # all-linear: PEFT's pick, every linear layer but the head, here the same layers auto-detection takes
    chosen = {name.rsplit(".", 1)[-1] for name in _peft_config(runs["all_linear"])["target_modules"]}
    assert chosen == set(plain["target_modules"]), chosen


def test_a_dora_adapter_holds_its_magnitude_vectors(runs):
    from safetensors import safe_open

    with safe_open(str(runs["dora"] / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    magnitudes = [k for k in keys if "lora_magnitude_vector" in k]
    assert magnitudes and len(magnitudes) == len([k for k in keys if "lora_A" in k]), keys


def test_first_losses_differ_where_they_should_and_match_where_they_should(runs, train_losses):
    """LoRA's B starts at zero, so step 1 sees the base model whatever the scale (rsLoRA, DoRA) or the targets;
    NEFTune adds noise to the embeddings, so its step 1 differs. From step 2 on rsLoRA's larger scale shows."""
    plain = train_losses(runs["plain"])
    for name in ("rslora", "dora", "all_linear"):
        assert train_losses(runs[name])[1] == pytest.approx(plain[1], abs=1e-6), name
    assert abs(train_losses(runs["neftune"])[1] - plain[1]) > 1e-4
    assert abs(train_losses(runs["rslora"])[STEPS] - plain[STEPS]) > 1e-5


@pytest.mark.parametrize("name", ["dora", "rslora", "all_linear"])
def test_the_adapter_reloads_with_peft_and_merges_to_the_same_logits(runs, name, tiny_glm_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.config import Config
    from app.inference.merge import run_merge

    base = AutoModelForCausalLM.from_pretrained(tiny_glm_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, str(runs[name])).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_glm_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-4  # the adapter changes the output: the check below can fail
    merged_dir = run_merge(
        Config.from_dict(
            {
                "ADAPTER_DIR": str(runs[name]),
                "MODEL_NAME": str(tiny_glm_dir),
                "QUANT_LEVEL": "none",
                "MERGED_DIR": str(tmp_path / "merged"),
            }
        )
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["USE_DORA=1", "METHOD=ptuning"],
            "USE_DORA=true is a LoRA variant, but METHOD=ptuning trains no LoRA; "
            "set METHOD=lora or qlora, or USE_DORA=false",
        ),
        (
            ["USE_RSLORA=1", "METHOD=full", "QUANT_LEVEL=none"],
            "USE_RSLORA=true is a LoRA variant, but METHOD=full "
            "trains no LoRA; set METHOD=lora or qlora, or "
            "USE_RSLORA=false",
        ),
        (["NEFTUNE_ALPHA=-1"], "NEFTUNE_ALPHA=-1.0 must be >= 0 (0 = off, e.g. 5)"),
    ],
)
def test_a_variant_that_cannot_apply_is_refused_in_one_line(cli, args, line):
    code, errors, _ = cli("train", "MODEL_NAME=tiny", *args)
    assert code == 2 and errors == [line]


def test_resume_refuses_a_changed_variant(tiny_glm_dir, data_dir, tmp_path, recipe):
    """USE_DORA and USE_RSLORA change the adapter's tensors or scale: a checkpoint of one run cannot continue
    as the other (NEFTUNE_ALPHA may change: it is listed as a change, not refused)."""
    from app.training import resume

    cfg = recipe(tiny_glm_dir, data_dir, tmp_path / "out", MAX_STEPS=4)
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / resume.SETTINGS_FILE).write_text(json.dumps(resume.snapshot(cfg, 1, {})))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    rc = resume.check(cfg.replace({"USE_DORA": "true", "USE_RSLORA": "true", "NEFTUNE_ALPHA": "5"}), ckpt)
    assert rc.differences == ["USE_DORA false -> true", "USE_RSLORA false -> true"], rc.differences
    assert rc.changes == ["NEFTUNE_ALPHA 0.0 -> 5.0"], rc.changes


# ---- LORA_INIT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_adapter_is_saved_as_plain_lora_of_the_unchanged_base(
    init, tiny_glm_dir, data_dir, tmp_path, recipe, monkeypatch, train_losses, runs
):
    """They train on a base whose weights they changed; the saved adapter is converted (rank 2 x LORA_R) so that
    on the original base it gives what the trained model gave, and merges to the same logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.config import Config
    from app.inference.merge import run_merge
    from app.training.train import FineTuner

    monkeypatch.chdir(tmp_path)
    ft = FineTuner(
        recipe(tiny_glm_dir, data_dir, tmp_path / init, MAX_STEPS=STEPS, EVAL_STEPS=2, SAVE_STEPS=100, LORA_INIT=init)
    )
    ft.run()
    saved = _peft_config(tmp_path / init)
    assert saved["r"] == 2 * 8 and saved["init_lora_weights"] is True and _saved(tmp_path / init)["LORA_INIT"] == init
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    trained = ft.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_glm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, str(tmp_path / init)).eval()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-4  # trained: the comparison below can fail
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    merged = AutoModelForCausalLM.from_pretrained(
        run_merge(
            Config.from_dict(
                {"ADAPTER_DIR": str(tmp_path / init), "MODEL_NAME": str(tiny_glm_dir), "QUANT_LEVEL": "none"}
            )
        ),
        dtype=torch.float32,
    ).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)
    # it starts as the base, but its LoRA branch is not zero, so LORA_DROPOUT already changes step 1's loss
    losses, plain_losses = train_losses(tmp_path / init), train_losses(runs["plain"])
    assert abs(losses[1] - plain_losses[1]) > 1e-5 and abs(losses[STEPS] - plain_losses[STEPS]) > 1e-5


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["LORA_INIT=loftq", "QUANT_LEVEL=none"],
            "LORA_INIT=loftq fits LoRA to a 4-bit base's quantization error, but "
            "QUANT_LEVEL=none; set QUANT_LEVEL=4bit (or METHOD=qlora), or another "
            "LORA_INIT",
        ),
        (
            ["LORA_INIT=pissa", "QUANT_LEVEL=8bit"],
            "LORA_INIT=pissa rewrites the base's weights while training, which a "
            "QUANT_LEVEL=8bit base cannot hold exactly; set QUANT_LEVEL=none, or "
            "LORA_INIT=default",
        ),
        (
            ["LORA_INIT=olora", "METHOD=ptuning"],
            "LORA_INIT=olora starts LoRA weights, but METHOD=ptuning trains no LoRA; "
            "set METHOD=lora or qlora, or leave LORA_INIT unset",
        ),
    ],
)
def test_an_init_that_cannot_apply_is_refused_in_one_line(cli, args, line):
    code, errors, _ = cli("train", "MODEL_NAME=tiny", *args)
    assert code == 2 and errors == [line]


def test_loftq_starts_the_4bit_model_nearer_the_unquantized_one(tiny_glm_dir):
    """LoftQ's whole point: at step 0 the 4-bit base plus its LoRA is closer to the full-precision model than the
    4-bit base alone (plain init: B = 0). The adapter then reloads on the 4-bit base."""
    import torch

    from app.config import Config
    from app.models.loading import apply_lora, load_model

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 9]])
    with torch.no_grad():
        full = load_model(str(tiny_glm_dir)).eval()(input_ids=ids).logits.float()
        error = {}
        for init in ("default", "loftq"):
            cfg = Config.from_dict(
                {"MODEL_NAME": str(tiny_glm_dir), "QUANT_LEVEL": "4bit", "LORA_INIT": init, "LORA_R": 16}
            )
            model = apply_lora(load_model(str(tiny_glm_dir), quant="4bit"), cfg, str(tiny_glm_dir)).eval()
            error[init] = (model(input_ids=ids).logits.float() - full).abs().mean().item()
    assert error["loftq"] < 0.8 * error["default"], error


# ---- DoRA on an 8-bit base -----------------------------------------------------------------------------------


def test_dora_on_an_8bit_base_gets_the_dequantized_models_gradients_step_after_step(tiny_glm_dir):
    """PEFT's DoRA dequantizes the base weight in every forward and on CPU puts back a copy of it without its
    row scales, so the second forward failed inside bitsandbytes (the tier's 8bit for 12-24 GB machines). Three
    passes on the 8-bit model give the gradients of an fp32 model holding the dequantized weights."""
    import torch

    from app.config import Config
    from app.models.loading import apply_lora, load_model
    from app.models.quantization import prepare_for_training

    quant = prepare_for_training(load_model(str(tiny_glm_dir), quant="8bit"), "8bit", gradient_checkpointing=False)
    ref, layers = load_model(str(tiny_glm_dir)), dict(quant.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            if type(layers.get(name)).__name__ == "Linear8bitLt":
                w = layers[name].weight  # int8 rows x row scale / 127
                module.weight.copy_(w.data.float() * w.SCB.float().unsqueeze(1) / 127)

    def dora(model):  # through the tool's own LoRA setup, which gives DoRA's 8-bit layers their hook
        torch.manual_seed(0)
        peft_model = apply_lora(
            model,
            Config.from_dict(
                {
                    "MODEL_NAME": str(tiny_glm_dir),
                    "LORA_R": 4,
                    "LORA_ALPHA": 8,
                    "LORA_DROPOUT": 0,
                    "USE_DORA": True,
                    "LORA_TARGETS": "q_proj,v_proj,down_proj",
                }
            ),
        )
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave A without gradient
                torch.nn.init.normal_(p, std=0.05)
        return peft_model.train()

    quant, ref = dora(quant), dora(ref)
    ref.load_state_dict({k: v for k, v in quant.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        grads = []
        for model in (quant, ref):
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad.flatten().clone() for n, p in model.named_parameters() if p.requires_grad})
        got, want = grads
        assert got.keys() == want.keys() and any("magnitude" in n for n in got)
        for name in want:
            assert torch.nn.functional.cosine_similarity(got[name], want[name], dim=0) >= 0.99, name


def test_a_dora_adapter_answers_on_an_8bit_base(runs, tiny_glm_dir):
    """The same loss of row scales ended `predict QUANT_LEVEL=8bit` with a DoRA adapter at its second token."""
    import torch

    from app.models.loading import load_adapter, load_model

    model = load_adapter(load_model(str(tiny_glm_dir), quant="8bit"), runs["dora"]).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        first, again = model(input_ids=ids).logits, model(input_ids=ids).logits
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, again) and out.shape[1] == ids.shape[1] + 4
