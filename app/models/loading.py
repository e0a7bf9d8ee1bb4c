"""Load base models and tokenizers (hub name, local dir or tiny) and attach LoRA adapters."""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from app.config import Config
from app.core.errors import ModelUnavailable, UserError
from app.core.hub import download_command, go_offline_if_hub_unreachable
from app.models.artifacts import local_model_problem
from app.models.integrity import load_failure
from app.models.tiny import resolve_model

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Output heads stay frozen: adapting them costs vocab-sized matrices for little gain (the estimator skips them too).
NEVER_TARGET = ("lm_head", "output_layer", "embed_out", "score", "classifier")
ALL_LINEAR = "all-linear"  # LORA_TARGETS=all-linear, as PEFT spells it


# Known breakages of ChatGLM-6B/2/3 remote code on current transformers -> what to do instead.
_REMOTE_CODE_FAILURES = {
    "_extract_past_from_model_output": "its generation code predates transformers 4.42",
    "padding_side": "its tokenizer predates transformers 4.45",
    "get_max_length": "its KV-cache code predates transformers 4.47",
    "is_torch_fx_proxy": "it imports helpers removed from transformers",
    "all_tied_weights_keys": "it predates transformers 5",
}
_REMOTE_FIX = (
    "the model's trust_remote_code implementation does not run on this transformers; use a "
    "checkpoint transformers loads natively, e.g. MODEL_NAME=THUDM/glm-4-9b-chat-hf or "
    "THUDM/glm-edge-1.5b-chat (GLM family, no remote code)"
)


def remote_code_error(name: str, err: Exception) -> UserError | None:
    """One clear line for a known remote-code incompatibility, else None."""
    text = f"{type(err).__name__}: {err}"
    for marker, why in _REMOTE_CODE_FAILURES.items():
        if marker in text:
            return UserError(f"MODEL_NAME={name}: {why} ({text.splitlines()[0][:160]}); {_REMOTE_FIX}")
    return None


def load_error(name: str, err: Exception, setting: str = "MODEL_NAME") -> UserError:
    """One line for a failed load of ``name`` (named by ``setting`` in the message)."""
    known = remote_code_error(name, err)
    if known is not None:
        return known
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if Path(name).is_dir():  # a damaged file there, named, with the fix for where the dir came from
        known = load_failure(Path(name), f"{setting}={name}", err)
        if known is not None:
            return known
    if Path(name).exists():
        return UserError(
            f"{setting}={name}: this dir does not hold a loadable model ({first}); "
            "it needs config.json, weights and tokenizer files"
        )
    command, local = download_command(name)
    return ModelUnavailable(
        f"MODEL_NAME={name}: not found locally and could not be fetched from the hub "
        f"({type(err).__name__}: {first}). Offline? Download it once where the hub is "
        f"reachable: `{command}`, then MODEL_NAME={local}; or use MODEL_NAME=tiny for an "
        "offline smoke run",
        name,
        command,
    )


