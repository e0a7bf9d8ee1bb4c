"""STAGE=dpo and STAGE=kto (app/training/preference_trainer.py): TRL's preference trainers on the tool's path, on the
tiny GLM.

A seeded DPO run logs golden losses, the first ln 2 (the policy starts as its reference); the reference pass is
the model it stands for (the base with the adapter off, or a continued SFT adapter's frozen copy); kill -9 and
the same command resume to the uninterrupted run; a resume with another loss is refused in one line; the adapter
predicts, serves and merges like an SFT one; every loss and KTO train under the tier's weight formats, DoRA and
full tuning; and what cannot train together is refused in one line."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app import Config, FineTuner

# Per-step loss of the recipe (tests/conftest.py `recipe`) with STAGE=dpo on the `pairs` file below (torch 2.13.0
# CPU, transformers 5.23.0, peft 0.21.2, trl 1.16.0). Step 1 is ln 2: a new adapter's B is zero, so the policy is its
# reference and every reward margin is 0. Re-derive with
# `pytest tests/training/test_preference_training.py -k golden -s` and say why in the commit.
GOLDEN_DPO_LOSSES = [0.69315, 0.69038, 0.68595, 0.70144, 0.6996, 0.60544]
DPO = {"STAGE": "dpo"}  # the recipe's settings plus these, on the pairs file
LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
REWARDS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
KTO_REWARDS = REWARDS - {"rewards/accuracies"}  # TRL's KTOTrainer: unpaired answers have no accuracy to log


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """40 synthetic {prompt, chosen, rejected} pairs (app.data.synthetic_pairs, seed 1) in pref.jsonl."""
    from app.data.synthetic_pairs import generate_pairs

    path = tmp_path_factory.mktemp("pairs") / "pref.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_pairs(40, seed=1)), "utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The working dir of this file's shared runs: their output dirs are under models/, where serve finds them."""
    return tmp_path_factory.mktemp("pref-work")


def _dpo(recipe, tiny_glm_dir, data_dir, pairs, out, **extra) -> Config:
    return recipe(tiny_glm_dir, data_dir, out, DATA_PATH=str(pairs), **{**DPO, **extra})


def _run(work: Path, cfg: Config):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # models/.last_run goes there, not into the checkout
        ft = FineTuner(cfg)
        ft.run()
    return ft


@pytest.fixture(scope="module")
def dpo_run(work, tiny_glm_dir, data_dir, pairs, recipe):
    """(FineTuner, output dir) of the golden DPO run: a new adapter on the base, 6 steps."""
    out = work / "models" / "dpo"
    return _run(work, _dpo(recipe, tiny_glm_dir, data_dir, pairs, out)), out


@pytest.fixture(scope="module")
def sft_run(work, tiny_glm_dir, data_dir, recipe) -> Path:
    """An SFT run's output dir (3 steps of the recipe): the adapter STAGE=dpo continues through ADAPTER_DIR."""
    out = work / "models" / "sft"
    _run(work, recipe(tiny_glm_dir, data_dir, out, MAX_STEPS=3))
    return out


@pytest.fixture(scope="module")
def continued_run(work, tiny_glm_dir, data_dir, pairs, recipe, sft_run):
    """(FineTuner, output dir) of 2 DPO steps continuing the SFT adapter (ADAPTER_DIR)."""
    out = work / "models" / "dpo-sft"
    cfg = _dpo(recipe, tiny_glm_dir, data_dir, pairs, out, ADAPTER_DIR=str(sft_run), MAX_STEPS=2, EVAL_STEPS=2)
    return _run(work, cfg), out


# ---- golden losses --------------------------------------------------------------------------------------------


def test_golden_dpo_losses_start_at_ln_2(dpo_run, train_losses, read_metrics):
    _, out = dpo_run
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    print("losses:", [round(losses[s], 5) for s in sorted(losses)])
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert min(losses[s] for s in (2, 3, 4, 5, 6)) < losses[1] - 0.05, losses  # it learns to prefer, not just runs
    assert GOLDEN_DPO_LOSSES is not None, "record GOLDEN_DPO_LOSSES from the printed losses"
    assert [losses[s] for s in sorted(losses)] == pytest.approx(GOLDEN_DPO_LOSSES, rel=1e-4, abs=1e-4)
    first = next(r for r in read_metrics(out) if "loss" in r)
    assert first["rewards/margins"] == 0 and first["rewards/chosen"] == 0


