"""Evaluation end to end: reports from a trained tiny adapter, score-only mode, F1 during
training, and METHOD=full (which the demo uses); with EVAL_PATH unset, the records the run held out,
scored as their answers call for (triplet P/R/F1, or exact match / ROUGE-L / BLEU-4 and the loss)."""

import json
import logging
import random
import shutil

import pytest
import torch

from app import Config, FineTuner, UserError
from app.data.encode import encode
from app.evaluation.dataset import eval_data
from app.evaluation.evaluate import run_evaluate
from app.evaluation.scoring import score
from app.evaluation.textmetrics import bleu4, exact_match, rouge_l, tokens
from app.inference.generate import max_new_tokens_for
from app.inference.predict import Predictor

REPORT_KEYS = {
    "triplet_precision",
    "triplet_recall",
    "triplet_f1",
    "triplet_f1_typed",
    "classification_accuracy",
    "json_valid_rate",
    "n_samples",
}


def quick(model_dir, data_dir, out, **extra):
    return Config.from_dict(
        {
            "MODEL_NAME": str(model_dir),
            "DATA_PATH": str(data_dir / "train.jsonl"),
            "VAL_PATH": str(data_dir / "dev.jsonl"),
            "OUTPUT_DIR": str(out),
            "MAX_STEPS": 2,
            "GRAD_ACCUM": 1,
            "BATCH_SIZE": 2,
            "TIER": "none",
            "SEED": 0,
            "EVAL_STEPS": 1,
            "MAX_SAMPLES": 20,
            **extra,
        }
    )


def test_evaluate_writes_every_report(tiny_glm_dir, data_dir, tmp_path, monkeypatch, greedy_reference):
    monkeypatch.chdir(tmp_path)
    out = FineTuner(quick(tiny_glm_dir, data_dir, tmp_path / "out")).run().output_dir
    ecfg = Config.from_dict({"ADAPTER_DIR": str(out), "EVAL_PATH": str(data_dir / "dev.jsonl"), "EVAL_SAMPLES": 6})
    metrics = run_evaluate(ecfg)
    files = {p.name for p in (out / "eval").iterdir()}
    assert files == {"report.json", "report.md", "predictions.jsonl", "per_predicate_f1.png", "run_manifest.json"}
    report = json.loads((out / "eval" / "report.json").read_text())
    assert REPORT_KEYS <= report.keys() and report["n_samples"] == 6 == metrics["n_samples"]
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all({"gold", "output", "correct", "missing", "spurious"} <= r.keys() for r in rows)
    # Each output is the adapter's own greedy answer to that record's prompt (an independent argmax
    # loop, same token budget), and the report scores exactly those answers against their gold.
    records = [json.loads(line) for line in (data_dir / "dev.jsonl").read_text().splitlines()[:6]]
    pred = Predictor(ecfg)
    budget = max_new_tokens_for(pred.tokenizer, [r["target"] for r in records])
    expected = [
        greedy_reference(pred.model, pred.tokenizer, [{"role": "user", "content": r["context"]}], budget)
        for r in records
    ]
    assert all(e.strip() for e in expected) and len(set(expected)) == 6  # not empty, not constant
    want = [(r["target"], e) for r, e in zip(records, expected, strict=True)]
    assert [(r["gold"], r["output"]) for r in rows] == want
    independent = score(zip([r["target"] for r in records], expected, strict=True)).to_dict()
    assert {k: report[k] for k in REPORT_KEYS} == {k: independent[k] for k in REPORT_KEYS}
    # a random tiny model finds nothing: every gold triplet is missing
    assert report["triplet_recall"] == 0.0 and sum(len(r["missing"]) for r in rows) > 0


