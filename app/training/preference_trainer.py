"""STAGE=dpo and STAGE=kto: TRL's preference trainers on this tool's path.

TRL computes the losses (DPOTrainer: PREF_LOSS=sigmoid/ipo; its experimental ORPOTrainer and CPOTrainer:
orpo and simpo; KTOTrainer: STAGE=kto). Everything around them is the tool's, as for SFT: the rows are
tokenized here with the same prompt rendering as SFT and predict (app.data.encode.encode_pair), each trainer
gets app.training.trainer.RunMixin (sealed checkpoints, the resume checks, token counts) and the tool's
callbacks (progress bar, metrics.jsonl, memory guard, trackers).

The reference model is never a second copy for LoRA: TRL turns the adapter off for a new adapter (whose B is
zero, so adapter-off *is* the starting policy), or keeps a frozen copy of the starting adapter (ADAPTER_DIR,
or a LORA_INIT whose adapter starts non-zero) under the name "ref". Full tuning loads a second, frozen copy,
which the memory plan counts (app.plan.stages).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from app.core.errors import UserError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

    from app.config import Config

log = logging.getLogger(__name__)

REF_ADAPTER = "ref"  # TRL's name for the frozen copy of a starting adapter


def uses_reference(cfg: Config) -> bool:
    """Whether the stage's loss compares with a reference model (ORPO and SimPO do not)."""
    return cfg.train.stage == "kto" or (cfg.train.stage == "dpo" and cfg.train.pref_loss in ("sigmoid", "ipo"))


def trl_name(cfg: Config) -> str:
    """The TRL trainer (and loss) a run uses, for logs and summary.json."""
    t = cfg.train
    if t.stage == "kto":
        return "KTOTrainer (kto)"
    return {"orpo": "ORPOTrainer", "simpo": "CPOTrainer (simpo)"}.get(t.pref_loss, f"DPOTrainer ({t.pref_loss})")


def describe_stage(cfg: Config) -> str:
    """`make info`'s line on a preference stage: the trainer, what an example costs, and where the reference is."""
    from app.plan.stages import stage_cost

    t = cfg.train
    if t.stage == "sft":
        return ""
    if not uses_reference(cfg):
        ref = "no reference model"
    elif cfg.lora.method == "full":
        ref = "reference: a second, frozen copy of the model"
    elif cfg.predict.adapter_dir:
        ref = f"reference: a frozen copy of the adapter in ADAPTER_DIR={cfg.predict.adapter_dir}"
    else:
        ref = "reference: the base with the adapter turned off"
    return (
        f"stage: STAGE={t.stage} with TRL's {trl_name(cfg)}, PREF_BETA={t.pref_beta}: "
        f"{stage_cost(cfg).describe()} ({ref}); the memory and times above count them"
    )


def pref_config(cfg: Config, common: dict[str, Any]) -> TrainingArguments:
    """TRL's config for STAGE/PREF_LOSS: the Trainer's arguments (``common``, as SFT gets them) plus the loss's.

    Set here, not left to TRL's defaults: gradient checkpointing is the plan's (the model has it already),
    bf16 is PRECISION's (TRL's default turns it on). TRL's own default kept: dropout off (said in a line)."""
    t = cfg.train
    kw = {**common, "max_length": cfg.data.max_seq_len, "activation_checkpointing": False, "disable_dropout": True}
    if t.stage == "kto":
        from trl import KTOConfig

        if t.batch_size < 2:  # else TRL's ValueError, a traceback (a tier, fit or back-off may pick 1)
            raise UserError(
                f"STAGE=kto needs BATCH_SIZE of 2 or more (its KL term pairs each answer with another of "
                f"the same micro-batch), but BATCH_SIZE={t.batch_size}; set BATCH_SIZE=2 (with GRAD_ACCUM="
                f"{max(1, t.grad_accum // 2)} for about the same samples per step)"
            )
        return KTOConfig(
            **kw, beta=t.pref_beta, desirable_weight=t.kto_chosen_weight, undesirable_weight=t.kto_rejected_weight
        )
    if t.pref_loss == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**kw, beta=t.pref_beta)
    if t.pref_loss == "simpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig(**kw, loss_type="simpo", beta=t.pref_beta, simpo_gamma=t.simpo_gamma, cpo_alpha=t.pref_ftx)
    from trl import DPOConfig

    losses, weights = [t.pref_loss], None
    if t.pref_ftx:
        losses, weights = [t.pref_loss, "sft"], [1.0, t.pref_ftx]
    return DPOConfig(**kw, beta=t.pref_beta, loss_type=losses, loss_weights=weights)


