"""`make info`: what this machine has, the tier, every resolved setting and why, the predicted peak
memory, the expected time per optimizer step and for the run (app/plan/train_timing.py), and how long the
`make evaluate` after it takes (app/evaluation/eval_timing.py).

It runs the training run's own planning steps (setup, then the data's lengths and the memory
fit) and stops before loading weights, so what it prints is what `make train` would use.
"""

from __future__ import annotations

import sys

from app.cli.preflight import default_data_missing, preflight
from app.config import Config
from app.core.errors import ModelUnavailable, UserError
from app.evaluation.eval_timing import EvalTime, unknown
from app.models.integrity import weights_missing
from app.plan.explain import format_info
from app.plan.tiers import fit_memory
from app.plan.train_timing import duration, expected_time
from app.training.preference_trainer import describe_stage
from app.training.train import FineTuner


def run_info(cfg: Config) -> None:
    """Detected resources, tier, every resolved setting and why, predicted peak memory and time.

    Offline with a hub model that is not downloaded yet, it still shows all of that except the
    model's shape and the estimate, with the download command, and succeeds: it is the first
    thing a user runs. With the config (and tokenizer) but not the weights, a local dir or the HF
    cache's copy, it plans everything from the config and then says which weights are missing and
    how to fetch them: "will it fit, how long will it take?" comes before a 12 GB download."""
    preflight(cfg, "info")
    ft, name = FineTuner(cfg), cfg.model.model_name
    try:
        ft.setup()
    except ModelUnavailable as e:
        sys.stdout.write(
            format_info(ft.resources, ft.plan, None, name) + "\n\n"  # cli-output
            f"model: {name} is not downloaded here and the hub is out of reach, so its shape, "
            "MAX_SEQ_LEN and the memory estimate are unknown until it is. Download it with:\n"
            f"  {e.command}\nthen use MODEL_NAME={e.command.rsplit(' ', 1)[-1]}\n"
        )
        return
    except UserError:
        if ft.plan is not None:  # show what was detected before the model problem
            sys.stdout.write(format_info(ft.resources, ft.plan, None, name) + "\n")  # cli-output
        raise
    name = ft.cfg.model.model_name  # STAGE=dpo/kto continuing ADAPTER_DIR plans on that adapter's base
    samples = None
    if default_data_missing(cfg):  # nothing to measure yet: the tier's lengths, and say why
        from app.cli.workspace import SAMPLE_TRAIN

        samples = round(min(SAMPLE_TRAIN, ft.cfg.data.max_samples or SAMPLE_TRAIN) * (1 - ft.cfg.data.val_size))
        ft.plan = fit_memory(ft.plan, ft.resources, ft.shape, None).warn(
            f"DATA_PATH={cfg.data.data_path} does not exist yet: `make train` writes the synthetic sample data "
            "there first; MAX_SEQ_LEN above is the tier's, not your data's"
        )
    else:
        ft.prepare_data(build_cache=False)  # info writes nothing: a missing token cache is estimated
        samples = ft.records.get("train")  # the file's count: without a token cache the rows are a preview's
    timing = expected_time(
        ft.cfg, ft.shape, ft.model_path, ft.train_rows, ft.plan.device == "cuda", train_samples=samples
    )
    evaluate = "" if default_data_missing(cfg) else evaluate_lines(ft)
    head, sep, warnings = format_info(ft.resources, ft.plan, ft.shape, name).partition("\nwarning: ")
    stage = describe_stage(ft.cfg)
    stage = f"\n{stage}" if stage else ""
    sys.stdout.write(f"{head}\n{timing.line()}{stage}{evaluate}{sep}{warnings}\n")  # cli-output: times by the memory
    missing = weights_missing(name)
    if missing:
        sys.stdout.write(f"\n{missing.notice()}\n")  # cli-output