def test_evaluate_scores_each_answer_against_its_own_record(tiny_glm_dir, tmp_path, monkeypatch):
    """A generator that is right on some records and wrong on others gives exactly the P/R/F1 and
    accuracy worked out by hand: the answers are paired with their own gold, prompts carry no answer."""

    def trip(s, p, o):
        return {"predicate": p, "object_type": "人物", "subject_type": "影视作品", "object": o, "subject": s}

    def fenced(ts):
        return "```json\n" + json.dumps(ts, ensure_ascii=False) + "\n```"

    a, b, c, d, e = (
        trip("星河", "导演", "林远"),
        trip("星河", "主演", "陈雨"),
        trip("长夜", "导演", "周景"),
        trip("长夜", "主演", "吴桐"),
        trip("远方", "编剧", "沈博"),
    )
    cases = [
        ("句子一", fenced([a, b]), fenced([a, b])),  # tp 2
        ("句子二", fenced([c, d]), fenced([c, trip("长夜", "主演", "错人")])),  # tp 1, fp 1, fn 1
        ("句子三", fenced([e]), ""),  # fn 1, not valid JSON
        ("句子四", '["平板"]', '["平板"]'),  # label right
        ("句子五", '["水果"]', '["衣服"]'),
    ]  # label wrong
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps({"context": q, "target": t}, ensure_ascii=False) + "\n" for q, t, _ in cases))
    answer_to = {q: out for q, _, out in cases}
    prompts = []

    def fake_generate_batch(model, tokenizer, conversations, max_new_tokens, *args, **kwargs):
        prompts.extend(conv[-1]["content"] for conv in conversations)
        assert all(conv[-1]["role"] == "user" for conv in conversations)  # the gold answer is not in the prompt
        return [answer_to[conv[-1]["content"]] for conv in conversations]

    monkeypatch.setattr("app.evaluation.evaluate.generate_batch", fake_generate_batch)
    d = run_evaluate(
        Config.from_dict(
            {
                "ADAPTER_DIR": "none",
                "MODEL_NAME": str(tiny_glm_dir),
                "EVAL_PATH": str(src),
                "EVAL_DIR": str(tmp_path / "eval"),
            }
        )
    )
    assert sorted(prompts) == sorted(answer_to)
    p, r = 3 / 4, 3 / 5
    assert (d["tp"], d["fp"], d["fn"]) == (3, 1, 2)
    assert (d["triplet_precision"], d["triplet_recall"], d["triplet_f1"]) == pytest.approx((p, r, 2 * p * r / (p + r)))
    assert d["classification_accuracy"] == 0.5 and d["json_valid_rate"] == pytest.approx(0.8)
    assert d["n_samples"] == 5 and d["n_triplet_samples"] == 3 and d["n_classification_samples"] == 2
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["gold"], r["output"]) for r in rows] == [(t, out) for _, t, out in cases]
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["triplet_f1"] == pytest.approx(d["triplet_f1"])


def test_score_only_mode_from_the_command_line(tmp_path, run_app):
    gold = (
        '```json\n[{"predicate": "导演", "object_type": "人物", "subject_type": "影视作品", '
        '"object": "林远", "subject": "星河"}]\n```'
    )
    lines = [
        {"target": gold, "output": gold},
        {"reference": gold, "output": "我不知道"},
        {"target": '["平板"]', "output": '["平板"]'},
    ]
    src = tmp_path / "preds.jsonl"
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    proc = run_app(["evaluate", "--predictions", src], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "preds.eval" / "report.json").read_text())
    assert report["triplet_precision"] == 1.0 and report["triplet_recall"] == 0.5
    assert report["classification_accuracy"] == 1.0 and report["n_samples"] == 3
    src.write_text('{"target": "x"}\nnot json\n')
    bad = run_app(["evaluate", "--predictions", src], timeout=120)
    errors = [line for line in bad.stderr.splitlines() if " ERROR " in line]
    assert bad.returncode == 2 and len(errors) == 1 and "line 1" in errors[0] and "output" in errors[0]


def test_f1_during_training_is_logged_and_picks_the_best(tiny_glm_dir, data_dir, tmp_path, monkeypatch, read_metrics):
    monkeypatch.chdir(tmp_path)
    FineTuner(quick(tiny_glm_dir, data_dir, tmp_path / "out", EVAL_METRIC="f1", EVAL_SAMPLES=3)).run()
    rows = read_metrics(tmp_path / "out")
    f1_steps = [r["step"] for r in rows if "eval_f1" in r]
    assert f1_steps == [1, 2] and all(0.0 <= r["eval_f1"] <= 1.0 for r in rows if "eval_f1" in r)
    assert (tmp_path / "out" / "best" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_saves_a_standalone_model_that_predict_loads(tiny_glm_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ft = FineTuner(quick(tiny_glm_dir, data_dir, tmp_path / "out", METHOD="full", LEARNING_RATE=1e-3))
    ft.run()
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert all(p.requires_grad for p in ft.model.parameters())
    pred = Predictor(Config.from_dict({"ADAPTER_DIR": str(out), "MAX_NEW_TOKENS": 4}))
    ids = torch.tensor([ft.train_rows[0]["input_ids"]])
    ft.model.eval()
    with torch.no_grad():
        assert torch.allclose(pred.model(input_ids=ids).logits, ft.model(input_ids=ids).logits, atol=1e-5)


def test_full_with_quantization_is_rejected():
    with pytest.raises(UserError, match="METHOD=full"):
        Config.from_dict({"METHOD": "full", "QUANT_LEVEL": "4bit"}).validate()


def test_merge_writes_a_model_that_loads_without_peft(tiny_glm_dir, data_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from app.inference.merge import run_merge

    monkeypatch.chdir(tmp_path)
    # fp32: ft.model is compared with the fp32 merged model (under bf16 its frozen weights are bf16)
    ft = FineTuner(
        quick(tiny_glm_dir, data_dir, tmp_path / "out", QUANT_LEVEL="none", LEARNING_RATE=1e-2, PRECISION="fp32")
    )
    ft.run()
    merged_dir = run_merge(Config.from_dict({"ADAPTER_DIR": str(tmp_path / "out")}))
    assert merged_dir == tmp_path / "out" / "merged" and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert "peft" not in type(merged).__module__
    ids = torch.tensor([ft.train_rows[0]["input_ids"]])
    ft.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ft.model(input_ids=ids).logits, atol=1e-4)


# ---- EVAL_PATH unset: the records the run held out ------------------------------------------------------

ANOTHER = "EVAL_PATH=<file> to score another file"


def alpaca_file(path, n=60):
    """A user's own alpaca file: free-text answers, each instruction told apart by its number."""
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "quiet", "north", "light", "湖水", "山风"]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": f"Describe item {i} in three words",
                    "input": "",
                    "output": " ".join(rng.sample(words, 3)),
                },
                ensure_ascii=False,
            )
            + "\n"
            for i in range(n)
        ),
        encoding="utf-8",
    )
    return path


