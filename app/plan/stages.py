"""What each STAGE costs per training example, for the memory estimate and the time model.

SFT trains one sequence per example. A DPO pair is two sequences (prompt + chosen, prompt + rejected) in
one micro-batch, and the losses that compare with a reference model (PREF_LOSS=sigmoid/ipo, STAGE=kto) run
it without gradients over the same sequences: TRL turns the LoRA adapter off for it, so it costs time, not
weights (METHOD=full keeps a second frozen copy, which does cost weights). ORPO and SimPO need no reference.
KTO trains one sequence per example and adds a no-gradient policy pass over a mismatched completion (its KL
term), which the reference runs as well. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageCost:
    sequences: int = 1  # sequences per example trained with gradients (their activations are kept)
    no_grad_passes: int = 0  # sequences per example run forward only (the reference, KTO's KL term)
    reference_copy: bool = False  # a second frozen copy of the weights (METHOD=full with a reference)

    def describe(self) -> str:
        s = f"{self.sequences} sequence{'s' if self.sequences > 1 else ''} per example"
        if self.no_grad_passes:
            s += f" + {self.no_grad_passes} forward-only"
        return s + (" + a frozen reference copy of the weights" if self.reference_copy else "")


def stage_cost(cfg: Any) -> StageCost:
    """The cost of cfg's STAGE and PREF_LOSS (see the module docstring)."""
    t = cfg.train
    if t.stage == "sft":
        return StageCost()
    if t.stage == "kto":  # the policy's KL pass, and the reference over the answer and the KL completion
        return StageCost(1, 3, cfg.lora.method == "full")
    if t.pref_loss in ("orpo", "simpo"):
        return StageCost(2, 0, False)
    return StageCost(2, 2, cfg.lora.method == "full")


def min_batch(cfg: Any) -> int:
    """The smallest micro-batch the stage can train: KTO's KL term pairs each answer with another of its
    micro-batch (TRL's KTOTrainer refuses a batch of 1), so the plan and the memory guard stop at 2 there."""
    return 2 if cfg.train.stage == "kto" else 1
