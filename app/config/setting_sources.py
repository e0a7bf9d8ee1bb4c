"""Where settings come from besides KEY=value arguments: .env, the environment, the make command
line (MAKEFLAGS), and the one-line problem for a name that is no setting. Standard library only."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from pathlib import Path

from app.config.fields import ConfigError


def read_dotenv(path: str | Path | None) -> dict[str, str]:
    if not path or not Path(path).is_file():
        return {}
    from dotenv import dotenv_values  # lazy: keeps `make help` free of third-party imports

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


# Names that .env and the make command line may hold besides the settings: docker compose
# (docker-compose*.yml) and the Makefile read these, and libraries read the prefixed ones.
OTHER_VARIABLES = frozenset(
    {
        "RUNTIME",
        "CUDA",
        "VENV",
        "PYTHON",
        "TORCH_INDEX_URL",
        "UID",
        "GID",
        "MEM_LIMIT",
        "CPUS",
        "ENV_FILE",
        "BASE_IMAGE",
        "CUDA_BASE_IMAGE",
        "CUDA_TORCH_INDEX_URL",
        "GPU_COUNT",
        "STOP_GRACE_PERIOD",
        "SHARED_DIR",
        "PYTEST_ARGS",
    }
)
OTHER_PREFIXES = (
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "TORCH_",
    "PYTORCH_",
    "CUDA_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "KMP_",
    "BNB_",
    "ACCELERATE_",
    "DS_",
    "COMPOSE_",
    "DOCKER_",
    "PIP_",
    "REQUIRE_",  # the test suite's: `make test-gpu REQUIRE_GPU=1` (scripts/gpu-check.sh), REQUIRE_REAL_DATA...
)


def unknown_problem(key: str, where: str | None, known: Collection[str]) -> str | None:
    """The problem line for a key that names no setting, else None. ``where`` None: a
    ``python -m app KEY=value`` argument, which must be a setting; else .env or make, which may
    also carry compose/Makefile/library names (unless the name is one typo away from a setting)."""
    var = key.strip().upper()
    if var in known:
        return None
    near = [v for v in known if _edits(var, v) <= 2]
    if where is not None and not near and (var in OTHER_VARIABLES or var.startswith(OTHER_PREFIXES)):
        return None
    hint = near[:1] or difflib.get_close_matches(var, known, n=1)
    return f"{key}{f' ({where})' if where else ''}: unknown setting; " + (
        f"did you mean {hint[0]}?" if hint else "see `python -m app --help` (make help) for the settings"
    )


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (short strings): how many typos apart two names are."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def make_overrides(env: dict[str, str]) -> list[str]:
    """Names assigned on the make command line (``make train MAX_SAMPLE=10``): GNU make lists them
    in MAKEFLAGS after `` -- ``, space-separated, with spaces inside values escaped as ``\\ ``."""
    flags = env.get("MAKEFLAGS", "")
    _, sep, assigns = flags.partition(" -- ")
    if not sep and flags.startswith("-- "):
        assigns = flags[3:]
    names = []
    for word in re.split(r"(?<!\\) ", assigns):
        name, eq, _ = word.partition("=")
        name = name.rstrip(":+?!")
        if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            names.append(name)
    return names


def default_output_dir(
    model_name: str, method: str, data_path: str = "", default_data: str = "", stage: str = "sft"
) -> str:
    """models/<last part of MODEL_NAME>-<METHOD>[-<STAGE> unless sft], and -<data> when DATA_PATH is not the
    default's: the quick start's tiny run, a real run, a DPO run and a run on your own data each get their
    own dir, so none refuses another as a finished run. <data> is the file's stem, after its folder's name
    unless that is data/ (mine/train.jsonl -> mine-train, data/alpaca.json -> alpaca)."""
    model = _slug(Path(model_name.strip().rstrip("/\\") or "model").name) or "model"
    name = f"{model}-{method}" + (f"-{stage}" if stage != "sft" else "")  # a DPO run never lands on its SFT run
    data = data_path.strip().rstrip("/\\")
    if not data or data == default_data.strip():
        return f"models/{name}"
    path = Path(data)
    stem = path.stem if path.suffix.lower() in (".jsonl", ".json", ".csv", ".txt", ".parquet") else path.name
    folder = path.parent.name if path.parent.name not in ("", ".", "data") else ""
    return f"models/{name}-{_slug('-'.join(p for p in (folder, stem) if p)) or 'data'}"


def adapter_base(adapter_dir: str) -> str | None:
    """The MODEL_NAME an adapter of this tool was trained on (its train_config.json), or None."""
    import json

    try:
        name = json.loads((Path(adapter_dir.strip()) / "train_config.json").read_text(encoding="utf-8"))["MODEL_NAME"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-.")  # \w: Chinese file names stay readable


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    """``["MAX_SAMPLES=50", "model_name=tiny"]`` -> dict. Raises ConfigError for stray words."""
    out, bad = {}, []
    args = list(args)
    while args:
        a = args.pop(0)
        key, sep, value = a.partition("=")
        if not sep and a.startswith("--") and args and not args[0].startswith("--"):
            key, sep, value = a, "=", args.pop(0)  # `--predictions FILE`
        if not sep or not key.strip():
            bad.append(f"{a!r}: expected KEY=value (e.g. MAX_SAMPLES=50)")
            continue
        out[key.strip().lstrip("-").replace("-", "_")] = value
    if bad:
        raise ConfigError(bad)
    return out