def as_dataset(rows: list[dict[str, Any]] | None) -> Dataset | None:
    """The encoded rows as the `datasets.Dataset` TRL's trainers take (None stays None)."""
    if not rows:
        return None
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # TRL's map() over a few hundred rows: the tool's own bar is the one to watch
    return Dataset.from_list(rows)


def pref_trainer_class(cfg: Config, mixin: type) -> type:
    """The TRL trainer for STAGE/PREF_LOSS with ``mixin`` (app.training.trainer.RunMixin) before it."""
    RunMixin = mixin  # capitalised: it is the class that goes into the bases below
    if cfg.train.stage == "kto":
        from trl import KTOTrainer

        return type("KtoRunTrainer", (_ToolDefaults, _KtoRows, RunMixin, KTOTrainer), {})
    if cfg.train.pref_loss in ("orpo", "simpo"):
        if cfg.train.pref_loss == "orpo":
            from trl.experimental.orpo import ORPOTrainer as base
        else:
            from trl.experimental.cpo import CPOTrainer as base
        return type(f"{base.__name__[:-7]}RunTrainer", (_ToolDefaults, _OldStyleRows, RunMixin, base), {})
    from trl import DPOTrainer

    return type("DpoRunTrainer", (_ToolDefaults, _DpoRows, RunMixin, DPOTrainer), {})


def pref_trainer_kwargs(ft: Any) -> dict[str, Any]:
    """The arguments a preference trainer takes beyond the Trainer's: the tokenizer, and a reference model for
    full tuning (a second frozen copy; LoRA's reference is the adapter turned off or its frozen copy)."""
    kw: dict[str, Any] = {"processing_class": ft.tokenizer}
    if ft.cfg.lora.method == "full" and uses_reference(ft.cfg):
        from app.training.trainable import reference_model

        kw["ref_model"] = reference_model(ft.cfg, ft.model_path, ft.plan.device == "cuda")
    return kw


def drop_fresh_reference(model: PreTrainedModel | PeftModel, cfg: Config) -> bool:
    """TRL copies the adapter it is given to "ref"; a new adapter whose B starts at zero is exactly the base, so
    the copy is dropped and the reference is the adapter turned off (one LoRA fewer in every reference pass)."""
    peft_config = getattr(model, "peft_config", None)
    fresh = not cfg.predict.adapter_dir and cfg.lora.lora_init in ("default", "gaussian")
    if not peft_config or REF_ADAPTER not in peft_config or not fresh:
        return False
    model.delete_adapter(REF_ADAPTER)
    model.set_adapter("default")
    return True


class _ToolDefaults:
    """Where TRL's trainers differ from this tool's SFT: TRL casts a quantized model's trainable LoRA weights to
    bf16, kept in fp32 here as SFT trains them (AdamW's small updates are lost in bf16 on CPU); TRL's copy of a
    fresh adapter is dropped (above); no model card in the checkpoints' folder."""

    def __init__(self, *args: Any, run_cfg: Config, **kwargs: Any):
        self._run_cfg = run_cfg
        model = kwargs["model"]
        dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
        if run_cfg.lora.lora_dropout:
            log.info(
                "STAGE=%s trains with LORA_DROPOUT=%s turned off (as TRL and LLaMA-Factory do): dropout would make "
                "the policy differ from the reference before any step",
                run_cfg.train.stage,
                run_cfg.lora.lora_dropout,
            )
        if drop_fresh_reference(self.model, run_cfg):
            log.info("reference model: the base with the adapter turned off (no second copy in memory)")

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a README.md into the checkpoints' folder at each save; the run's own files say what it is."""


class _DpoRows:
    """The rows are tokenized already (prompt_ids, chosen_ids, rejected_ids): TRL's tokenizing is skipped, so the
    prompt is rendered exactly as SFT and predict render it."""

    def _prepare_dataset(
        self, dataset: Dataset, processing_class: PreTrainedTokenizerBase, args: TrainingArguments, dataset_name: str
    ) -> Dataset:
        return dataset


class _KtoRows:
    """As _DpoRows, for (prompt_ids, completion_ids, label); adds what TRL's own preparation adds after
    tokenizing: the KL term's mismatched completions, rotated by one within each micro-batch."""

    def _prepare_dataset(
        self, dataset: Dataset, processing_class: PreTrainedTokenizerBase, args: TrainingArguments, dataset_name: str
    ) -> Dataset:
        if not getattr(self, "calculate_KL", False):
            return dataset

        def rotate(batch: dict[str, list]) -> dict[str, list]:
            batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


