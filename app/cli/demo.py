"""`make demo`: an offline proof that the whole pipeline carries a learning signal.

Synthetic triplet data from the project's generator, a small GLM-family model trained from
random initialization (METHOD=full), and generation-based F1 on held-out sentences whose
subjects never occur in training, evaluated every EVAL_STEPS. A wall-clock budget
(DEMO_MINUTES, default 15) ends training; the F1 curve goes to the log, the loss plot and
bench/demo.md. Any setting can still be overridden (e.g. `make demo DEMO_MINUTES=3`).

Why the recipe looks the way it does (measured on 2 CPU cores, bench/demo.md and docs/benchmarks.md):
- Names must be copied from the sentence, which needs an induction circuit (a previous-token head
  feeding a copy head). With a few thousand samples seen for many epochs, a small model memorizes
  the training names instead and answers every held-out sentence with one of them (F1 0 after
  30 minutes). So the demo trains on one pass over fresh samples, where a name is almost never
  seen twice, plus as many "repeat this sentence" samples (COPY_FRACTION), the simplest task
  that needs the same circuit.
- The circuit forms only with low-noise gradients: on a clean copy probe a 2-layer model at
  8 samples per step never left chance in 3,000 steps, at 32 it did within ~1,300 steps. Hence
  BATCH_SIZE 32, and a model small enough (2 layers, hidden 128, ~0.9M parameters, ~20k
  tokens/s) to take thousands of such steps in the budget; 2x wider learned less per minute.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from app.config import Config, Setting
from app.core.atomic import atomic_write_text
from app.core.generated import record as record_generated
from app.core.generated import refuse_unless_generated
from app.data.synthetic import build_context, generate_samples, parse_target

if TYPE_CHECKING:
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

DEMO_DIR = Path("models/demo-glm")
DATA_DIR = Path("data/demo")
# Two layers are the fewest an induction circuit needs; small enough for ~20k tokens/s on 2 cores.
DEMO_DIMS = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
# PRECISION=fp32: at this size the bf16 casts cost more than the bf16 matmuls save; packing
# (PACKING=auto) is worth 1.7x over padding.
DEFAULTS: dict[Setting, Any] = {
    "METHOD": "full",
    "QUANT_LEVEL": "none",
    "TIER": "none",
    "LEARNING_RATE": 3e-3,
    "WARMUP_RATIO": 0.03,
    "LR_SCHEDULER": "constant_with_warmup",
    "BATCH_SIZE": 32,
    "GRAD_ACCUM": 1,
    "NUM_EPOCHS": 1,
    "EVAL_METRIC": "f1",
    "EVAL_STEPS": 400,
    "EVAL_SAMPLES": 64,
    "SAVE_STEPS": 400,
    "LOGGING_STEPS": 20,
    "MAX_SEQ_LEN": 384,
    "LORA_DROPOUT": 0.0,
    "PRECISION": "fp32",
    "PREDICT_BATCH_SIZE": 32,  # F1 evaluations generate 32 prompts at a time
    "OUTPUT_DIR": "models/demo",
    "MODEL_NAME": str(DEMO_DIR),
    "OVERWRITE": True,
}  # `make demo` again: a new demo replaces the last
# Fresh extraction samples per minute of DEMO_MINUTES: the demo trains ~6.6 steps/s of 32 on 2 Xeon cores with AMX,
# half of them copies, so 6,000 a minute fill the budget without a sample seen twice (5,000 ran out at 11.8 min).
TRAIN_PER_MINUTE = 6000
N_HELDOUT = 200
COPY_FRACTION = 1.0  # "repeat this sentence" samples added, per extraction sample
COPY_INSTRUCTION = "请原样复述下面的句子："
# The budget's last 15% anneal the learning rate to 0: the held-out F1 of a constant-rate run still moves
# +-0.05 between evaluations (bench/demo-25min.md), and a cooled-down model sits at the low-noise end.
COOLDOWN = 0.15


class TimeBudget(TrainerCallback):
    """Stop (with a final evaluation) once the wall-clock budget is spent. Over the run's last ``cooldown``
    share the learning rate falls linearly towards 0. The run ends at the budget or at the end of its one
    pass over the data, whichever comes first, and which one is not known in advance (it depends on the
    machine's speed), so the share left is the smaller of the two."""

    def __init__(self, seconds: float, cooldown: float = 0.0):
        self.seconds, self.cooldown, self.t0 = seconds, cooldown, time.perf_counter()
        self.announced = False

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        **kw: Any,
    ) -> None:
        left = self.seconds - (time.perf_counter() - self.t0)
        if left <= 0:
            control.should_training_stop = True
            control.should_evaluate = True
            return
        share = min(left / self.seconds, 1 - state.global_step / state.max_steps if state.max_steps else 1.0)
        if optimizer is None or share >= self.cooldown:
            return
        lr = args.learning_rate * share / self.cooldown
        if not self.announced:
            log.info(
                "demo: the last %.0f%% of the run (by time or by steps): the learning rate falls from %g towards 0",
                100 * self.cooldown,
                args.learning_rate,
            )
            self.announced = True
        for group in optimizer.param_groups:  # this step's rate ...
            group["lr"] = lr
        if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [lr] * len(lr_scheduler.base_lrs)  # ... and what the schedule logs next


