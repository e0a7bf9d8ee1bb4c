"""Command line: ``python -m app <command> [KEY=value ...]``.

The Makefile and docker compose only call this. Settings come from KEY=value arguments,
the environment and .env (in that order of precedence); see ``python -m app --help``.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

from app.config import Config, parse_cli_overrides
from app.errors import UserError

log = logging.getLogger("app")


def _train(cfg: Config) -> None:
    from app import dist
    from app.checkpoints import check_output_dir

    if dist.wants_launch(cfg):  # NPROC/NNODES: become torchrun, whose workers run this command again
        dist.launch(cfg)
        return
    check_output_dir(cfg.validate())  # before importing torch: a refused OUTPUT_DIR costs nothing
    dist.watch_launcher()
    from app.train import FineTuner

    FineTuner(cfg).run()


def _info(cfg: Config) -> None:
    """Detected resources, tier, every resolved setting and why, predicted peak memory."""
    from app.tiers import format_info
    from app.train import FineTuner

    ft = FineTuner(cfg)
    try:
        ft.setup().prepare_data()
    except UserError:
        if ft.plan is not None:  # show what was detected before the model/data problem
            sys.stdout.write(format_info(ft.resources, ft.plan, None, cfg.model.model_name) + "\n")  # cli-output
        raise
    sys.stdout.write(format_info(ft.resources, ft.plan, ft.shape, cfg.model.model_name) + "\n")  # cli-output


def _predict(cfg: Config) -> None:
    from app.predict import run_predict

    run_predict(cfg.validate())


def _evaluate(cfg: Config) -> None:
    from app.evaluate import run_evaluate

    run_evaluate(cfg.validate())


def _merge(cfg: Config) -> None:
    from app.merge import run_merge

    run_merge(cfg.validate())


def _export_onnx(cfg: Config) -> None:
    from app.export import run_export

    run_export(cfg.validate())


def _demo(cfg: Config) -> None:
    from app.demo import run_demo

    run_demo(cfg)


def _make_tiny(cfg: Config) -> None:
    from app.tiny import FAMILIES, resolve_model

    if cfg.model.model_name not in FAMILIES:
        raise UserError(f"MODEL_NAME={cfg.model.model_name}: make-tiny-model builds one of "
                        f"{', '.join(FAMILIES)}; e.g. MODEL_NAME=tiny")
    log.info("tiny model ready at %s", resolve_model(cfg.model.model_name))


def _generate_data(cfg: Config) -> None:
    from pathlib import Path

    from app.datagen import write_dataset

    out = Path(cfg.data.data_path).parent
    write_dataset(out, seed=cfg.train.seed)


def _show_config(cfg: Config) -> None:
    import json

    sys.stdout.write(json.dumps(cfg.to_dict(), ensure_ascii=False, indent=2) + "\n")  # cli-output


def _env_template(cfg: Config) -> None:
    from app.config import env_template

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
    "generate-data": (_generate_data, "write synthetic triplet train/dev .jsonl next to DATA_PATH"),
    "config": (_show_config, "print the resolved settings (after .env, environment and arguments)"),
    "env-template": (_env_template, "print a .env template with every variable and its default"),
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
    from app.signals import Interrupted, install_cli_handlers
    from app.utils import setup_logging

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
