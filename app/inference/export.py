"""`make export-onnx`: the merged model as one ONNX decoder graph with a KV cache, run by ONNX Runtime.

Why not optimum: the issue asked for optimum's exporter, but no release of it runs on this
project's transformers 5. optimum >= 2.0 moved the ONNX exporter into the separate optimum-onnx
package, whose newest release (0.1.0) requires ``transformers<4.58`` (and ``optimum~=2.1``);
optimum 1.27, the last with the exporter built in, requires ``transformers<4.54`` for it.
Transformers-5 support is an open request (huggingface/optimum-onnx#114; PR #140 was closed
unmerged). Downgrading transformers for the whole project is not an option, so the export uses
torch's own exporter (``torch.onnx.export(dynamo=True)``) on a small wrapper, and the few lines
of generation that optimum's ORTModelForCausalLM would provide live in ``OnnxCausalLM``
(app/inference/onnx_model.py).

The graph follows optimum's decoder-with-past naming, so other ONNX tooling recognises it:
inputs ``input_ids``, ``attention_mask`` [batch, past + seq], ``position_ids``,
``logits_to_keep`` (positions whose logits to compute: ``[-1]`` while generating, all for
scoring) and ``past_key_values.<i>.key/value`` [batch, kv_heads, past, head_dim]; outputs
``logits`` and ``present.<i>.key/value``. Prefill passes an empty (length 0) past, each decode
step one token and the previous step's ``present``. Works for every family whose transformers
implementation uses the standard ``DynamicCache``: GLM and Qwen2 are tested, Qwen3, Llama and
Gemma-3 export and pass the built-in check too (Gemma-3's sliding-window layers only within
their window). An export is checked against PyTorch before the command returns.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Config
from app.core import diskspace, ownership
from app.core.errors import UserError
from app.inference.onnx_model import OnnxCausalLM
from app.models.artifacts import META_FILE, ONNX_DATA, ONNX_FILE, fp32_bytes, is_onnx_dir, read_json
from app.models.integrity import dir_problems

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def _decoder_wrapper(model: PreTrainedModel, num_layers: int) -> torch.nn.Module:
    """nn.Module taking flat past tensors (ONNX has no cache objects) and returning flat presents."""
    import torch
    from transformers import DynamicCache

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            logits_to_keep: torch.Tensor,
            past: list[tuple[torch.Tensor, torch.Tensor]],
        ) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past], config=self.model.config)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
            return (
                out.logits,
                *[t for layer in out.past_key_values.layers[:num_layers] for t in (layer.keys, layer.values)],
            )

    return Decoder().eval()


def export_model(src: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    """Export the standalone model at ``src`` (config + weights + tokenizer) to ``out``; verify with ORT."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from app.core.atomic import replace_dir, write_json
    from app.core.utils import peak_rss_mb

    _check_replaceable(None, out)  # before the minutes an export takes
    need = fp32_bytes(src)
    short = need and diskspace.shortfall("ONNX_DIR", out, need, "the ONNX export (fp32 weights)")
    if short:
        raise UserError(short + "; nothing was written")
    from app.models.loading import load_error, load_tokenizer

    tokenizer = load_tokenizer(str(src), trust_remote_code)
    try:  # fp32 on the CPU whatever the machine: the export is for CPU inference
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        ).eval()
    except Exception as e:  # any failure here means "cannot load this model"
        raise load_error(str(src), e) from e
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():  # a real short forward gives the cache layout (layers, kv heads, head dim) per family
        cache = model(input_ids=ids, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(x, "keys") and x.keys is not None for x in layers):
        raise UserError(
            f"{src}: its {type(model).__name__} does not use transformers' standard KV cache, so it "
            "cannot be exported to ONNX here; GLM (-hf), Qwen2/3 and Llama checkpoints can"
        )
    past = [(x.keys.clone(), x.values.clone()) for x in layers]
    window = getattr(model.config, "sliding_window", None)
    if window and "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
        log.warning(
            "%s has sliding-window attention: the ONNX export is exact only for contexts shorter than "
            "its window (%d tokens)",
            type(model).__name__,
            window,
        )
    n = len(past)
    names_in = ["input_ids", "attention_mask", "position_ids", "logits_to_keep"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")
    ]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    dim = torch.export.Dim
    batch, seq, plen, total, keep = dim("batch"), dim("seq"), dim("past"), dim("total"), dim("keep")
    example = (
        torch.tensor([[6, 7, 8, 9, 10]]),
        torch.ones(1, 8, dtype=torch.long),
        torch.arange(3, 8)[None],
        torch.arange(5),
        past,
    )
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "logits_to_keep": {0: keep},
        "past": [({0: batch, 2: plen}, {0: batch, 2: plen}) for _ in range(n)],
    }
    log.info(
        "exporting %s (%s, %d layers) to ONNX; takes ~10 s for a tiny model, ~1 min for 100M parameters",
        src,
        type(model).__name__,
        n,
    )
    chatter = io.StringIO()  # the exporter prints its progress to stdout, and logs and warns a lot
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _decoder_wrapper(model, n),
            example,
            dynamic_shapes=shapes,
            input_names=names_in,
            output_names=names_out,
            dynamo=True,
            verbose=False,
        )
    log.debug("torch.onnx: %s", chatter.getvalue())
    if program is None:  # torch.onnx.export returns the program with dynamo=True
        raise RuntimeError(f"torch.onnx.export returned no program: {chatter.getvalue()[-500:]}")
    out = Path(out)
    try:
        with replace_dir(out, META_FILE, "ONNX_DIR") as tmp:  # whole: a kill leaves the previous export or none
            program.save(str(tmp / ONNX_FILE), external_data=True)  # weights in model.onnx.data: no 2 GB limit
            model.config.save_pretrained(tmp)
            (model.generation_config or GenerationConfig()).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = {f: (tmp / f).stat().st_size for f in (ONNX_FILE, ONNX_DATA) if (tmp / f).is_file()}
            write_json(
                tmp / META_FILE,
                {
                    "files": files,  # sizes: a truncated copy is found without loading it
                    "source": str(src),
                    "architecture": type(model).__name__,
                    "num_layers": n,
                    "past_shape": [list(k.shape[1:2]) + list(k.shape[3:]) for k, _ in past],  # [kv_heads, head_dim]
                    "dtype": "float32",
                    "inputs": names_in,
                    "outputs": names_out,
                    "torch": torch.__version__,
                    "exporter": "torch.onnx.export(dynamo=True)",
                },
            )
            diff = verify(model, tmp)  # before anything replaces an earlier export
            ownership.register(out.parent, [out.name])  # onnx/ in a run or a merge: theirs (remove-run takes it)
    except Exception as e:  # onnx's and safetensors' writers report a full disk in their own words
        if not diskspace.is_full(e, out.parent):
            raise
        raise UserError(
            diskspace.full_line(
                "ONNX_DIR",
                out,
                "writing the ONNX export",
                need,
                "the previous export there, if any, is untouched",
                "run `make export-onnx` again",
            )
        ) from None
    log.info(
        "exported %s -> %s; ONNX Runtime logits match PyTorch (max |diff| %.1e); peak RSS %.0f MB",
        src,
        out,
        diff,
        peak_rss_mb(),
    )
    return out


