"""The commands of ``python -m app``: what each runs, its one-line summary and the settings it reads (its
``--help``, docs/commands.md and the web UI's forms come from this table). Each handler imports its stage
only when run, so ``--help`` and the pre-flight stay fast."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

from app.config import Config, Setting
from app.core.errors import UserError

log = logging.getLogger("app")


def _train(cfg: Config) -> None:
    from contextlib import nullcontext

    from app.cli.preflight import preflight
    from app.cli.workspace import ensure_default_data
    from app.training import dist, runlock

    preflight(cfg, "train")  # before importing torch: every cheap problem at once, in well under a second
    ensure_default_data(cfg)  # the quick start: sample data, only at the default DATA_PATH and only if missing
    # One run per OUTPUT_DIR, from before its checkpoints are read until its outputs are published.
    lock = runlock.hold(cfg.train.output_dir, "train", doing="training there too", alternative=True)
    with lock if dist.owns_run_lock(cfg) else nullcontext():
        if dist.wants_launch(cfg):  # NPROC/NNODES: become torchrun, whose workers run this command again
            from app.training.launcher import launch

            launch(cfg)
            return
        dist.watch_launcher()
        from app.training.train import FineTuner

        FineTuner(cfg).run()
        dist.close()


def _info(cfg: Config) -> None:
    from app.cli.info import run_info

    run_info(cfg)


# The prediction commands, one per mode. Each sets its own mode, so a PROMPT, INPUT_FILE or INTERACTIVE
# left in .env or the environment for one never changes another: `make predict` answers the built-in
# prompt with a PROMPT in .env, `make chat` chats with an INPUT_FILE there.
# The commands whose pre-flight (app.cli.preflight) validates the settings.
PREFLIGHTED = frozenset(
    {
        "train",
        "info",
        "predict",
        "predict-custom",
        "predict-file",
        "chat",
        "evaluate",
        "merge",
        "export-onnx",
        "export-gguf",
    }
)
_MODES: dict[str, dict[Setting, object]] = {
    "predict": {"PROMPT": "", "INPUT_FILE": "", "INTERACTIVE": False},
    "predict-custom": {"INPUT_FILE": "", "INTERACTIVE": False},
    "predict-file": {"INTERACTIVE": False},
    "chat": {"INPUT_FILE": "", "INTERACTIVE": True},
}


def _answer(command: str) -> Callable[[Config], None]:
    def run(cfg: Config) -> None:
        from app.cli.preflight import preflight
        from app.inference.predict import run_predict

        cfg = cfg.replace(_MODES[command])
        preflight(cfg, command)  # with the one setting this mode needs (PROMPT, INPUT_FILE), before torch
        run_predict(cfg)

    return run


def predict_mode(cfg: Config, given: set[str]) -> str:
    """`predict` with PROMPT=, INPUT_FILE= or INTERACTIVE=1 on its own command line: the older spelling of
    predict-custom, predict-file and chat, kept for scripts (only arguments count, never .env)."""
    p = cfg.predict
    if "INPUT_FILE" in given and p.input_file:
        return "predict-file"
    if "INTERACTIVE" in given and p.interactive:
        return "chat"
    return "predict-custom" if "PROMPT" in given and p.prompt else "predict"


def _checked(command: str, runner: str, locked: bool = False) -> Callable[[Config], None]:
    """A command whose pre-flight (app.cli.preflight) runs first, then ``runner`` ("module:function", imported only
    then: torch comes after the cheap checks); ``locked``: it writes into the run it reads (_run_lock)."""

    def run(cfg: Config) -> None:
        from contextlib import nullcontext
        from importlib import import_module

        from app.cli.preflight import preflight

        preflight(cfg, command)
        module, name = runner.split(":")
        with _run_lock(cfg, command) if locked else nullcontext():
            getattr(import_module(module), name)(cfg)

    return run


def _run_lock(cfg: Config, command: str) -> AbstractContextManager[None]:
    """merge and export-onnx write into the run they read (merged/ and onnx/ inside it): never while
    it is still training, and never two at once (app/training/runlock.py)."""
    from contextlib import nullcontext

    from app.models.artifacts import find_adapter
    from app.training.runlock import hold

    adapter = find_adapter(cfg)
    if adapter is None:  # ADAPTER_DIR=none: the base model, exported under models/onnx/
        return nullcontext()
    return hold(adapter, command, setting="ADAPTER_DIR", doing=command, optional=True)


def _demo(cfg: Config) -> None:
    from app.cli.demo import run_demo

    run_demo(cfg)


def _make_tiny(cfg: Config) -> None:
    """MODEL_NAME's tiny model, or the GLM one (tiny) when MODEL_NAME was not set."""
    from app.models.tiny import FAMILIES, resolve_model

    name = cfg.model.model_name if "MODEL_NAME" in cfg.explicit else "tiny"
    if name not in FAMILIES:
        raise UserError(f"MODEL_NAME={name}: make-tiny-model builds one of {', '.join(FAMILIES)}; e.g. MODEL_NAME=tiny")
    log.info("tiny model ready at %s", resolve_model(name))


