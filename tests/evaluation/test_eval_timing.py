"""The expected time of `make evaluate` (app/evaluation/eval_timing.py): the arithmetic of the model (weights read
once per decode step, rows computed, prefill and the loss pass), how torch's padded batches and llama.cpp's
live rows differ, the two figures, and the line `make info` prints and evaluate logs. No test asserts a
measured duration (bench/infer.md checks the prediction against evaluate's wall time)."""

import logging
import re

import pytest

from app.config import Config
from app.evaluation import eval_timing
from app.plan import probes
from app.plan.estimator import ModelShape

LINE = re.compile(
    r"^expected evaluate: ~[\d.,]+ (s|min|h|days) for \d+ records on (torch (fp32|8bit|4bit)|llama\.cpp "
    r"\w+) \(answers as long as the references; ~[\d.,]+ (s|min|h|days) if every answer runs to its "
    r"\d+-token budget, as an untrained model's do\)$"
)
SHAPE = ModelShape(
    total_params=10**9,
    linear_params=8 * 10**8,
    other_params=2 * 10**8,
    max_linear=10**7,
    lora_io=0,
    linear_in=0,
    layers=24,
    hidden=2048,
    intermediate=5632,
    vocab=50000,
    heads=16,
    max_positions=4096,
)
RATES = (1e10, 1e11)  # bytes/s, dense FLOP/s


@pytest.fixture(autouse=True)
def idle(monkeypatch):
    monkeypatch.setattr(probes, "run_delay", lambda: 0.0)


def _parts(backend, quant, gguf_bytes=None):
    e = eval_timing.ENGINES[eval_timing.engine_key(backend, quant)]
    flops = 2.0 * (SHAPE.linear_params + SHAPE.hidden * SHAPE.vocab)
    step = eval_timing.weight_bytes(SHAPE, backend, quant, gguf_bytes) / (RATES[0] * e.bandwidth) + e.step_s
    return e, step, flops / (RATES[1] * e.row), flops / (RATES[1] * e.prefill)


@pytest.mark.parametrize(
    "backend, quant", [("torch", "4bit"), ("torch", "none"), ("llama.cpp", "q4_k_m"), ("llama.cpp", "f16")]
)
def test_one_record_is_startup_load_prefill_decode_and_loss(backend, quant):
    e, step, row, token = _parts(backend, quant)
    t = eval_timing.estimate(SHAPE, backend, quant, prompts=[100], answers=[20], budget=40, batch_size=8, rates=RATES)
    fixed = eval_timing.STARTUP_S + e.load_s + 121 * token  # load of 1e9 weights; the loss pass over 100 + 20 + EOS
    assert t.seconds == pytest.approx(fixed + 100 * token + 21 * (step + row))
    assert t.budget_seconds == pytest.approx(fixed + 100 * token + 40 * (step + row))
    no_load = eval_timing.estimate(SHAPE, backend, quant, [100], [20], 40, 8, RATES, load=False)
    assert t.seconds - no_load.seconds == pytest.approx(e.load_s)


def test_torch_decodes_finished_rows_llama_cpp_only_live_ones():
    """One batch of a 1-token and a 50-token answer: torch pads both prompts to 80 and runs 2 rows for all
    51 steps; llama.cpp prefills each prompt and decodes 2 + 51 rows in 51 steps."""
    kw = dict(prompts=[10, 80], answers=[0, 50], budget=100, batch_size=8, rates=RATES, load=False)
    loss = 11 + 131
    _, step, row, token = _parts("torch", "4bit")
    assert eval_timing.estimate(SHAPE, "torch", "4bit", **kw).seconds == pytest.approx(
        eval_timing.STARTUP_S + loss * token + 2 * (80 * token + 51 * row) + 51 * step
    )
    _, step, row, token = _parts("llama.cpp", "q4_k_m")
    assert eval_timing.estimate(SHAPE, "llama.cpp", "q4_k_m", **kw).seconds == pytest.approx(
        eval_timing.STARTUP_S + loss * token + 90 * token + 51 * step + (1 + 51) * row
    )


