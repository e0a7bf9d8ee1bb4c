"""Config: precedence (CLI > env > .env > default), typing, and all-errors-at-once validation."""

import json
import typing

import pytest

from app.config import Config, ConfigError, bounds, parse_cli_overrides
from app.config.settings import field_type


def test_defaults_are_valid_and_every_field_is_a_variable():
    cfg = Config.load(env={}, dotenv_path=None).validate()
    names = set(Config.variables())
    # The interface: these exact variable names must exist.
    for var in (
        "MODEL_NAME DATA_PATH VAL_PATH OUTPUT_DIR ADAPTER_DIR MAX_SAMPLES NUM_EPOCHS BATCH_SIZE "
        "GRAD_ACCUM LEARNING_RATE MAX_SEQ_LEN LORA_R LORA_ALPHA LORA_DROPOUT LORA_TARGETS SAVE_STEPS "
        "EVAL_STEPS NUM_THREADS SEED PROMPT TRUST_REMOTE_CODE"
    ).split():
        assert var in names, var
    assert cfg.explicit == set()
    assert cfg.get("LORA_R") == cfg.lora.lora_r


def test_precedence_cli_over_env_over_dotenv_over_default(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LORA_R=4\nMAX_SAMPLES=10\nSEED=7\n# comment\nPROMPT='from dotenv'\n")
    env = {"MAX_SAMPLES": "20", "SEED": "8", "UNRELATED_VAR": "x"}
    cfg = Config.load(overrides={"SEED": "9"}, env=env, dotenv_path=dotenv)
    assert cfg.lora.lora_r == 4  # only .env sets it
    assert cfg.data.max_samples == 20  # env beats .env
    assert cfg.train.seed == 9  # CLI beats env
    assert cfg.predict.prompt == "from dotenv"
    assert cfg.train.batch_size == Config().train.batch_size  # default
    assert cfg.explicit == {"LORA_R", "MAX_SAMPLES", "SEED", "PROMPT"}


def test_types_are_parsed_from_strings():
    cfg = Config.load(
        overrides={
            "learning_rate": "1e-3",
            "TRUST_REMOTE_CODE": "yes",
            "LORA_TARGETS": "q_proj, v_proj",
            "NUM_EPOCHS": "2",
        },
        env={},
        dotenv_path=None,
    )
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.model.trust_remote_code is True
    assert cfg.lora.lora_targets == ["q_proj", "v_proj"]
    assert cfg.train.num_epochs == 2.0


def test_validate_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        Config.load(
            overrides={
                "BATCH_SIZE": "0",
                "LEARNING_RATE": "3",
                "LORA_R": "abc",
                "MAX_SEQ_LEN": "4",
                "DATA_FORMAT": "xml",
                "BATSH_SIZE": "2",
            },
            env={},
            dotenv_path=None,
        )
    problems = err.value.problems
    joined = "\n".join(problems)
    for var in ("BATCH_SIZE=0", "LEARNING_RATE=3", "LORA_R='abc'", "MAX_SEQ_LEN=4", "DATA_FORMAT='xml'"):
        assert var in joined, (var, joined)
    assert any("BATSH_SIZE" in p and "did you mean BATCH_SIZE" in p for p in problems)
    assert len(problems) == 6  # one line each, nothing merged or lost


def test_unknown_environment_variables_are_ignored_but_unknown_cli_keys_are_not():
    Config.load(env={"PATH": "/bin", "HOME": "/root"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="PATHX"):
        Config.load(overrides={"PATHX": "1"}, env={}, dotenv_path=None)


def test_cli_overrides_parsing():
    assert parse_cli_overrides(["MAX_SAMPLES=50", "--lora-r=4", "PROMPT=a=b"]) == {
        "MAX_SAMPLES": "50",
        "lora_r": "4",
        "PROMPT": "a=b",
    }
    with pytest.raises(ConfigError, match="KEY=value"):
        parse_cli_overrides(["train_fast"])


def test_save_round_trips(tmp_path):
    cfg = Config.from_dict({"MODEL_NAME": "tiny", "LORA_TARGETS": "q_proj,v_proj", "NUM_EPOCHS": 1})
    cfg.save(tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["MODEL_NAME"] == "tiny" and saved["LORA_TARGETS"] == ["q_proj", "v_proj"]
    assert Config.from_dict(saved).to_dict() == cfg.to_dict()


def test_help_lists_every_variable_with_default():
    text = Config.help_text()
    for var in Config.variables():
        assert var in text
    assert "THUDM/glm-edge-1.5b-chat" in text


def test_env_template_is_in_sync_with_the_config():
    from pathlib import Path

    from app.plan.explain import env_template

    committed = (Path(__file__).resolve().parents[2] / ".env.template").read_text(encoding="utf-8")
    assert committed == env_template(), "regenerate: python -m app env-template > .env.template"
    for var in Config.variables():
        assert f"# {var}=" in committed


# Every range declared on a field (app/config/fields.py: ge/gt/le/lt): the values just past each bound, and the
# included bounds themselves.
RANGED = [v for v, (_, f) in Config.variables().items() if "range" in f.metadata]


def _edges(var):
    sec, f = Config.variables()[var]
    r, hint = f.metadata["range"], field_type(sec, f.name)
    step = 1 if int in (hint, *typing.get_args(hint)) else 0.01
    past = (r.ge - step if r.ge is not None else None, r.gt, r.le + step if r.le is not None else None, r.lt)
    return [x for x in past if x is not None], [x for x in (r.ge, r.le) if x is not None]


def _problems(var, value):
    try:
        Config.load(overrides={var: str(value)}, env={}, dotenv_path=None)
    except ConfigError as e:
        return [p for p in e.problems if p.startswith(f"{var}=")]
    return []


@pytest.mark.parametrize("var", RANGED)
def test_each_declared_range_is_checked_in_one_line_and_shown_in_help(var):
    outside, inside = _edges(var)
    assert outside, var
    for value in outside:
        problems = _problems(var, value)
        assert len(problems) == 1 and f"must be {bounds(var)}" in problems[0], (var, value, problems)
    for value in inside:
        assert _problems(var, value) == [], (var, value)
    line = next(x for x in Config.help_text().splitlines() if x.split()[:1] == [var])
    assert f"(must be {bounds(var)})" in line


def test_ranges_read_as_before():
    """The declared bounds render as the hand-written checks did (tests/cli/test_bad_input.py, the web UI's)."""
    assert _problems("LORA_R", 0) == ["LORA_R=0 must be >= 1, e.g. 8"]
    assert _problems("VAL_SIZE", 1) == ["VAL_SIZE=1.0 must be in [0, 1), e.g. 0.1"]
    assert _problems("LEARNING_RATE", 0) == ["LEARNING_RATE=0.0 must be in (0, 1), e.g. 2e-4"]
    assert _problems("MEMORY_SAFETY", 2) == ["MEMORY_SAFETY=2.0 must be in [0.1, 1], e.g. 0.85"]
    assert _problems("SERVE_PORT", 0) == ["SERVE_PORT=0 must be in 1..65535, e.g. 8000"]
    assert _problems("MAX_SAMPLES", 0) == ["MAX_SAMPLES=0 must be >= 1, or MAX_SAMPLES=all for every record"]
    assert _problems("MAX_SAMPLES", "all") == []