def _generate_data(cfg: Config) -> None:
    from app.cli.workspace import write_sample_data

    write_sample_data(
        cfg.data.data_path,
        seed=cfg.train.seed,
        replace=cfg.data.replace_data,
        stage=cfg.train.stage,
        named="DATA_PATH" in cfg.explicit,
    )


def _clean(cfg: Config) -> None:
    from app.cli.workspace import clean

    clean()


def _remove_run(cfg: Config) -> None:
    from app.cli.removal import remove_run

    remove_run(cfg)


def _show_config(cfg: Config) -> None:
    import json

    sys.stdout.write(json.dumps(cfg.to_dict(), ensure_ascii=False, indent=2) + "\n")  # cli-output


def _docs(cfg: Config) -> None:
    from app.cli.reference import write_pages

    write_pages()


def _env_template(cfg: Config) -> None:
    from app.plan.explain import env_template

    sys.stdout.write(env_template())  # cli-output


class Command(NamedTuple):
    run: Callable[[Config], None]
    summary: str
    reads: tuple[str, ...] = ()  # the settings it reads: names, or [section]s of `python -m app --help`
    doc: str = ""  # more for its --help (else run's docstring)


def _serve(cfg: Config) -> None:
    """Loads the base model once (MODEL_NAME, else the one the adapters were trained on, at their QUANT_LEVEL;
    with INFER_BACKEND=llama.cpp as a GGUF at GGUF_QUANT, each adapter as a llama.cpp LoRA) and every adapter
    of ADAPTERS, then answers OpenAI-style requests on SERVE_HOST:SERVE_PORT until stopped.
    The request's `model` picks the adapter; GET /v1/models lists them."""
    from app.serve.api_server import run_serve

    run_serve(cfg)


# The settings that pick and load a model (an adapter, its base), and that shape its answers.
_LOAD = ("MODEL_NAME", "TRUST_REMOTE_CODE", "NUM_THREADS", "QUANT_LEVEL", "ADAPTER_DIR", "OUTPUT_DIR")
_ANSWER = _LOAD + ("MAX_NEW_TOKENS", "TEMPERATURE", "INFER_BACKEND", "GGUF_QUANT", "GGUF_DIR")
_PLAN = ("model", "data", "lora", "resources", "train", "distributed")