def verify(model: PreTrainedModel, onnx_dir: str | Path, tol: float = 1e-3) -> float:
    """Max |logits difference| of ORT vs PyTorch over a prompt and one cached decode step; raises
    when it exceeds ``tol`` times the largest logit (at least 1)."""
    import torch

    ort = OnnxCausalLM(onnx_dir)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
        nxt = ref.logits[:, -1:].argmax(-1)
        ref2 = model(input_ids=nxt, past_key_values=ref.past_key_values, use_cache=True).logits
    logits, past = ort.forward(ids.numpy(), keep_all=True)
    logits2, _ = ort.forward(nxt.numpy(), past=past)
    diff = max(float(abs(logits - ref.logits.numpy()).max()), float(abs(logits2 - ref2.numpy()).max()))
    if diff > tol * max(1.0, float(ref.logits.abs().max())):
        raise RuntimeError(f"ONNX export of {model.config.model_type} differs from PyTorch by {diff:.3g} (> {tol})")
    return diff


def source_for(cfg: Config) -> tuple[str, Path]:
    """(standalone model to export, ONNX dir): the merged adapter (merging first when needed),
    a METHOD=full output, or with ADAPTER_DIR=none the base MODEL_NAME."""
    from app.inference.merge import run_merge
    from app.models.artifacts import find_adapter, is_full_model
    from app.models.tiny import resolve_model

    adapter = find_adapter(cfg)
    onnx_dir = cfg.predict.onnx_dir
    if adapter is None:  # the base model itself (a local dir, tiny, or a hub name)
        name = cfg.model.model_name
        return resolve_model(name), Path(onnx_dir or Path("models/onnx") / Path(name).name)
    if is_onnx_dir(adapter):
        raise UserError(f"ADAPTER_DIR={adapter} is already an ONNX export; predict on it with ADAPTER_DIR={adapter}")
    if is_full_model(adapter):
        return str(adapter), Path(onnx_dir or adapter / "onnx")
    kind = read_json(adapter / "adapter_config.json", f"ADAPTER_DIR={adapter}").get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(
            f"ADAPTER_DIR={adapter}: a {kind} adapter (METHOD=ptuning) adds prefixes at run time and "
            "cannot be merged into the weights, so there is no standalone model to export; export a "
            "METHOD=lora/qlora/full run, or predict on this adapter with PyTorch"
        )
    merged = Path(cfg.predict.merged_dir or adapter / "merged")
    weights = max((p.stat().st_mtime for p in adapter.glob("adapter_model.*")), default=0.0)
    # MERGED_DIR is swapped in whole (app.core.atomic.replace_dir), so a present one is a finished merge; the
    # integrity check still refuses one that was damaged since (or half-written by an older version).
    current = (
        (merged / "config.json").is_file()
        and (merged / "config.json").stat().st_mtime >= weights
        and not dir_problems(merged, f"MERGED_DIR={merged}")
    )
    if not current:
        log.info("no up-to-date merged model in %s: merging %s first", merged, adapter)
        merged = run_merge(cfg)
    return str(merged), Path(onnx_dir or merged / "onnx")


