"""Command line: ``python -m app <command> [KEY=value ...]``.

The Makefile and docker compose only call this. Settings come from KEY=value arguments,
the environment and .env (in that order of precedence); see ``python -m app --help``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

from app.config import Config, parse_cli_overrides
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
_MODES: dict[str, dict[str, object]] = {
    "predict": {"prompt": "", "input_file": "", "interactive": False},
    "predict-custom": {"input_file": "", "interactive": False},
    "predict-file": {"interactive": False},
    "chat": {"input_file": "", "interactive": True},
}


def _answer(command: str) -> Callable[[Config], None]:
    def run(cfg: Config) -> None:
        from app.cli.preflight import preflight
        from app.inference.predict import run_predict

        cfg = cfg.replace({name.upper(): value for name, value in _MODES[command].items()})
        preflight(cfg, command)  # with the one setting this mode needs (PROMPT, INPUT_FILE), before torch
        run_predict(cfg)

    return run


def _predict_mode(cfg: Config, given: set[str]) -> str:
    """`predict` with PROMPT=, INPUT_FILE= or INTERACTIVE=1 on its own command line: the older spelling of
    predict-custom, predict-file and chat, kept for scripts (only arguments count, never .env)."""
    p = cfg.predict
    if "INPUT_FILE" in given and p.input_file:
        return "predict-file"
    if "INTERACTIVE" in given and p.interactive:
        return "chat"
    return "predict-custom" if "PROMPT" in given and p.prompt else "predict"


def _evaluate(cfg: Config) -> None:
    from app.cli.preflight import preflight

    preflight(cfg, "evaluate")
    from app.evaluation.evaluate import run_evaluate

    run_evaluate(cfg)


def _merge(cfg: Config) -> None:
    from app.cli.preflight import preflight

    preflight(cfg, "merge")
    from app.inference.merge import run_merge

    with _run_lock(cfg, "merge"):
        run_merge(cfg)


def _export_onnx(cfg: Config) -> None:
    from app.cli.preflight import preflight

    preflight(cfg, "export-onnx")
    from app.inference.export import run_export

    with _run_lock(cfg, "export-onnx"):
        run_export(cfg)


def _export_gguf(cfg: Config) -> None:
    from app.cli.preflight import preflight

    preflight(cfg, "export-gguf")
    from app.inference.gguf_export import run_export_gguf

    with _run_lock(cfg, "export-gguf"):
        run_export_gguf(cfg)


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
        _evaluate,
        "generate on the run's held-out records (or EVAL_PATH), score triplet P/R/F1, "
        "else exact match, ROUGE-L, BLEU-4 (or --predictions FILE: score only)",
        _ANSWER + ("DATA_FORMAT", "MAX_BAD_RATIO", "VAL_PATH", "MAX_SEQ_LEN", "PREDICT_BATCH_SIZE", "evaluation"),
    ),
    "serve": Command(
        _serve,
        "serve the base and its adapters over an OpenAI-compatible API on SERVE_PORT",
        (
            "MODEL_NAME",
            "TRUST_REMOTE_CODE",
            "NUM_THREADS",
            "QUANT_LEVEL",
            "MAX_NEW_TOKENS",
            "TEMPERATURE",
            "INFER_BACKEND",
            "GGUF_QUANT",
            "GGUF_DIR",
            "serve",
        ),
    ),
    "merge": Command(
        _merge, "fold the LoRA adapter into its base: a standalone model in MERGED_DIR", _LOAD + ("MERGED_DIR",)
    ),
    "export-onnx": Command(
        _export_onnx,
        "merged model (merged first if needed) -> ONNX for ONNX Runtime in ONNX_DIR",
        _LOAD + ("MERGED_DIR", "ONNX_DIR"),
    ),
    "export-gguf": Command(
        _export_gguf,
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


def usage(commands: dict[str, Command] = COMMANDS) -> str:
    from app.cli.reference import usage_text

    return usage_text(commands)


def _command_help(name: str, commands: dict[str, Command]) -> str:
    from app.cli.reference import command_help

    c = commands[name]
    return command_help(name, c.summary, c.doc or c.run.__doc__ or "", c.reads)


def main(argv: list[str] | None = None, commands: dict[str, Command] = COMMANDS) -> int:
    """Run one command of ``commands``: these, plus what the layers above add (app/__main__.py: the web UI)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        wanted = argv[1] if len(argv) > 1 and argv[0] == "help" else ""
        sys.stdout.write(_command_help(wanted, commands) if wanted in commands else usage(commands))  # cli-output
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in commands and ("-h" in rest or "--help" in rest):
        sys.stdout.write(_command_help(cmd, commands))  # cli-output
        return 0
    from app.core.utils import setup_logging
    from app.training.signals import Interrupted, install_cli_handlers

    install_cli_handlers()  # SIGTERM (docker compose stop) ends any command cleanly, as PID 1 too
    setup_logging()
    if cmd not in commands:
        log.error("unknown command %r; choose one of: %s", cmd, ", ".join(commands))
        return 2
    try:
        overrides = parse_cli_overrides(rest)
        # validated once: by the pre-flight where a command has one (with the data's and the model's
        # problems, all at once), else here
        cfg = Config.load(overrides, validate=cmd not in PREFLIGHTED)
        if cmd == "predict":
            cmd = _predict_mode(cfg, {k.upper() for k in overrides})
        commands[cmd].run(cfg)
    except UserError as e:
        for line in e.problems:
            log.error("%s", line)
        return 2
    except Interrupted as e:  # a stop signal; train has said where its checkpoint is
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; the last checkpoint in OUTPUT_DIR/checkpoints is kept and resumes next run")
        return 130
    except OSError as e:  # a full disk in a writer that has no line of its own: still one line, no traceback
        from app.core.diskspace import full_line, is_full

        where = Path(e.filename or ".")
        if not is_full(e, where):
            raise
        log.error(
            "%s",
            full_line(
                "",
                where,
                f"running `{cmd}`",
                None,
                "files written whole before it are intact",
                "run the same command again",
                "free some space there",
            ),
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