class _OldStyleRows:
    """ORPO's and CPO's rows: their keys, made from the tool's token ids instead of their own tokenizing."""

    def tokenize_row(self, feature: dict[str, Any], model: torch.nn.Module | None = None) -> dict[str, Any]:
        prompt = list(feature["prompt_ids"])
        out: dict[str, Any] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            ids = prompt + list(feature[f"{side}_ids"])
            out.update(
                {
                    f"{side}_input_ids": ids,
                    f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [-100] * len(prompt) + list(feature[f"{side}_ids"]),
                }
            )
        return out


# What a run continuing an adapter takes from it: the adapter's shape and the base it was trained on
ADAPTER_SHAPE = (
    "MODEL_NAME",
    "METHOD",
    "LORA_R",
    "LORA_ALPHA",
    "LORA_DROPOUT",
    "LORA_TARGETS",
    "USE_DORA",
    "USE_RSLORA",
)


def start_adapter(cfg: Config) -> Config:
    """STAGE=dpo/kto with ADAPTER_DIR: the Config with the starting adapter's base and LoRA shape (read from its
    train_config.json); a value set now that differs is refused in one line. STAGE=sft does not read ADAPTER_DIR."""
    from pathlib import Path

    from app.models.artifacts import read_json

    given = cfg.predict.adapter_dir.strip()
    if cfg.train.stage == "sft" or not given:
        if given and given.lower() != "none":
            log.info(
                "ADAPTER_DIR=%s is not read by STAGE=sft training (it starts a new adapter); STAGE=dpo or "
                "kto continues an adapter",
                given,
            )
        return cfg.replace({"ADAPTER_DIR": ""}) if given else cfg
    if given.lower() == "none":
        return cfg.replace({"ADAPTER_DIR": ""})
    path = Path(given)
    if not (path / "adapter_config.json").is_file() or not (path / "train_config.json").is_file():
        raise UserError(
            f"ADAPTER_DIR={given}: no adapter trained by this tool there (adapter_config.json and "
            f"train_config.json); point it at an SFT run's output dir, or leave it empty to start "
            f"STAGE={cfg.train.stage} from the base model"
        )
    saved = read_json(path / "train_config.json", f"ADAPTER_DIR={given}")
    if saved.get("METHOD") not in ("lora", "qlora"):
        raise UserError(
            f"ADAPTER_DIR={given} was trained with METHOD={saved.get('METHOD')}; STAGE="
            f"{cfg.train.stage} continues LoRA adapters only (METHOD=lora or qlora)"
        )
    clash = [
        f"{v}={cfg.get(v)} (the adapter's: {saved[v]})"
        for v in ADAPTER_SHAPE
        if v in cfg.explicit and v in saved and cfg.get(v) != saved[v]
    ]
    if clash:
        raise UserError(
            f"ADAPTER_DIR={given}: {'; '.join(clash)}: a continued adapter keeps its base and shape; "
            "unset those, or leave ADAPTER_DIR empty to start a new adapter"
        )
    log.info(
        "STAGE=%s continues the adapter in %s: %s as it was trained",
        cfg.train.stage,
        given,
        ", ".join(f"{v}={saved[v]}" for v in ADAPTER_SHAPE if v in saved),
    )
    taken = {v: saved[v] for v in ADAPTER_SHAPE if v in saved}
    return cfg.replace(taken, explicit=taken)  # the tier must not pick another LORA_R for it