def test_batches_follow_predict_batch_size_and_prompts_of_similar_length():
    kw = dict(answers=[5] * 4, budget=10, rates=RATES, load=False)
    # sorted by length, [10, 10] and [200, 200] batch together: less padding than one at a time would suggest
    paired = eval_timing.estimate(SHAPE, "torch", "4bit", prompts=[10, 200, 10, 200], batch_size=2, **kw).seconds
    alone = eval_timing.estimate(SHAPE, "torch", "4bit", prompts=[10, 200, 10, 200], batch_size=1, **kw).seconds
    _, step, row, token = _parts("torch", "4bit")
    assert alone - paired == pytest.approx(2 * 6 * step)  # 4 batches of 6 steps instead of 2; the rows are the same


def test_weight_bytes_are_the_gguf_file_or_the_weights_as_predict_loads_them():
    assert eval_timing.weight_bytes(SHAPE, "llama.cpp", "q4_k_m", gguf_bytes=123456789) == 123456789
    assert eval_timing.weight_bytes(SHAPE, "llama.cpp", "q8_0") == pytest.approx(10**9 * 1.07)  # before the file exists
    assert eval_timing.weight_bytes(SHAPE, "torch", "none") == 4 * 10**9  # predict at QUANT_LEVEL=none loads fp32
    assert (
        eval_timing.weight_bytes(SHAPE, "torch", "4bit") < eval_timing.weight_bytes(SHAPE, "torch", "8bit") < 2 * 10**9
    )
    from typing import get_args

    from app.config.fields import GgufQuant

    quants = get_args(GgufQuant)
    assert {eval_timing.engine_key("llama.cpp", q) for q in quants} <= set(eval_timing.ENGINES) and len(quants) > 5


def test_the_line_reads_as_one_line_and_unknown_says_why():
    t = eval_timing.estimate(SHAPE, "llama.cpp", "q4_k_m", [100] * 30, [50] * 30, 80, 8, RATES)
    assert LINE.match(t.line()) and " for 30 records on llama.cpp q4_k_m " in t.line(), t.line()
    assert t.budget_seconds > t.seconds
    u = eval_timing.unknown(3, "the probe measured nothing: busy")
    assert u.line() == "expected evaluate: unknown (the probe measured nothing: busy)"


def _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, **settings):
    from app.cli.info import run_info

    monkeypatch.chdir(tmp_path)
    run_info(
        Config.from_dict(
            {"MODEL_NAME": str(tiny_glm_dir), "DATA_PATH": str(data_dir / "train.jsonl"), "MAX_STEPS": 4, **settings}
        )
    )
    return capsys.readouterr().out.splitlines()


def test_info_prints_the_evaluate_that_follows_the_run(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, EVAL_SAMPLES=5, QUANT_LEVEL="4bit")
    at = next(i for i, line in enumerate(out) if line.startswith("predicted peak RSS:"))
    assert out[at + 2].startswith("expected ~") and LINE.match(out[at + 3]), out[at : at + 4]
    assert " for 5 records on torch 4bit " in out[at + 3]  # EVAL_SAMPLES of the held-out records, as trained


def test_info_times_the_quant_level_the_tier_picks(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys):
    """QUANT_LEVEL=auto: the evaluate line names the engine at the level the plan chose (8bit on a 12-24 GB
    machine), which is what predict loads the run's adapter on."""
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, EVAL_SAMPLES=5)
    planned = next(
        re.match(r"^\s+QUANT_LEVEL\s+=\s+(\w+)", line).group(1)
        for line in out
        if re.match(r"^\s+QUANT_LEVEL\s+=", line)
    )
    line = next(line for line in out if line.startswith("expected evaluate"))
    assert LINE.match(line) and f" on torch {'fp32' if planned == 'none' else planned} " in line, (planned, line)