def trained(model_dir, data, out, **extra):
    ft = FineTuner(
        Config.from_dict(
            {
                "MODEL_NAME": str(model_dir),
                "DATA_PATH": str(data),
                "OUTPUT_DIR": str(out),
                "MAX_STEPS": 1,
                "BATCH_SIZE": 2,
                "GRAD_ACCUM": 1,
                "TIER": "none",
                "SEED": 3,
                "VAL_SIZE": 0.2,
                "CACHE_DIR": str(out.parent / "cache"),
                **extra,
            }
        )
    )
    ft.run()
    return ft


def said(caplog, start="evaluating "):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("app.eval")]


def test_an_alpaca_run_is_scored_on_its_held_out_records_with_text_metrics(
    tiny_glm_dir, tmp_path, monkeypatch, caplog, write_dataset
):
    """The issue's case: EVAL_PATH unset, a run trained on the user's alpaca file, the sample triplets in
    data/dev.jsonl (what was scored before, F1 0). Scored now: exactly the records training held out, in its
    order, with exact match / ROUGE-L / BLEU-4 per sample and the answers' loss, said in one line."""
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data", n_train=20, n_dev=10)
    data = alpaca_file(tmp_path / "mine.jsonl")
    run = tmp_path / "run"
    held = trained(tiny_glm_dir, data, run, MAX_SAMPLES=50).val_examples
    assert len(held) == 10  # VAL_SIZE 0.2 of the 50 sampled
    caplog.clear()
    with caplog.at_level(logging.INFO):
        d = run_evaluate(Config.from_dict({"ADAPTER_DIR": str(run)}))
    assert said(caplog) == [f"evaluating the 10 records {run} held out of {data} (its validation split; {ANOTHER})"]
    assert not warnings_of(caplog)  # the file is as it was: nothing to warn about
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["gold"]) for r in rows] == [(e.messages[0]["content"], e.answer) for e in held]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report == d and d["scored_as"] == "text" and d["n_samples"] == 10 and "triplet_f1" not in d
    for r in rows:
        ref, hyp = tokens(r["gold"]), tokens(r["output"])
        assert (r["exact_match"], r["rouge_l"], r["bleu_4"]) == (
            exact_match(r["gold"], r["output"]),
            rouge_l(ref, hyp),
            bleu4(ref, hyp),
        )
    for key in ("exact_match", "rouge_l", "bleu_4"):
        assert d[key] == pytest.approx(sum(float(r[key]) for r in rows) / 10)
    # the loss: each reference answer under the adapter, as the model's own loss on training's labels
    from app.inference.predict import Predictor

    pred = Predictor(Config.from_dict({"ADAPTER_DIR": str(run)}))
    sums, counts = [], []
    with torch.no_grad():
        for e in held:
            row = encode(e, pred.tokenizer, 512)
            n = sum(label != -100 for label in row["labels"][1:])
            sums.append(
                float(pred.model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss)
                * n
            )
            counts.append(n)
    assert [r["loss"] for r in rows] == pytest.approx([s / c for s, c in zip(sums, counts, strict=True)], rel=1e-4)
    assert d["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-4) and d["loss"] > 0
    # the data file changed since: the same records are rebuilt, with one warning that says so
    with data.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "one more", "output": "record"}) + "\n")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        eval_data(Config.from_dict({"ADAPTER_DIR": str(run)}), run)
    assert len(warnings_of(caplog)) == 1 and warnings_of(caplog)[0].startswith(
        f"DATA_PATH={data} has changed since {run} trained on it"
    )