def test_a_continued_sft_adapter_starts_at_ln_2_too(continued_run, train_losses):
    """The reference is the SFT adapter's frozen copy, so the continued policy starts equal to it."""
    _, out = continued_run
    losses = train_losses(out)
    assert sorted(losses) == [1, 2] and losses[1] == pytest.approx(math.log(2), abs=1e-6)


# ---- the reference pass ---------------------------------------------------------------------------------------


def _log_probs(model, batch) -> torch.Tensor:
    """Each row's summed log-probability of its completion tokens (completion_mask), from plain logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    per_token = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


def _trainer(cfg: Config, tmp_path: Path):
    """The preference trainer as build_trainer makes it, for the run ``cfg`` (its model loaded, nothing trained)."""
    from app.training.preference_trainer import as_dataset, pref_trainer_class, pref_trainer_kwargs
    from app.training.trainer import RunMixin, training_args

    ft = FineTuner(cfg).setup().prepare_data().load_model()
    args = training_args(ft.cfg, tmp_path / "checkpoints", False, "fp32", False)
    return pref_trainer_class(ft.cfg, RunMixin)(
        model=ft.model,
        args=args,
        train_dataset=as_dataset(ft.train_rows),
        run_cfg=ft.cfg,
        run_settings=dict,
        **pref_trainer_kwargs(ft),
    )


@pytest.mark.parametrize("start", ["new adapter", "ADAPTER_DIR"])
def test_the_reference_pass_is_the_model_it_stands_for(
    start, request, tiny_glm_dir, data_dir, pairs, recipe, tmp_path, monkeypatch
):
    """TRL's compute_ref_log_probs, after the policy's adapter has moved far from where it started, equals the
    log-probs of a model loaded plainly: the base alone for a new adapter (whose copy "ref" is dropped), the SFT
    adapter on the base for ADAPTER_DIR (its frozen copy "ref")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    extra = {}
    plain = AutoModelForCausalLM.from_pretrained(tiny_glm_dir)
    if start == "ADAPTER_DIR":
        sft = request.getfixturevalue("sft_run")
        extra["ADAPTER_DIR"] = str(sft)
        plain = PeftModel.from_pretrained(plain, str(sft))
    plain.eval()
    trainer = _trainer(_dpo(recipe, tiny_glm_dir, data_dir, pairs, tmp_path / "out", **extra), tmp_path)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moves: a reference that follows it would move too
        for name, param in model.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.5)
    want = _log_probs(plain, batch)
    chosen, rejected = trainer.compute_ref_log_probs(model, batch)
    got = torch.cat([chosen, rejected])
    assert (_log_probs(model, batch) - want).abs().max() > 1.0  # the policy is not its reference any more
    assert got.shape == want.shape == (8,)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert ("ref" in model.peft_config) == (start == "ADAPTER_DIR")  # no second LoRA for a new adapter


# ---- kill -9, then the same command ---------------------------------------------------------------------------