def test_info_names_llama_cpp_and_eval_path_when_set(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = _info(
        tiny_glm_dir,
        data_dir,
        tmp_path,
        monkeypatch,
        capsys,
        INFER_BACKEND="llama.cpp",
        GGUF_QUANT="q8_0",
        EVAL_PATH=str(data_dir / "dev.jsonl"),
        EVAL_SAMPLES=0,
    )
    n = sum(1 for line in (data_dir / "dev.jsonl").read_text().splitlines() if line.strip())
    line = next(line for line in out if line.startswith("expected evaluate"))
    assert LINE.match(line) and f" for {n} records on llama.cpp q8_0 " in line, line


ALT = re.compile(
    r"^  with INFER_BACKEND=(torch|llama\.cpp GGUF_QUANT=\w+) instead: ~[\d.,]+ (s|min|h|days) \(~[\d.,]+ "
    r"(s|min|h|days) at the budget\)(, plus export-gguf once)?$"
)


def test_info_gives_the_other_backends_time_where_it_runs_the_model(
    tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, llamacpp
):
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, EVAL_SAMPLES=5)
    at = next(i for i, line in enumerate(out) if line.startswith("expected evaluate"))
    assert ALT.match(out[at + 1]) and "INFER_BACKEND=llama.cpp GGUF_QUANT=q4_k_m instead" in out[at + 1], out[at + 1]
    assert out[at + 1].endswith(", plus export-gguf once")
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, EVAL_SAMPLES=5, INFER_BACKEND="llama.cpp")
    at = next(i for i, line in enumerate(out) if line.startswith("expected evaluate"))
    assert " on llama.cpp q4_k_m " in out[at] and ALT.match(out[at + 1])
    assert "INFER_BACKEND=torch instead" in out[at + 1]
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, EVAL_SAMPLES=5, METHOD="ptuning")
    at = next(i for i, line in enumerate(out) if line.startswith("expected evaluate"))
    assert not any(line.startswith("  with ") for line in out[at + 1 :])  # llama.cpp has no place for the prefixes
    out = _info(
        tiny_glm_dir,
        data_dir,
        tmp_path,
        monkeypatch,
        capsys,
        EVAL_SAMPLES=5,
        METHOD="ptuning",
        INFER_BACKEND="llama.cpp",
    )  # what evaluate would refuse: said, with torch's time beside it
    at = next(i for i, line in enumerate(out) if line.startswith("expected evaluate"))
    assert (
        out[at]
        == (
            "expected evaluate: unknown (INFER_BACKEND=llama.cpp: a METHOD=ptuning run's prefixes have no "
            "place in llama.cpp; use torch)"
        )
        and "INFER_BACKEND=torch instead" in out[at + 1]
    ), out[at:]


def test_info_without_llama_cpp_says_so_and_gives_torch_only(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys):
    from app.inference import llamacpp

    monkeypatch.setattr(llamacpp, "missing", lambda what: f"{what} needs llama.cpp's Python binding: make setup-gguf")
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, EVAL_SAMPLES=5)
    at = next(i for i, line in enumerate(out) if line.startswith("expected evaluate"))
    assert LINE.match(out[at]) and not any(line.startswith("  with ") for line in out[at + 1 :])
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, EVAL_SAMPLES=5, INFER_BACKEND="llama.cpp")
    at = next(i for i, line in enumerate(out) if line.startswith("expected evaluate"))
    assert out[at] == (
        "expected evaluate: unknown (INFER_BACKEND=llama.cpp needs llama.cpp's Python binding: make setup-gguf)"
    ) and ALT.match(out[at + 1]), out[at:]


def test_info_says_which_setting_when_nothing_is_held_out(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = _info(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys, VAL_SIZE=0)
    assert (
        "expected evaluate: unknown (the run holds out no records to score (VAL_SIZE=0, no VAL_PATH); set "
        "EVAL_PATH=<file>)" in out
    )


def test_evaluate_logs_its_estimate_and_the_tokens_it_generated(tiny_glm_dir, data_dir, tmp_path, monkeypatch, caplog):
    from app.evaluation.evaluate import run_evaluate

    monkeypatch.chdir(tmp_path)
    cfg = Config.from_dict(
        {
            "MODEL_NAME": str(tiny_glm_dir),
            "ADAPTER_DIR": "none",
            "EVAL_SAMPLES": 3,
            "EVAL_PATH": str(data_dir / "dev.jsonl"),
            "EVAL_DIR": str(tmp_path / "eval"),
        }
    )
    with caplog.at_level(logging.INFO):
        run_evaluate(cfg)
    messages = [r.getMessage() for r in caplog.records]
    estimate = next(m for m in messages if m.startswith("expected evaluate"))
    assert LINE.match(estimate) and " for 3 records on torch fp32 " in estimate, estimate
    budget = int(re.search(r"its (\d+)-token budget", estimate).group(1))
    made = next(m for m in messages if m.startswith("generated "))
    tokens = int(re.match(r"generated (\d+) new tokens for 3 answers in ", made).group(1))
    assert 3 <= tokens <= 3 * budget  # an untrained model: each answer at least one token, at most the budget
