"""The private transformers.Trainer methods app.training.trainer.RunTrainer overrides still exist,
with the parameters the overrides were written for. An upgrade that renames or reshapes one fails
here, naming it, instead of the override silently never being called (a checkpoint no longer
sealed, packed batches miscounted)."""
import inspect

from transformers import Trainer

from app.training.trainer import OVERRIDES, RunTrainer


def test_every_overridden_trainer_method_exists_with_its_signature():
    changed = []
    for name, params in OVERRIDES.items():
        base = getattr(Trainer, name, None)
        if base is None:
            changed.append(f"{name}: gone from transformers.Trainer")
        elif tuple(inspect.signature(base).parameters) != params:
            changed.append(f"{name}: now {tuple(inspect.signature(base).parameters)}, written for {params}")
    assert not changed, "transformers.Trainer changed under RunTrainer's overrides: " + "; ".join(changed)


def test_the_contract_lists_every_override():
    own = {n for n, v in vars(RunTrainer).items() if callable(v) and n != "__init__"}
    assert own == set(OVERRIDES), f"overrides without a recorded signature: {sorted(own - set(OVERRIDES))}"