def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_run(
    tiny_glm_dir, data_dir, pairs, recipe, dpo_run, tmp_path, cli, caplog, child_env, read_metrics, kill_9_while_saving
):
    from app.config import show
    from app.training.checkpoints import MARKER, STAGING

    out = tmp_path / "out"
    cfg = _dpo(recipe, tiny_glm_dir, data_dir, pairs, out)
    args = [f"{var}={show(cfg.get(var))}" for var in sorted(cfg.explicit)]  # the golden run, as a command line
    killed = subprocess.run(
        [sys.executable, "-c", kill_9_while_saving, "train", *args],
        cwd=tmp_path,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "checkpoint-3" / MARKER).is_file() and (ckpts / STAGING / "checkpoint-6").is_dir()
    assert not (out / "adapter_model.safetensors").exists()

    code, _, stderr = cli("train", *args)
    assert code == 0, stderr[-3000:]
    assert f"resuming from {ckpts / 'checkpoint-3'}" in caplog.text

    def curve(d):  # every logged train and eval row: (step, which, loss, reward margin)
        return [
            (
                r["step"],
                "loss" if "loss" in r else "eval",
                r.get("loss", r.get("eval_loss")),
                r.get("rewards/margins", r.get("eval_rewards/margins")),
            )
            for r in read_metrics(d)
            if "loss" in r or "eval_loss" in r
        ]

    got, want = curve(out), curve(dpo_run[1])
    assert [g[:2] for g in got] == [w[:2] for w in want]  # the same rows, none repeated from the killed run
    assert [g[0] for g in got if g[1] == "loss"] == [1, 2, 3, 4, 5, 6]
    assert max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g[2:], w[2:], strict=True)) <= 1e-5
    a, b = load_file(out / "adapter_model.safetensors"), load_file(dpo_run[1] / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert not ckpts.exists()


# ---- a resume that would change the loss ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def crashed(tiny_glm_dir, data_dir, pairs, recipe, tmp_path_factory):
    """(settings, work dir) of a DPO run that died at step 4 (checkpoint-3 sealed); OUTPUT_DIR=out, relative, so a
    copy of the work dir is the same run."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt

    from app.config import show

    work = tmp_path_factory.mktemp("crashed")
    cfg = _dpo(recipe, tiny_glm_dir, data_dir, pairs, "out")
    values = {var: show(cfg.get(var)) for var in cfg.explicit}  # the settings as a command line gives them
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        with pytest.raises(KeyboardInterrupt):
            FineTuner(Config.from_dict(values)).setup().prepare_data().train(callbacks=[Crash()])
    assert (work / "out" / "checkpoints" / "checkpoint-3").is_dir()
    return values, work


@pytest.mark.parametrize(
    "change, said",
    [
        ({"STAGE": "kto"}, "STAGE dpo -> kto"),
        ({"PREF_LOSS": "ipo"}, "PREF_LOSS sigmoid -> ipo"),
        ({"PREF_BETA": 0.5}, "PREF_BETA 0.1 -> 0.5"),
        ({"ADAPTER_DIR": "sft"}, "ADAPTER_DIR '' -> "),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else None,
)
def test_a_resume_with_another_loss_or_start_is_refused_in_one_line(
    crashed, change, said, cli, tmp_path, request, snapshot
):
    values, work = crashed
    shutil.copytree(work, tmp_path, dirs_exist_ok=True)  # cli runs in tmp_path: OUTPUT_DIR=out is this copy
    if change.get("ADAPTER_DIR") == "sft":
        change = {"ADAPTER_DIR": str(request.getfixturevalue("sft_run"))}
    before = snapshot(tmp_path / "out")
    code, errors, stderr = cli("train", *(f"{k}={v}" for k, v in {**values, **change}.items()))
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, errors
    head = "OUTPUT_DIR=out holds an unfinished run (checkpoint-3, step 3) that cannot continue as asked: "
    assert errors[0].startswith(head), errors[0]
    what = errors[0][len(head) : errors[0].index(". To continue it")]
    assert said in what and "; " not in what, what  # that difference, and no other
    assert snapshot(tmp_path / "out") == before


# ---- the adapter, used as an SFT one is -----------------------------------------------------------------------


def test_the_saved_adapter_is_the_policy_alone(dpo_run, continued_run, tiny_glm_dir):
    """Reloaded from the output dir, each run's adapter gives the trained policy's logits exactly; TRL's frozen
    copy "ref" (the continued run holds one) is not saved beside it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for ft, out in (dpo_run, continued_run):
        assert not [p for p in out.rglob("*") if p.name == "ref"], out
        assert json.loads((out / "train_config.json").read_text())["STAGE"] == "dpo"
        ids = torch.tensor([ft.train_rows[0]["prompt_ids"] + ft.train_rows[0]["chosen_ids"]])
        ft.model.eval()
        with torch.no_grad():
            expected = ft.model(input_ids=ids).logits
            base = AutoModelForCausalLM.from_pretrained(tiny_glm_dir).eval()
            got = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
        assert torch.equal(got, expected), out


def test_predict_serve_and_merge_take_the_dpo_adapter(
    dpo_run, work, run_app, cli, app_process, serve_process, tiny_glm_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = "抽取三元组：张三出生于北京。"
    pred = run_app(["predict-custom", "ADAPTER_DIR=models/dpo", f"PROMPT={prompt}", "MAX_NEW_TOKENS=8"], work)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert "adapter models/dpo" in pred.stderr
    answer = pred.stdout.split("---\n", 1)[1].strip()

    server = serve_process(app_process, work, ADAPTERS="dpo=models/dpo")
    reply = server.client().chat.completions.create(
        model="dpo", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content.strip() == answer
    base = server.client().chat.completions.create(
        model=str(tiny_glm_dir), max_tokens=8, temperature=0, messages=[{"role": "user", "content": prompt}]
    )
    assert base.choices[0].message.content.strip() != answer  # the adapter is what answered
    server.proc.proc.terminate()
    server.proc.wait()

    run = shutil.copytree(dpo_run[1], tmp_path / "dpo")
    code, errors, _ = cli("merge", f"ADAPTER_DIR={run}")
    assert code == 0, errors
    ids = torch.tensor([dpo_run[0].train_rows[0]["prompt_ids"]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_glm_dir)
        adapter = PeftModel.from_pretrained(base, str(run)).eval()(input_ids=ids).logits
    assert torch.allclose(merged, adapter, atol=1e-4)


# ---- every loss, under each weight format the tier may pick ---------------------------------------------------

CELLS = [("dpo", loss) for loss in LOSSES] + [("kto", "sigmoid")]
# option -> (its settings, the QUANT_LEVEL it trains on); TIER=cpu-m is the 12-24 GB tier, whose format is 8bit
OPTIONS = {
    "lora": (("QUANT_LEVEL=none",), "none"),
    "tier": (("TIER=cpu-m",), "8bit"),
    "4bit": (("QUANT_LEVEL=4bit",), "4bit"),
    "full": (("METHOD=full", "QUANT_LEVEL=none"), "none"),
    "dora": (("USE_DORA=true", "TIER=cpu-m"), "8bit"),
}
# (option, stage, loss) -> a fragment of the one line it is refused with; every other cell trains
REFUSED: dict[tuple[str, str, str], str] = {}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_loss_and_kto_trains_and_logs_rewards_or_is_refused_in_one_line(
    option, cli, tiny_glm_dir, pairs, tmp_path, read_metrics
):
    """2 steps of each; all cells of an option in one test, every wrong one reported together."""
    args, quant = OPTIONS[option]
    wrong = {}
    for stage, loss in CELLS:
        out = tmp_path / f"{stage}-{loss}"
        try:
            code, errors, stderr = cli(
                "train",
                f"MODEL_NAME={tiny_glm_dir}",
                f"DATA_PATH={pairs}",
                f"OUTPUT_DIR={out}",
                f"STAGE={stage}",
                f"PREF_LOSS={loss}",
                "MAX_STEPS=2",
                "BATCH_SIZE=2",
                "GRAD_ACCUM=1",
                "MAX_SAMPLES=8",
                "VAL_SIZE=0",
                "LOGGING_STEPS=1",
                "NUM_THREADS=2",
                *args,
            )
        except Exception as e:  # noqa: BLE001 - a traceback in the CLI: a wrong cell, all reported together
            wrong[stage, loss] = f"Traceback: {type(e).__name__}: {e}"
            continue
        refused = REFUSED.get((option, stage, loss))
        if refused:
            ok = code == 2 and len(errors) == 1 and refused in errors[0] and not out.exists()
        elif code != 0 or errors:
            ok = False
        else:
            rows = [r for r in read_metrics(out) if "loss" in r]
            logged = set().union(*rows) if rows else set()
            want = KTO_REWARDS if stage == "kto" else REWARDS
            ok = [r["step"] for r in rows] == [1, 2] and want <= logged and all(math.isfinite(r["loss"]) for r in rows)
            saved = json.loads((out / "train_config.json").read_text())
            ok = ok and (saved["QUANT_LEVEL"], saved["STAGE"], saved["PREF_LOSS"]) == (quant, stage, loss)
            if not ok:
                errors = [
                    f"steps {[r['step'] for r in rows]}, missing {sorted(want - logged)}, "
                    f"saved {saved['QUANT_LEVEL']}/{saved['STAGE']}/{saved['PREF_LOSS']}"
                ]
        if not ok or "Traceback" in stderr:
            wrong[stage, loss] = f"exit {code}: {errors}"
    assert not wrong, wrong


# ---- what cannot train together, in one line ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words, left",
    [
        (["STAGE=dpo", "METHOD=ptuning"], ("STAGE=dpo", "METHOD=lora"), set()),
        (["STAGE=kto", "METHOD=ptuning"], ("STAGE=kto", "METHOD=lora"), set()),
        (["STAGE=dpo", "PACKING=on"], ("PACKING=on", "STAGE=dpo", "PACKING=auto"), set()),
        (["STAGE=dpo", "DATA_PATH=sft"], ("DATA_PATH=", "holds sft records", "STAGE=dpo"), set()),
        (["STAGE=dpo", "ADAPTER_DIR=empty"], ("ADAPTER_DIR=", "no adapter", "train_config.json"), set()),
        (["STAGE=kto", "BATCH_SIZE=1"], ("STAGE=kto", "BATCH_SIZE=1", "BATCH_SIZE=2"), set()),
    ],
    ids=["dpo-ptuning", "kto-ptuning", "packing", "sft-data", "no-adapter", "kto-batch-1"],
)
def test_what_cannot_train_together_is_refused_in_one_line(
    args, words, left, cli, tiny_glm_dir, pairs, data_dir, tmp_path
):
    """KTO's micro-batch of 1 was TRL's ValueError: a traceback; a BATCH_SIZE=1 given is refused before anything
    is written."""
    (tmp_path / "empty").mkdir()
    subs = {"DATA_PATH=sft": f"DATA_PATH={data_dir / 'train.jsonl'}"}
    code, errors, stderr = cli(
        "train",
        f"MODEL_NAME={tiny_glm_dir}",
        f"DATA_PATH={pairs}",
        "OUTPUT_DIR=out",
        "MAX_STEPS=1",
        "GRAD_ACCUM=1",
        "MAX_SAMPLES=8",
        "VAL_SIZE=0",
        "QUANT_LEVEL=none",
        "NUM_THREADS=2",
        *(subs.get(a, a) for a in args),
    )
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, (errors, stderr[-2000:])
    assert all(w in errors[0] for w in words), errors[0]
    out = tmp_path / "out"
    assert ({p.name for p in out.iterdir()} if out.exists() else set()) <= left


def test_a_continued_adapter_keeps_its_shape(cli, tiny_glm_dir, pairs, sft_run, tmp_path):
    code, errors, _ = cli(
        "train",
        f"MODEL_NAME={tiny_glm_dir}",
        f"DATA_PATH={pairs}",
        "OUTPUT_DIR=out",
        "STAGE=dpo",
        f"ADAPTER_DIR={sft_run}",
        "LORA_R=16",
        "MAX_STEPS=1",
    )
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"ADAPTER_DIR={sft_run}: LORA_R=16 (the adapter's: 8)"), errors[0]
    assert not (tmp_path / "out").exists()


def test_kto_under_a_tier_of_batch_1_plans_a_batch_of_2(cli, run_app, tiny_glm_dir, pairs, tmp_path):
    """The 6-12 GB tier (cpu-s) picks micro-batches of 1, which KTO's KL term cannot use: the plan makes it 2 and
    says why (`make info`), and the run trains."""
    args = (
        f"MODEL_NAME={tiny_glm_dir}",
        f"DATA_PATH={pairs}",
        "STAGE=kto",
        "TIER=cpu-s",
        "MAX_SAMPLES=8",
        "VAL_SIZE=0",
        "QUANT_LEVEL=none",
        "NUM_THREADS=2",
    )
    info = run_app(["info", *args])
    shown = next(line for line in info.stdout.splitlines() if line.strip().startswith("BATCH_SIZE"))
    assert info.returncode == 0 and "= 2" in shown, (shown, info.stderr[-2000:])
    assert "STAGE=kto pairs each answer with another of its micro-batch" in shown, shown
    code, errors, stderr = cli("train", *args, "OUTPUT_DIR=out", "MAX_STEPS=1")
    assert code == 0 and "Traceback" not in stderr, (errors, stderr[-2000:])
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["BATCH_SIZE"] == 2