def run_export(cfg: Config) -> Path:
    if cfg.predict.onnx_dir:  # a folder of yours, or a disk too small, is refused before anything is merged
        _check_replaceable(cfg, cfg.predict.onnx_dir)
        _check_space(cfg, Path(cfg.predict.onnx_dir))
    src, out = source_for(cfg)
    _check_replaceable(cfg, out)
    return export_model(src, out, cfg.model.trust_remote_code)


def _check_space(cfg: Config, out: Path) -> None:
    """The export's fp32 weights, sized from the model it starts from (the base of an adapter), against the disk."""
    from app.models.artifacts import base_model_for, find_adapter, is_full_model
    from app.models.tiny import resolve_model

    adapter = find_adapter(cfg)
    if adapter is None or is_full_model(adapter):
        model = str(adapter) if adapter is not None else resolve_model(cfg.model.model_name)
    else:
        model = resolve_model(base_model_for(cfg, adapter)[0])
    need = fp32_bytes(model)
    short = need and diskspace.shortfall("ONNX_DIR", out, need, "the ONNX export (fp32 weights)")
    if short:
        raise UserError(short + "; nothing was written")


def _check_replaceable(cfg: Config | None, out: str | Path) -> None:
    from app.models.artifacts import replace_target_problem

    problem = replace_target_problem(cfg, out, META_FILE, "ONNX_DIR")
    if problem:
        raise UserError(problem)