def resolve(cfg: Config) -> str:
    """The path or hub name to load, building a tiny model on first use. A name that can only be
    a local path (and is not there) fails at once, without asking the hub."""
    name = cfg.model.model_name
    problem = local_model_problem(name)
    if problem:
        raise UserError(problem)
    return resolve_model(name)


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, setting: str = "MODEL_NAME"
) -> PreTrainedTokenizerBase:
    """``setting``: what the user set to name this dir (ADAPTER_DIR for a run's own tokenizer), for errors."""
    from transformers import AutoTokenizer

    go_offline_if_hub_unreachable(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, HTTP errors, ValueError: all mean "can't load"
        raise load_error(name_or_path, e, setting) from e
    if tok.pad_token is None:  # many base models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    _patch_legacy_pad(tok)
    return tok


def _patch_legacy_pad(tok: PreTrainedTokenizerBase) -> None:
    """ChatGLM-6B/2/3's remote tokenizers override ``_pad`` without the ``padding_side`` argument
    that transformers >= 4.45 passes, so any padded call fails with "_pad() got an unexpected
    keyword argument 'padding_side'". Their ``_pad`` honours ``self.padding_side``, so dropping
    the argument (after applying it to that attribute) is exact."""
    import inspect

    params = inspect.signature(tok._pad).parameters
    if "padding_side" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    legacy = tok._pad

    def _pad(encoded_inputs: Any, *args: Any, padding_side: str | None = None, **kwargs: Any) -> Any:
        if padding_side is None:
            return legacy(encoded_inputs, *args, **kwargs)
        saved, tok.padding_side = tok.padding_side, padding_side
        try:
            return legacy(encoded_inputs, *args, **kwargs)
        finally:
            tok.padding_side = saved

    cast(Any, tok)._pad = _pad  # an instance attribute over the class's method: this tokenizer only
    log.info("%s: its remote-code _pad predates padding_side; patched (known ChatGLM issue)", type(tok).__name__)


def load_model(
    name_or_path: str,
    trust_remote_code: bool = False,
    quant: str = "none",
    bf16: bool = False,
    setting: str = "MODEL_NAME",
    precision: str = "auto",
    trains_all: bool = False,
) -> PreTrainedModel:
    """Base causal LM: fp32 on CPU, bf16 on a CUDA GPU that supports it; 4/8-bit via bitsandbytes.

    ``bf16`` stores the weights in bf16 on CPU too: for frozen weights under bf16 autocast
    (app/plan/precision.py ``bf16_frozen_weights``), where fp32 copies would only be cast again.
    ``setting`` names the dir in errors (ADAPTER_DIR when it is a trained full model).
    ``precision``: a training run's resolved PRECISION (fp32 keeps a GPU's weights fp32).
    ``trains_all``: METHOD=full trains these weights, so a GPU keeps them fp32 too (quantization.gpu_weights_bf16).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from app.models.quantization import bnb_config, load_dtype, read_without_mmap

    go_offline_if_hub_unreachable(name_or_path)
    cuda = torch.cuda.is_available()
    dtype = load_dtype(bf16, cuda, precision, trains_all)
    qcfg = bnb_config(quant, cuda)
    extra: dict[str, Any] = {"quantization_config": qcfg} if qcfg is not None else {}
    from transformers.integrations import is_deepspeed_zero3_enabled

    if cuda and not is_deepspeed_zero3_enabled():  # ZeRO-3 places (partitions) the weights itself
        extra["device_map"] = {"": torch.cuda.current_device()}
    reader = read_without_mmap() if qcfg is not None and not cuda else contextlib.nullcontext()
    try:
        with reader:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **extra
            )
    except ImportError as e:  # bitsandbytes missing or too old
        raise UserError(
            f"QUANT_LEVEL={quant}: {str(e).splitlines()[0][:200]}; "
            "install the pinned requirements (make setup) or use QUANT_LEVEL=none"
        ) from None
    except Exception as e:  # as load_tokenizer: whatever failed, the user hears one line naming the model
        raise load_error(name_or_path, e, setting) from e
    return model


def load_adapter(model: PreTrainedModel | PeftModel, adapter: Path, name: str = "default") -> PeftModel:
    """PeftModel.from_pretrained, or one more adapter ``name`` on a PeftModel (`serve`), with a damaged
    adapter file as one line (app.models.integrity.load_failure)."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(adapter), adapter_name=name)
        if getattr(model.peft_config[name], "use_dora", False):
            from app.models.quantization import keep_8bit_scales

            keep_8bit_scales(model)  # DoRA on an 8-bit base on CPU would lose them (app/models/quantization.py)
        return model
    except Exception as e:  # load_failure keeps what is not a damaged file: re-raised as it is
        known = load_failure(adapter, f"ADAPTER_DIR={adapter}", e)
        if known is None:
            raise
        raise known from e


def detect_lora_targets(model: torch.nn.Module) -> list[str]:
    """Leaf names of every linear projection inside the transformer blocks.

    Works across families: GLM/Llama/Qwen (q_proj, k_proj, ..., gate_up_proj) and ChatGLM
    (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) without a per-family table.
    """
    import torch

    names = set()
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf in NEVER_TARGET:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(leaf)
    if not names:
        raise UserError(
            "LORA_TARGETS: found no linear layers to adapt in this model; "
            "set LORA_TARGETS to its projection names (comma-separated)"
        )
    return sorted(names)


# LORA_INIT -> PEFT's init_lora_weights (loftq: PEFT's default first, then _loftq)
INITS: dict[str, Any] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa_niter_16",
    "olora": "olora",
    "loftq": True,
}
MUTATING = ("pissa", "olora")  # they move the adapter's starting point out of the base's weights
INIT_DIR = "lora_init_dir"  # the PeftModel's attribute: where its initial adapter was saved


def save_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """save_pretrained's extra arguments for a trained adapter: a PiSSA/OLoRA one is converted to a plain LoRA
    adapter (rank 2 x LORA_R) of the unchanged base, so predict, merge and serve load it like any other."""
    init = getattr(model, INIT_DIR, None)
    kw: dict[str, Any] = {"path_initial_model_for_weight_conversion": init} if init else {}
    if len(getattr(model, "peft_config", None) or ()) > 1:  # STAGE=dpo/kto's frozen "ref" copy is not the run's
        kw["selected_adapters"] = ["default"]
    return kw