def write_demo_data(
    out: Path, n_train: int, n_heldout: int, seed: int, copy_fraction: float = 0.0
) -> tuple[Path, Path]:
    """Train / held-out split where no held-out subject appears anywhere in training.

    ``copy_fraction``: that many "repeat this sentence" samples per extraction sample are mixed
    into training (the sentence of a training sample as prompt and as answer)."""
    pool = generate_samples(n_train + 12 * n_heldout, seed=seed)  # ~1 in 6 has an unseen subject
    train, seen = pool[:n_train], set[str]()
    for s in train:
        for t in parse_target(s["target"]):
            seen.update((t["subject"], t["object"]))
    heldout = [s for s in pool[n_train:] if not any(t["subject"] in seen for t in parse_target(s["target"]))]
    heldout = heldout[:n_heldout]
    rng = random.Random(seed)
    copies = [
        {"context": build_context(COPY_INSTRUCTION, sentence_of(s["context"])), "target": sentence_of(s["context"])}
        for s in rng.sample(train, int(copy_fraction * len(train)))
    ]
    train = train + copies
    rng.shuffle(train)
    files = (("train.jsonl", train), ("heldout.jsonl", heldout))
    for name, _ in files:  # all checked before any is written
        refuse_unless_generated(out / name, "make demo")
    for name, rows in files:
        atomic_write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        record_generated(out / name)
    log.info(
        "demo data: %d train (%d of them copy samples), %d held-out samples with unseen subjects -> %s",
        len(train),
        len(copies),
        len(heldout),
        out,
    )
    return out / "train.jsonl", out / "heldout.jsonl"


def sentence_of(context: str) -> str:
    """The sentence inside a generated prompt (build_context's layout)."""
    return context.split("\n\n", 1)[1].rsplit("\nAnswer: ", 1)[0]


def demo_model(seed: int) -> Path:
    """DEMO_DIR with DEMO_DIMS, rebuilt when it is missing or was built with other dimensions."""
    from app.models.tiny import build_tiny_model

    config = DEMO_DIR / "config.json"
    if config.is_file():
        built = json.loads(config.read_text())
        if all(built.get(k) == v for k, v in DEMO_DIMS.items()):
            return DEMO_DIR
        log.info("%s was built with other dimensions than DEMO_DIMS; rebuilding it", DEMO_DIR)
        shutil.rmtree(DEMO_DIR)
    return build_tiny_model("tiny", DEMO_DIR, seed=seed, dims=DEMO_DIMS)


def reached_target(curve: list[tuple[float, int, float]], final: dict[str, Any], minutes: float) -> bool:
    """F1 >= 0.9 within 15 minutes of training: on the curve's first 64 samples at or before
    900 s, or on all held-out samples after a budget of at most 15 minutes (TimeBudget stops it)."""
    return any(f1 >= 0.9 and t <= 900 for t, _, f1 in curve) or (final["triplet_f1"] >= 0.9 and minutes <= 15)


def what_bounds(curve: list[tuple[float, int, float]]) -> str:
    """The FAIL report's line on what bounds the run: when copying showed on the held-out curve. Measured by steps
    (docs/benchmarks.md), no recipe tried moved that below ~2,000 steps of 32, so the rest of the budget is what F1
    has to climb in."""
    first = next(((t, step) for t, step, f1 in curve if f1 > 0), None)
    if first is None:
        return "What bounds it: held-out F1 never left 0, so copying from the sentence had not formed by the end."
    return (
        f"What bounds it: held-out F1 first left 0 at step {first[1]} ({first[0]:,.0f} s), when copying from the "
        f"sentence formed (no recipe tried moved that below ~2,000 steps of 32: docs/benchmarks.md), and F1 had "
        f"the {max(t for t, _, _ in curve) - first[0]:,.0f} s after it to climb."
    )


