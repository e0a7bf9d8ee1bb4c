"""The checks that involve more than one setting (a field's own words and range are checked by
Config.validate from app.config.fields): each problem is one line naming the settings and the fix."""

from __future__ import annotations

from collections.abc import Set
from typing import Protocol

from app.config.fields import (
    TRACKER_NAMES,
    DataArgs,
    DistArgs,
    LoraArgs,
    ModelArgs,
    ResourceArgs,
    ServeArgs,
    TrainArgs,
    WebuiArgs,
)
from app.config.setting_names import Setting


class Sections(Protocol):
    """What the checks read of a Config (app.config.settings, which calls them: a Protocol, not an import)."""

    @property
    def model(self) -> ModelArgs: ...
    @property
    def data(self) -> DataArgs: ...
    @property
    def lora(self) -> LoraArgs: ...
    @property
    def resources(self) -> ResourceArgs: ...
    @property
    def train(self) -> TrainArgs: ...
    @property
    def distributed(self) -> DistArgs: ...
    @property
    def serve(self) -> ServeArgs: ...
    @property
    def webui(self) -> WebuiArgs: ...
    @property
    def explicit(self) -> Set[Setting]: ...


def cross_field_problems(cfg: Sections) -> list[str]:
    """Every combination of settings that cannot run, as one line each (empty: none)."""
    p: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            p.append(msg)

    d, t, lo, m = cfg.data, cfg.train, cfg.lora, cfg.model
    need(bool(m.model_name.strip()), "MODEL_NAME is empty; set a hub name, a local dir, or 'tiny'")
    need(bool(d.data_path.strip()), "DATA_PATH is empty; run `make data` or point it at a file")
    need(t.num_epochs > 0 or t.max_steps > 0, f"NUM_EPOCHS={t.num_epochs} must be > 0 (or set MAX_STEPS)")
    need(
        not (t.precision == "bf16" and cfg.resources.quant_level in ("8bit", "4bit")),
        f"PRECISION=bf16 autocast is for unquantized weights; 4-bit already computes in bf16 where supported "
        f"(QUANT_LEVEL={cfg.resources.quant_level}); use PRECISION=auto",
    )
    need(
        not (t.early_stopping_patience and d.val_size == 0 and not d.val_path),
        "EARLY_STOPPING_PATIENCE needs validation data; set VAL_PATH or VAL_SIZE > 0",
    )
    rs = cfg.resources
    need(
        not (lo.method == "qlora" and rs.quant_level in ("none", "8bit")),
        f"METHOD=qlora means LoRA on a 4-bit model, but QUANT_LEVEL={rs.quant_level}; "
        "set QUANT_LEVEL=4bit (or auto), or METHOD=lora",
    )
    need(
        not (lo.method == "full" and rs.quant_level in ("8bit", "4bit")),
        f"METHOD=full trains every weight, which cannot be quantized (QUANT_LEVEL={rs.quant_level}); "
        "set QUANT_LEVEL=none, or METHOD=qlora",
    )
    for var, on in (("USE_DORA", lo.use_dora), ("USE_RSLORA", lo.use_rslora)):
        need(
            not (on and lo.method in ("ptuning", "full")),
            f"{var}=true is a LoRA variant, but METHOD={lo.method} trains no LoRA; set METHOD=lora or qlora, "
            f"or {var}=false",
        )
    for name in t.report_to:
        need(
            name in TRACKER_NAMES,
            f"REPORT_TO={','.join(t.report_to)}: {name!r} is not one of {', '.join(TRACKER_NAMES)}",
        )
    need(
        not ("none" in t.report_to and len(t.report_to) > 1),
        f"REPORT_TO={','.join(t.report_to)}: none means no tracker; give it alone",
    )
    need(
        not (lo.lora_init != "default" and lo.method in ("ptuning", "full")),
        f"LORA_INIT={lo.lora_init} starts LoRA weights, but METHOD={lo.method} trains no LoRA; set METHOD=lora "
        "or qlora, or leave LORA_INIT unset",
    )
    need(
        not (lo.lora_init == "loftq" and (rs.quant_level in ("none", "8bit"))),
        f"LORA_INIT=loftq fits LoRA to a 4-bit base's quantization error, but QUANT_LEVEL={rs.quant_level}; "
        "set QUANT_LEVEL=4bit (or METHOD=qlora), or another LORA_INIT",
    )
    need(
        not (lo.lora_init in ("pissa", "olora") and rs.quant_level in ("8bit", "4bit")),
        f"LORA_INIT={lo.lora_init} rewrites the base's weights while training, which a QUANT_LEVEL="
        f"{rs.quant_level} base cannot hold exactly; set QUANT_LEVEL=none, or LORA_INIT=default",
    )
    need(
        not (lo.lora_init == "loftq" and t.precision == "bf16"),
        "LORA_INIT=loftq needs a 4-bit base, but PRECISION=bf16 autocast is for unquantized weights; "
        "use PRECISION=auto, or another LORA_INIT",
    )
    need(
        not (lo.method == "ptuning" and rs.gradient_checkpointing == "on"),
        "GRADIENT_CHECKPOINTING=on cannot run METHOD=ptuning (PEFT passes no P-Tuning prefix through "
        "checkpointed layers); use GRADIENT_CHECKPOINTING=auto or off, or METHOD=lora",
    )
    need(
        not (t.stage == "kto" and t.batch_size < 2 and ("BATCH_SIZE" in cfg.explicit or cfg.resources.tier == "none")),
        f"STAGE=kto needs BATCH_SIZE of 2 or more (its KL term pairs each answer with another of the same "
        f"micro-batch), but BATCH_SIZE={t.batch_size}; set BATCH_SIZE=2 (GRAD_ACCUM=4 keeps about the same "
        "samples per step)",
    )
    need(
        not (t.stage != "sft" and lo.method == "ptuning"),
        f"STAGE={t.stage} turns the adapter off for its reference model, which P-Tuning prefixes cannot do here; "
        "use METHOD=lora or qlora",
    )
    ds = cfg.distributed
    need(
        0 <= ds.node_rank < max(ds.nnodes, 1),
        f"NODE_RANK={ds.node_rank} must be in 0..NNODES-1 (NNODES={ds.nnodes}); node 0 hosts MASTER_ADDR",
    )
    need(bool(ds.master_addr.strip()), "MASTER_ADDR is empty; set node 0's address, e.g. 10.0.0.1")
    need(bool(t.resume.strip()), "RESUME is empty; use RESUME=auto or the path of a checkpoint")
    need(
        not (t.packing == "on" and lo.method == "ptuning"),
        "PACKING=on cannot pack P-Tuning batches (its prefixes turn the packed-sequence mask off); "
        "use PACKING=auto or off",
    )
    sv = cfg.serve
    need(bool(sv.serve_host.strip()), "SERVE_HOST is empty; use 127.0.0.1 (this machine) or 0.0.0.0")
    ui = cfg.webui
    need(bool(ui.webui_host.strip()), "WEBUI_HOST is empty; use 127.0.0.1 (this machine only)")
    need(
        not ui.webui_auth or ui.webui_auth.count(":") >= 1 and all(ui.webui_auth.split(":", 1)),
        "WEBUI_AUTH must be user:password (both non-empty)",
    )
    return p
