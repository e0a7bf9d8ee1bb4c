"""`make merge`: fold a LoRA adapter into its base and write a standalone model.

The result (MERGED_DIR, default merged/ inside the adapter dir) loads with plain
AutoModelForCausalLM, no peft. An adapter trained on a 4-bit/8-bit base is merged onto the
*unquantized* base: LoRA learnt corrections to the quantized weights, so the merged model
differs slightly from what was trained; the log says so.

MERGED_DIR is replaced whole (app.core.atomic.replace_dir): a merge killed at any moment leaves the previous
merge, or none, never a mix of the two that predict or export-onnx would load.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.config import Config
from app.core import diskspace, ownership
from app.core.atomic import replace_dir, write_json
from app.core.errors import UserError
from app.models.artifacts import base_model_for, find_adapter, fp32_bytes, is_full_model, replace_target_problem
from app.models.loading import load_adapter, load_model, load_tokenizer
from app.models.tiny import resolve_model

log = logging.getLogger(__name__)

MERGE_FILE = "merge_info.json"  # what was merged; marks a dir this tool may replace with a new merge


def run_merge(cfg: Config) -> Path:
    adapter = find_adapter(cfg)
    if adapter is None or is_full_model(adapter):
        raise UserError(
            f"ADAPTER_DIR={adapter}: merge needs a LoRA adapter dir (METHOD=full output is already a standalone model)"
        )
    out = Path(cfg.predict.merged_dir or adapter / "merged")
    problem = replace_target_problem(cfg, out, MERGE_FILE, "MERGED_DIR")  # before minutes of loading and merging
    if problem:
        raise UserError(problem)
    name, quant = base_model_for(cfg, adapter)
    if quant != "none":
        log.warning(
            "adapter was trained on a %s base; merging onto the unquantized base, so outputs differ "
            "slightly from the quantized model it was trained with",
            quant,
        )
    base = resolve_model(name)
    need = fp32_bytes(base)
    short = need and diskspace.shortfall("MERGED_DIR", out, need, "the merged model (fp32, as merge writes it)")
    if short:
        raise UserError(short + "; nothing was written")
    model = load_adapter(load_model(base, cfg.model.trust_remote_code), adapter)
    merged = model.merge_and_unload()
    own_tok = (adapter / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(
        str(adapter) if own_tok else base,
        cfg.model.trust_remote_code,
        setting="ADAPTER_DIR" if own_tok else "MODEL_NAME",
    )
    stale = "it was made from the previous merge (an ONNX export? `make export-onnx` exports this merge)"
    try:
        with replace_dir(out, MERGE_FILE, "MERGED_DIR", kept_note=stale) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / MERGE_FILE, {"adapter": str(adapter), "base": name, "base_quantization": quant})
            ownership.register(out.parent, [out.name])  # merged/ in a run: the run's own (remove-run takes it)
    except Exception as e:  # safetensors reports a full disk in its own words
        if not diskspace.is_full(e, out.parent):
            raise
        raise UserError(
            diskspace.full_line(
                "MERGED_DIR",
                out,
                "writing the merged model",
                need,
                "the previous merge there, if any, is untouched",
                "run `make merge` again",
            )
        ) from None
    log.info("merged %s + %s -> %s (loads with AutoModelForCausalLM, no peft)", name, adapter, out)
    return out