def run_demo(cfg: Config) -> dict[str, Any]:
    from app.evaluation.evaluate import run_evaluate
    from app.training.train import FineTuner

    minutes = cfg.evaluation.demo_minutes
    n_train = int(TRAIN_PER_MINUTE * minutes)
    train_path, heldout = write_demo_data(DATA_DIR, n_train, N_HELDOUT, cfg.train.seed, COPY_FRACTION)
    demo_model(cfg.train.seed)
    recipe: dict[Setting, Any] = {**DEFAULTS, "DATA_PATH": str(train_path), "VAL_PATH": str(heldout)}
    cfg = cfg.replace({var: value for var, value in recipe.items() if var not in cfg.explicit})
    ft = FineTuner(cfg)
    t0 = time.perf_counter()
    ft.setup().prepare_data()
    t1, load_start = time.perf_counter(), os.getloadavg()[0]
    result = ft.train(callbacks=[TimeBudget(minutes * 60, COOLDOWN)])
    prep_s, train_s, load_end = t1 - t0, time.perf_counter() - t1, os.getloadavg()[0]
    final = run_evaluate(
        Config.from_dict(
            {**cfg.to_dict(), "ADAPTER_DIR": str(result.output_dir), "EVAL_PATH": str(heldout), "EVAL_SAMPLES": 0}
        )
    )
    from app.training.metrics_file import read_metrics

    curve = [
        (r["time_s"], r["step"], r["eval_f1"])
        for r in read_metrics(result.output_dir / "metrics.jsonl")
        if "eval_f1" in r
    ]
    ran = ft.cfg.train  # as planned: a tier (TIER=auto) or the memory guard may have changed the batch
    lines = [
        f"# Demo: tiny GLM from scratch on synthetic triplets ({os.cpu_count()} CPUs)",
        "",
        f"Model {DEMO_DIMS}, METHOD=full, {ran.batch_size * ran.grad_accum} samples per step (packed, PRECISION="
        f"{ran.precision}), LR {ran.learning_rate:g} (falling to 0 over the budget's last "
        f"{COOLDOWN:.0%}), budget {minutes:g} min of training including "
        f"the evaluations (data preparation before it). Training data: one pass over up to {n_train:,} fresh "
        f"generated samples "
        f'plus {COPY_FRACTION:.0%} as many "{COPY_INSTRUCTION}" samples; held-out subjects never occur '
        f"in training.",
        "",
        f"Load average (1 min): {load_start:.2f} when training started, {load_end:.2f} when it ended (the demo's "
        f"own threads count about {os.cpu_count()}; above that, other work shared the cores).",
        "",
        "| wall-clock s | step | held-out F1 (first 64) |",
        "|---|---|---|",
    ]
    lines += [f"| {t:,.0f} | {step} | {f1:.4f} |" for t, step, f1 in curve]
    lines += [
        "",
        f"Final, all {final['n_samples']} held-out samples: F1 {final['triplet_f1']:.4f} "
        f"(typed {final['triplet_f1_typed']:.4f}), valid JSON {100 * final['json_valid_rate']:.0f}%, "
        f"after {train_s / 60:.1f} min of training ({result.tokens_per_s:,.0f} tokens/s; data "
        f"preparation before it {prep_s / 60:.1f} min).",
        f"Target: F1 >= 0.9 within 15 min -> {'PASS' if reached_target(curve, final, minutes) else 'FAIL'}",
    ]
    lines += [] if reached_target(curve, final, minutes) else [what_bounds(curve)]
    report = "\n".join(lines) + "\n"
    # the default budget's report is the benchmark; a longer or shorter run gets its own file
    atomic_write_text(Path("bench") / ("demo.md" if minutes == 15 else f"demo-{minutes:g}min.md"), report)
    for t, step, f1 in curve:
        log.info("F1 curve: %6.0f s  step %5d  F1 %.4f", t, step, f1)
    return {"final": final, "curve": curve, "train_seconds": train_s, "prep_seconds": prep_s}