def _loftq(peft_model: PeftModel, model_path: str) -> None:
    """LoftQ (one step) on the 4-bit base: B @ A set to the best rank-LORA_R approximation of what quantization
    lost, W - dequant(Q(W)), divided by LoRA's scale, so the model starts nearer the unquantized one. PEFT's
    replace_lora_weights_loftq does this on CUDA only; this is the same on any device."""
    import torch
    from peft.tuners.lora.bnb import Linear4bit
    from safetensors import safe_open

    weights = Path(model_path) / "model.safetensors"
    if not weights.is_file():
        raise UserError(
            f"LORA_INIT=loftq reads the unquantized weights from one model.safetensors file, and "
            f"{model_path} has none (a sharded or hub model); use another LORA_INIT"
        )
    import bitsandbytes as bnb

    done = 0
    with safe_open(str(weights), "pt") as f, torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            original = f.get_tensor(name.removeprefix("base_model.model.") + ".weight").float()
            layer = cast(Any, module)  # peft's Linear4bit: its attributes are not typed
            lost = original - bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            u, s, vh = torch.linalg.svd(lost, full_matrices=False)
            r, scale = layer.r["default"], layer.scaling["default"]
            root = s[:r].sqrt()
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_((root[:, None] * vh[:r]).to(a.dtype))
            b.copy_((u[:, :r] * root / scale).to(b.dtype))
            done += 1
    if not done:
        raise UserError("LORA_INIT=loftq found no 4-bit LoRA layer; set QUANT_LEVEL=4bit (or METHOD=qlora)")
    log.info("LoftQ: %d LoRA layers start at their 4-bit weights' quantization error", done)


def apply_lora(model: PreTrainedModel, cfg: Config, model_path: str = "") -> PeftModel:
    import torch
    from peft import LoraConfig, get_peft_model

    lo = cfg.lora
    targets: list[str] | str = lo.lora_targets or detect_lora_targets(model)
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR  # PEFT's spelling: it picks the layers (every linear one but the output head)
    else:
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise UserError(
                f"LORA_TARGETS={','.join(targets)}: no module named {', '.join(missing)} in this model; "
                f"leave LORA_TARGETS empty to auto-detect ({', '.join(detect_lora_targets(model))}), "
                f"or use LORA_TARGETS={ALL_LINEAR}"
            )
    lcfg = LoraConfig(
        r=lo.lora_r,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
        init_lora_weights=INITS[lo.lora_init],
    )
    if lo.lora_init in MUTATING:
        torch.manual_seed(cfg.train.seed)  # PiSSA's fast SVD is randomized: a resume must rebuild the same base
    peft_model = get_peft_model(model, lcfg)
    if lo.use_dora:
        from app.models.quantization import keep_8bit_scales

        keep_8bit_scales(peft_model)  # DoRA on an 8-bit base on CPU would lose them (app/models/quantization.py)
    if lo.lora_init in MUTATING:
        # the adapter as initialized, to convert the trained one back to plain LoRA on the unchanged base when it
        # is saved (save_kwargs); rebuilt identically on a resume, so a temp dir serves
        init_dir = tempfile.mkdtemp(prefix="lora-init-")
        atexit.register(shutil.rmtree, init_dir, ignore_errors=True)  # ours: gone when the process ends
        peft_model.save_pretrained(init_dir)
        setattr(peft_model, INIT_DIR, init_dir)
    if lo.lora_init == "loftq":
        _loftq(peft_model, model_path)
    trainable, total = peft_model.get_nb_trainable_parameters()
    variant = "".join(f" +{name}" for name, on in (("DoRA", lo.use_dora), ("rsLoRA", lo.use_rslora)) if on)
    log.info(
        "LoRA%s r=%d on %s: %s trainable of %s parameters (%.2f%%)",
        variant,
        lo.lora_r,
        targets if isinstance(targets, str) else ",".join(targets),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(1, total),
    )
    return peft_model


def apply_ptuning(model: PreTrainedModel, cfg: Config) -> PeftModel:
    """P-Tuning v2: trained key/value prefixes in every layer (peft's prefix tuning)."""
    from peft import PrefixTuningConfig, get_peft_model

    hidden = getattr(model.config, "hidden_size", None) or model.config.get_text_config().hidden_size
    pcfg = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.lora.pre_seq_len,
        prefix_projection=cfg.lora.prefix_projection,
        encoder_hidden_size=hidden,
    )
    peft_model = get_peft_model(model, pcfg)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "P-Tuning v2, %d prefix tokens%s: %s trainable of %s parameters",
        cfg.lora.pre_seq_len,
        " with projection" if cfg.lora.prefix_projection else "",
        f"{trainable:,}",
        f"{total:,}",
    )
    return peft_model