COMMANDS: dict[str, Command] = {
    "train": Command(
        _train,
        "fine-tune MODEL_NAME on DATA_PATH, write the adapter to OUTPUT_DIR",
        _PLAN + ("ADAPTER_DIR", "EVAL_METRIC", "EVAL_SAMPLES", "MAX_NEW_TOKENS", "PREDICT_BATCH_SIZE"),
    ),
    "info": Command(_info, "show RAM/CPUs/GPUs, the tier, every resolved setting and the predicted peak", _PLAN),
    "predict": Command(
        _answer("predict"),
        "answer the built-in triplet prompt with the last adapter",
        _ANSWER,
        "Streams the answer to the built-in prompt (a sentence about a TV series) to stdout, from the "
        "last trained adapter (ADAPTER_DIR) on the base model it was trained on.",
    ),
    "predict-custom": Command(
        _answer("predict-custom"),
        "answer PROMPT with the last adapter",
        _ANSWER + ("PROMPT",),
        "Streams the answer to PROMPT to stdout. PROMPT must not be empty or blank "
        "(`predict` answers the built-in prompt).",
    ),
    "predict-file": Command(
        _answer("predict-file"),
        "answer every line of INPUT_FILE -> OUTPUT_FILE (.jsonl)",
        _ANSWER + ("INPUT_FILE", "OUTPUT_FILE", "DATA_FORMAT", "PREDICT_BATCH_SIZE"),
        "Each non-empty line of INPUT_FILE (required) is a prompt or a record in any DATA_FORMAT; "
        "one JSON line per answer, with the reference answer when the record has one.",
    ),
    "chat": Command(
        _answer("chat"),
        "interactive multi-turn chat in the terminal with the last adapter",
        _ANSWER,
        "/help lists the chat's commands, /reset clears the history, /exit or Ctrl-D ends it.",
    ),
    "evaluate": Command(
        _checked("evaluate", "app.evaluation.evaluate:run_evaluate"),
        "generate on the run's held-out records (or EVAL_PATH), score triplet P/R/F1, "
        "else exact match, ROUGE-L, BLEU-4 (or --predictions FILE: score only)",
        _ANSWER + ("DATA_FORMAT", "MAX_BAD_RATIO", "VAL_PATH", "MAX_SEQ_LEN", "PREDICT_BATCH_SIZE", "evaluation"),
    ),
    "serve": Command(
        _serve,
        "serve the base and its adapters over an OpenAI-compatible API on SERVE_PORT",
        _LOAD[:4] + _ANSWER[len(_LOAD) :] + ("serve",),  # not ADAPTER_DIR or OUTPUT_DIR: ADAPTERS names them
    ),
    "merge": Command(
        _checked("merge", "app.inference.merge:run_merge", locked=True),
        "fold the LoRA adapter into its base: a standalone model in MERGED_DIR",
        _LOAD + ("MERGED_DIR",),
    ),
    "export-onnx": Command(
        _checked("export-onnx", "app.inference.export:run_export", locked=True),
        "merged model (merged first if needed) -> ONNX for ONNX Runtime in ONNX_DIR",
        _LOAD + ("MERGED_DIR", "ONNX_DIR"),
    ),
    "export-gguf": Command(
        _checked("export-gguf", "app.inference.gguf_export:run_export_gguf", locked=True),
        "the run as one GGUF (GGUF_QUANT) + Ollama Modelfile in GGUF_DIR",
        _LOAD + ("GGUF_QUANT", "GGUF_DIR", "GGUF_ADAPTER_ONLY"),
    ),
    "demo": Command(
        _demo,
        "offline proof of learning: tiny GLM from scratch on synthetic data, held-out F1",
        ("DEMO_MINUTES", "SEED", "BATCH_SIZE", "LEARNING_RATE", "PRECISION", "NUM_THREADS"),
    ),
    "make-tiny-model": Command(
        _make_tiny,
        "build the random tiny model MODEL_NAME=tiny|tiny-qwen2|tiny-qwen3|tiny-llama|tiny-gemma3",
        ("MODEL_NAME",),
    ),
    "generate-data": Command(
        _generate_data,
        "write the synthetic triplet sample data to DATA_PATH and dev.jsonl "
        "beside it; STAGE=dpo/kto: preference pairs / KTO records, by default "
        "to data/pref.jsonl / data/kto.jsonl (never over a file of yours; "
        "REPLACE_DATA=1 to overwrite)",
        ("DATA_PATH", "SEED", "REPLACE_DATA", "STAGE"),
    ),
    "clean": Command(
        _clean,
        "remove what the tool made and can remake (tiny models, unchanged sample data, caches); "
        "never your data or a trained run",
    ),
    "remove-run": Command(_remove_run, "delete the trained run OUTPUT_DIR=<dir> (and nothing else)", ("OUTPUT_DIR",)),
    "config": Command(
        _show_config,
        "print the resolved settings (after .env, environment and arguments)",
        _PLAN + ("predict", "evaluation"),
    ),
    "env-template": Command(_env_template, "print a .env template with every variable and its default"),
    "docs": Command(_docs, "regenerate docs/configuration.md and docs/commands.md from the code (developers)"),
}
