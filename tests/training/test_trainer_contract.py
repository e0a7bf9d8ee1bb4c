"""The private transformers.Trainer methods app.training.trainer.RunMixin overrides still exist,
with the parameters the overrides were written for. An upgrade that renames or reshapes one fails
here, naming it, instead of the override silently never being called (a checkpoint no longer
sealed, packed batches miscounted). RunMixin sits before transformers.Trainer in RunTrainer (STAGE=sft)
and before TRL's trainer in each preference stage's class: a TRL method of the same name must take the
same parameters, and every class must reach RunMixin's override first."""

import inspect

import pytest
from transformers import Trainer

from app.config import Config
from app.training.trainer import OVERRIDES, RunMixin, RunTrainer

# STAGE/PREF_LOSS -> the TRL trainer pref_trainer_class builds on
STAGES = {
    ("dpo", "sigmoid"): "DPOTrainer",
    ("dpo", "ipo"): "DPOTrainer",
    ("dpo", "orpo"): "ORPOTrainer",
    ("dpo", "simpo"): "CPOTrainer",
    ("kto", "sigmoid"): "KTOTrainer",
}


def test_every_overridden_trainer_method_exists_with_its_signature():
    changed = []
    for name, params in OVERRIDES.items():
        base = getattr(Trainer, name, None)
        if base is None:
            changed.append(f"{name}: gone from transformers.Trainer")
        elif tuple(inspect.signature(base).parameters) != params:
            changed.append(f"{name}: now {tuple(inspect.signature(base).parameters)}, written for {params}")
    assert not changed, "transformers.Trainer changed under RunMixin's overrides: " + "; ".join(changed)


def test_the_contract_lists_every_override():
    own = {n for n, v in vars(RunMixin).items() if callable(v) and n != "__init__"}
    assert own == set(OVERRIDES), f"overrides without a recorded signature: {sorted(own - set(OVERRIDES))}"
    assert RunTrainer.__mro__[1:3] == (RunMixin, Trainer) and not (set(vars(RunTrainer)) & set(OVERRIDES))


@pytest.mark.parametrize("stage, loss", STAGES, ids=lambda x: x)
def test_each_preference_trainer_reaches_the_overrides_and_trl_keeps_their_signatures(stage, loss):
    from app.training.preference_trainer import pref_trainer_class

    cls = pref_trainer_class(Config.from_dict({"STAGE": stage, "PREF_LOSS": loss}), RunMixin)
    trl = next(k for k in cls.__mro__ if k.__module__.startswith("trl."))
    assert trl.__name__ == STAGES[stage, loss] and issubclass(cls, Trainer)
    assert cls.__mro__.index(RunMixin) < cls.__mro__.index(trl)
    changed = []
    for name, params in OVERRIDES.items():
        if getattr(cls, name) is not getattr(RunMixin, name):
            changed.append(f"{name}: {cls.__name__} reaches another class's before RunMixin's")
        own = next((vars(k)[name] for k in trl.__mro__[: trl.__mro__.index(Trainer)] if name in vars(k)), None)
        if own is not None and tuple(inspect.signature(own).parameters) != params:
            changed.append(
                f"{name}: {trl.__name__}'s is {tuple(inspect.signature(own).parameters)}, written for {params}"
            )
    assert not changed, "; ".join(changed)
