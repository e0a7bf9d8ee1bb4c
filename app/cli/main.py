"""Command line: ``python -m app <command> [KEY=value ...]``.

The Makefile and docker compose only call this. Settings come from KEY=value arguments,
the environment and .env (in that order of precedence); see ``python -m app --help``.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, ContextManager

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
            dist.launch(cfg)
            return
        dist.watch_launcher()
        from app.training.train import FineTuner

        FineTuner(cfg).run()


def _info(cfg: Config) -> None:
    """Detected resources, tier, every resolved setting and why, predicted peak memory.

    Offline with a hub model that is not downloaded yet, it still shows all of that except the
    model's shape and the estimate, with the download command, and succeeds: it is the first
    thing a user runs."""
    from app.cli.preflight import default_data_missing, preflight
    from app.core.errors import ModelUnavailable
    from app.plan.tiers import fit_memory, format_info
    from app.training.train import FineTuner

    preflight(cfg, "info")
    ft, name = FineTuner(cfg), cfg.model.model_name
    try:
        ft.setup()
    except ModelUnavailable as e:
        sys.stdout.write(format_info(ft.resources, ft.plan, None, name) + "\n\n"  # cli-output
                         f"model: {name} is not downloaded here and the hub is out of reach, so its shape, "
                         "MAX_SEQ_LEN and the memory estimate are unknown until it is. Download it with:\n"
                         f"  {e.command}\nthen use MODEL_NAME={e.command.rsplit(' ', 1)[-1]}\n")
        return
    except UserError:
        if ft.plan is not None:  # show what was detected before the model problem
            sys.stdout.write(format_info(ft.resources, ft.plan, None, name) + "\n")  # cli-output
        raise
    if default_data_missing(cfg):  # nothing to measure yet: the tier's lengths, and say why
        fit_memory(ft.cfg, ft.resources, ft.shape, None, ft.plan)
        ft.plan.warnings.append(f"DATA_PATH={cfg.data.data_path} does not exist yet: `make train` writes the "
                                "synthetic sample data there first; MAX_SEQ_LEN above is the tier's, not your data's")
    else:
        ft.prepare_data()
    sys.stdout.write(format_info(ft.resources, ft.plan, ft.shape, name) + "\n")  # cli-output


def _predict(cfg: Config) -> None:
    from app.cli.preflight import preflight
    from app.inference.predict import run_predict

    preflight(cfg, "predict")
    run_predict(cfg)


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


def _run_lock(cfg: Config, command: str) -> ContextManager[None]:
    """merge and export-onnx write into the run they read (merged/ and onnx/ inside it): never while
    it is still training, and never two at once (app/training/runlock.py)."""
    from contextlib import nullcontext

    from app.inference.predict import find_adapter
    from app.training.runlock import hold

    adapter = find_adapter(cfg)
    if adapter is None:  # ADAPTER_DIR=none: the base model, exported under models/onnx/
        return nullcontext()
    return hold(adapter, command, setting="ADAPTER_DIR", doing=command, optional=True)


def _demo(cfg: Config) -> None:
    from app.cli.demo import run_demo

    run_demo(cfg)


def _make_tiny(cfg: Config) -> None:
    from app.models.tiny import FAMILIES, resolve_model

    if cfg.model.model_name not in FAMILIES:
        raise UserError(f"MODEL_NAME={cfg.model.model_name}: make-tiny-model builds one of "
                        f"{', '.join(FAMILIES)}; e.g. MODEL_NAME=tiny")
    log.info("tiny model ready at %s", resolve_model(cfg.model.model_name))


def _generate_data(cfg: Config) -> None:
    from app.cli.workspace import write_sample_data

    write_sample_data(cfg.validate().data.data_path, seed=cfg.train.seed, replace=cfg.data.replace_data)


def _clean(cfg: Config) -> None:
    from app.cli.workspace import clean

    clean()


def _remove_run(cfg: Config) -> None:
    from app.cli.workspace import remove_run

    remove_run(cfg.validate())


def _show_config(cfg: Config) -> None:
    import json

    sys.stdout.write(json.dumps(cfg.to_dict(), ensure_ascii=False, indent=2) + "\n")  # cli-output


def _docs(cfg: Config) -> None:
    from app.cli.reference import write_pages

    write_pages()


def _env_template(cfg: Config) -> None:
    from app.plan.tiers import env_template

    sys.stdout.write(env_template())  # cli-output


COMMANDS: dict[str, tuple[Callable[[Config], None], str]] = {
    "train": (_train, "fine-tune MODEL_NAME on DATA_PATH, write the adapter to OUTPUT_DIR"),
    "info": (_info, "show detected RAM/CPUs/GPUs, the tier, every resolved setting and the predicted peak"),
    "predict": (_predict, "answer PROMPT (or the built-in prompt), INPUT_FILE, or INTERACTIVE=1"),
    "evaluate": (_evaluate, "generate on EVAL_PATH and score triplet P/R/F1 (or --predictions FILE: score only)"),
    "merge": (_merge, "fold the LoRA adapter into its base: a standalone model in MERGED_DIR"),
    "export-onnx": (_export_onnx, "merged model (merged first if needed) -> ONNX for ONNX Runtime in ONNX_DIR"),
    "demo": (_demo, "offline proof of learning: synthetic data, tiny GLM from scratch, held-out F1 curve"),
    "make-tiny-model": (_make_tiny, "build the random tiny model MODEL_NAME=tiny|tiny-qwen2|tiny-qwen3|tiny-llama|tiny-gemma3"),
    "generate-data": (_generate_data, "write the synthetic triplet sample data to DATA_PATH and dev.jsonl beside it "
                                      "(never over a file of yours; REPLACE_DATA=1 to overwrite)"),
    "clean": (_clean, "remove what the tool made and can remake (tiny models, unchanged sample data, caches); "
                      "never your data or a trained run"),
    "remove-run": (_remove_run, "delete the trained run OUTPUT_DIR=<dir> (and nothing else)"),
    "config": (_show_config, "print the resolved settings (after .env, environment and arguments)"),
    "env-template": (_env_template, "print a .env template with every variable and its default"),
    "docs": (_docs, "regenerate docs/configuration.md and docs/commands.md from the code (developers)"),
}


def usage() -> str:
    cmds = "\n".join(f"  {name:<16} {doc}" for name, (_, doc) in COMMANDS.items())
    return (f"usage: python -m app <command> [KEY=value ...]\n\ncommands:\n{cmds}\n\n"
            f"settings (KEY=value > environment > .env > default):\n{Config.help_text()}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())  # cli-output
        return 0
    from app.core.utils import setup_logging
    from app.training.signals import Interrupted, install_cli_handlers

    install_cli_handlers()  # SIGTERM (docker compose stop) ends any command cleanly, as PID 1 too
    setup_logging()
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        log.error("unknown command %r; choose one of: %s", cmd, ", ".join(COMMANDS))
        return 2
    try:
        cfg = Config.load(parse_cli_overrides(rest))
        COMMANDS[cmd][0](cfg)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