def evaluate_lines(ft: FineTuner) -> str:
    """The `make evaluate` after this run, before anything is exported or loaded: on INFER_BACKEND as predict would
    load it, and on the other backend where it can run this model."""
    examples, why = eval_examples(ft)
    if why:
        return f"\n{unknown(len(examples), why).line()}"
    pr = ft.plan.cfg.predict
    chosen, other = pr.infer_backend, "torch" if pr.infer_backend == "llama.cpp" else "llama.cpp"
    problem = _llamacpp_problem(ft)
    first = (
        unknown(len(examples), problem) if chosen == "llama.cpp" and problem else evaluate_time(ft, examples, chosen)
    )
    lines = f"\n{first.line()}"
    if other == "torch" or not problem:
        alt = evaluate_time(ft, examples, other)
        if not alt.unknown:
            export = ", plus export-gguf once" if other == "llama.cpp" else ""
            setting = f"INFER_BACKEND={other}" + (f" GGUF_QUANT={pr.gguf_quant}" if other == "llama.cpp" else "")
            lines += (
                f"\n  with {setting} instead: ~{duration(alt.seconds)} (~{duration(alt.budget_seconds)} at the "
                f"budget){export}"
            )
    return lines


def eval_examples(ft: FineTuner) -> tuple[list, str]:
    """(the records evaluate would score, why there are none): EVAL_PATH's when set, else the ones the run holds
    out; EVAL_SAMPLES of them."""
    from app.data.records import read_examples

    cfg = ft.plan.cfg
    ev, d = cfg.evaluation, cfg.data
    if ev.eval_path:
        try:
            examples = [
                e for e in read_examples(ev.eval_path, d.data_format, d.max_bad_ratio, "EVAL_PATH")[0] if e.messages
            ]
        except UserError as e:  # evaluate refuses it in its own line; the plan above still stands
            return [], str(e)
    else:
        examples = list(ft.data.val_examples)
    examples = examples[: ev.eval_samples] if ev.eval_samples else examples
    if not examples:
        return [], "the run holds out no records to score (VAL_SIZE=0, no VAL_PATH); set EVAL_PATH=<file>"
    return examples, ""


def _llamacpp_problem(ft: FineTuner) -> str:
    """Why INFER_BACKEND=llama.cpp cannot run this run's model ("" if it can), as `make evaluate` would refuse it:
    llama.cpp missing, a P-Tuning run, or a family GGUF export does not take (app/inference/gguf_export.py)."""
    from transformers import AutoConfig

    from app.inference import llamacpp
    from app.inference.gguf_source import FAMILIES

    cfg = ft.plan.cfg
    if cfg.lora.method == "ptuning":
        return "INFER_BACKEND=llama.cpp: a METHOD=ptuning run's prefixes have no place in llama.cpp; use torch"
    missing = llamacpp.missing("INFER_BACKEND=llama.cpp")
    if missing:
        return missing
    config = AutoConfig.from_pretrained(ft.model_path, trust_remote_code=cfg.model.trust_remote_code)
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    return (
        ""
        if arch in FAMILIES
        else (
            f"INFER_BACKEND=llama.cpp: {arch} is not a family GGUF export takes "
            f"({', '.join(FAMILIES.values())}); use torch"
        )
    )


def evaluate_time(ft: FineTuner, examples: list, backend: str) -> EvalTime:
    """app/evaluation/eval_timing.py's estimate on ``backend``, with the weights predict would load for this run."""
    from app.evaluation.eval_timing import expected_evaluate

    cfg = ft.plan.cfg
    pr = cfg.predict
    if backend == "llama.cpp":
        return expected_evaluate(ft.shape, ft.tokenizer, examples, "llama.cpp", pr.gguf_quant, pr.predict_batch_size)
    quant = "none" if cfg.lora.method == "full" else cfg.resources.quant_level
    return expected_evaluate(ft.shape, ft.tokenizer, examples, "torch", quant, pr.predict_batch_size)