def test_a_max_samples_all_run_is_scored_on_its_held_out_records_with_or_without_the_token_cache(
    tiny_glm_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    data = alpaca_file(tmp_path / "mine.jsonl")
    run = tmp_path / "run"
    held = [e.messages for e in trained(tiny_glm_dir, data, run).val_examples]  # MAX_SAMPLES=all: the token cache
    assert len(held) == 12 and any((tmp_path / "cache" / "tokens").iterdir())
    cfg = Config.from_dict({"ADAPTER_DIR": str(run)})
    assert [e.messages for e in eval_data(cfg, run).examples] == held
    shutil.rmtree(tmp_path / "cache")  # `make clean`: rebuilt from the file itself, the same records
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert [e.messages for e in eval_data(cfg, run).examples] == held
    assert said(caplog) == [f"evaluating the 12 records {run} held out of {data} (its validation split; {ANOTHER})"]
    assert not warnings_of(caplog)


def test_a_triplet_run_is_scored_on_its_val_path_with_prf(tiny_glm_dir, data_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # no data/dev.jsonl here: the run's own VAL_PATH is what is scored
    out = tmp_path / "out"
    FineTuner(quick(tiny_glm_dir, data_dir, out, MAX_STEPS=1, EVAL_STEPS=1)).run()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        d = run_evaluate(Config.from_dict({"ADAPTER_DIR": str(out), "EVAL_SAMPLES": 4}))
    dev = data_dir / "dev.jsonl"
    assert said(caplog) == [
        f"evaluating 4 of the 10 records of {dev}, the VAL_PATH {out} validated on (EVAL_SAMPLES=4; {ANOTHER})"
    ]
    assert d["scored_as"] == "triplets" and REPORT_KEYS <= d.keys() and d["n_samples"] == 4 and d["loss"] > 0
    assert "rouge_l" not in d and (out / "eval" / "per_predicate_f1.png").is_file()
    assert said(caplog, "F1 ")[0].endswith(f"loss {d['loss']:.4f} on 4 samples -> {out / 'eval' / 'report.md'}")


def test_a_run_that_held_out_nothing_and_the_base_model_say_what_they_score(
    tiny_glm_dir, tmp_path, monkeypatch, caplog, write_dataset
):
    monkeypatch.chdir(tmp_path)
    data = alpaca_file(tmp_path / "mine.jsonl")
    run = tmp_path / "run"
    trained(tiny_glm_dir, data, run, MAX_SAMPLES=30, VAL_SIZE=0)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        picked = eval_data(Config.from_dict({"ADAPTER_DIR": str(run)}), run)
    assert warnings_of(caplog) == [
        f"{run} held out no records (VAL_SIZE=0 and no VAL_PATH): evaluating the first 60 "
        f"records of its training file {data} instead, which it trained on, so the scores "
        "flatter it; set EVAL_PATH=<file> to score records it has not seen"
    ]
    first = [json.loads(line)["instruction"] for line in data.read_text().splitlines()]
    assert [e.messages[0]["content"] for e in picked.examples] == first
    write_dataset(tmp_path / "data", n_train=20, n_dev=10)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert len(eval_data(Config.from_dict({"ADAPTER_DIR": "none"}), None).examples) == 10
    assert said(caplog) == [
        f"evaluating the 10 records of data/dev.jsonl (ADAPTER_DIR=none, the base model: "
        f"VAL_PATH, else data/dev.jsonl; {ANOTHER})"
    ]


def test_score_only_mode_scores_free_text_as_text(tmp_path, caplog):
    src = tmp_path / "preds.jsonl"
    src.write_text(json.dumps({"target": "the cat is on the mat", "output": "the cat sat on the mat"}) + "\n")
    with caplog.at_level(logging.INFO):
        d = run_evaluate(Config.from_dict({"PREDICTIONS": str(src)}))
    assert d["scored_as"] == "text" and d["loss"] is None and d["rouge_l"] == pytest.approx(5 / 6)
    assert said(caplog, "exact match ") == [
        f"exact match 0.0000, ROUGE-L 0.8333, BLEU-4 {d['bleu_4']:.4f} on 1 "
        f"samples -> {tmp_path / 'preds.eval' / 'report.md'}"
    ]
