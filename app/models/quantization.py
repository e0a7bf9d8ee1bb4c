"""4-bit / 8-bit quantization with bitsandbytes, on CPU (bitsandbytes >= 0.47) and CUDA.

QUANT_LEVEL=4bit is NF4 with double quantization (QLoRA's recipe); 8bit is LLM.int8().
Compute runs in bf16 where the CPU (AVX512-BF16 / AMX) or GPU supports it, else fp32 on CPU
and fp16 on GPU.

Two CPU pitfalls are handled here. bitsandbytes repacks a 4-bit weight into an inference-only
layout the first time it sees a no-grad forward in eval mode (an evaluation pass or a
generate call). Training afterwards then goes through a kernel without autograd: the bias
add fails with "a view of a leaf Variable…", and bias-free layers silently pass no gradient
to the layers below. `keep_4bit_trainable` turns that repacking off for training runs. And
PEFT's DoRA loses an 8-bit weight's row scales after its first forward (`keep_8bit_scales`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger(__name__)

LEVELS = ("none", "8bit", "4bit")


def bf16_supported(cuda: bool) -> bool:
    import torch

    if cuda:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # torch reports the best vector ISA it dispatches to; bf16 matmuls are only fast with
    # native bf16 instructions (AVX512-BF16 or AMX), else they are emulated and slower than fp32.
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compute_dtype(cuda: bool) -> str:
    """What 4-bit layers compute in: bf16 where the hardware is fast at it, else fp16 on GPU, fp32 on CPU."""
    return "bf16" if bf16_supported(cuda) else ("fp16" if cuda else "fp32")


def load_dtype(bf16: bool, cuda: bool, precision: str = "auto", trains_all: bool = False) -> torch.dtype:
    """The dtype weights load in (and a 4/8-bit layer is quantized from, which sets the dtype it dequantizes
    to): bf16 when asked (app/plan/precision.py bf16_frozen_weights) or on a CUDA GPU that has it, else fp32.
    ``precision``: a training run's resolved PRECISION; fp32 keeps a GPU's weights fp32 too, as it promises.
    ``trains_all``: the weights are what METHOD=full trains (see gpu_weights_bf16)."""
    import torch

    return torch.bfloat16 if bf16 or (cuda and gpu_weights_bf16(precision, trains_all)) else torch.float32


def gpu_weights_bf16(precision: str, trains_all: bool = False) -> bool:
    """Whether a CUDA run stores its weights in bf16: on a GPU that has it, unless PRECISION resolved to fp32 or
    the run trains every weight. Full tuning keeps fp32 master weights under bf16 autocast (as HF's mixed
    precision and LLaMA-Factory do): AdamW's step on a bf16 weight rounds away whenever it is below 2**-9 of
    the weight, as a 1e-5 learning rate's often is, and the optimizer's moments would be bf16 too."""
    return precision != "fp32" and not trains_all and bf16_supported(cuda=True)


def bnb_config(level: str, cuda: bool) -> BitsAndBytesConfig | None:
    """A transformers BitsAndBytesConfig for ``level``, or None for ``none``."""
    if level == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if level == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if level == "4bit":
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_dtype(cuda)]
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
    raise ValueError(f"QUANT_LEVEL={level!r} is not one of {', '.join(LEVELS)}")


@contextlib.contextmanager
def read_without_mmap() -> Iterator[None]:
    """Make transformers read safetensors with pread instead of mmap while quantizing on CPU.

    transformers maps the checkpoint and quantizes each linear from the mapping. Every page it
    reads stays mapped (and counted in RSS) until loading ends, and the unquantized tensors
    (embeddings, norms) keep the whole mapping alive afterwards: a 4-bit model then shows the
    fp32 checkpoint's size on top of its own. pread copies each tensor into memory we free as
    soon as it is quantized, so only the quantized weights stay.
    """
    import transformers.modeling_utils as mu

    original = getattr(mu, "safe_open", None)
    if original is None:  # a transformers without this hook: keep its default
        yield
        return

    def pread_open(*args: Any, **kwargs: Any) -> Any:
        kwargs["backend"] = "pread"
        return original(*args, **kwargs)

    hooks = cast(Any, mu)  # a module attribute patched for the load, then put back
    hooks.safe_open = pread_open
    try:
        yield
    finally:
        hooks.safe_open = original
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after the fp32 sources are freed)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking (see module doc); returns layers changed."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            cast(Any, module).support_avx512bf16_for_cpu = False
            n += 1
    return n


def keep_8bit_scales(model: torch.nn.Module) -> int:
    """Keep each 8-bit layer's row scales through PEFT's DoRA on CPU; returns layers changed.

    DoRA dequantizes the base weight in every forward, and on CPU PEFT then puts back
    ``weight.to("cpu")``: a new Int8Params whose int8 rows are set but whose scales (SCB) are
    not, because the layer's first forward had moved them to its matmul state. The next
    forward takes the rows and scales from the weight again, so the scales become None and
    bitsandbytes fails ("'NoneType' object has no attribute 'unsqueeze'") in the second forward of
    training, or at the second token of a prediction. The weight is frozen, so its scales are the
    ones the state already holds; this hook gives them back to the rebuilt weight. Only models with a DoRA
    adapter get it (app/models/loading.py): other 8-bit forwards pay nothing."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and hasattr(module, "state") and not hasattr(module, _HOOKED):
            module.register_forward_pre_hook(_restore_8bit_scales)
            setattr(module, _HOOKED, True)  # once: serve loads many adapters onto one base
            n += 1
    return n


_HOOKED = "_keeps_8bit_scales"


def _restore_8bit_scales(module: torch.nn.Module, _args: tuple[Any, ...]) -> None:
    layer = cast(Any, module)  # a bitsandbytes Linear8bitLt: weight and state are its own, untyped
    weight, state = layer.weight, layer.state
    if (
        getattr(weight, "CB", None) is not None
        and getattr(weight, "SCB", None) is None
        and getattr(state, "SCB", None) is not None
    ):
        weight.SCB = state.SCB


def prepare_for_training(
    model: PreTrainedModel, level: str, gradient_checkpointing: bool, half_embeddings: bool = False
) -> PreTrainedModel:
    """peft's k-bit preparation (norms/embeddings in fp32, input grads) plus the CPU fix.

    ``half_embeddings`` (app.plan.precision.bf16_frozen_weights): the model was loaded in bf16, and
    the input embeddings and output head stay bf16 instead of peft's fp32 (2-5 GB at a 65k-150k
    vocabulary). Everything else peft would upcast still is; the embeddings' output is cast to fp32
    so the residual stream is what it was, and the head takes its input in bf16 (the loss upcasts
    the logits, as it does for any half-precision head).
    """
    if level == "none":
        return model
    from peft import prepare_model_for_kbit_training

    held = _hold_embeddings_half(model) if half_embeddings else []
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
    )
    _restore(held)
    keep_4bit_trainable(model)
    return model


def half_embeddings_on_cpu(level: str, cuda: bool) -> bool:
    """Whether a k-bit model keeps its embeddings and head in bf16 (see prepare_for_training): on a
    CPU with fast bf16. Training and serving both ask here, so an adapter is served on the model it
    was trained on."""
    return level in ("4bit", "8bit") and not cuda and bf16_supported(cuda=False)


def serve_half_embeddings(model: PreTrainedModel) -> PreTrainedModel:
    """For inference, the dtypes training gave a model loaded in bf16 with ``half_embeddings``:
    embeddings and head bf16, every other unquantized tensor (norms, biases) fp32 as peft makes them."""
    import torch

    held = _hold_embeddings_half(model)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    _restore(held)
    return model


def _restore(held: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    for param, half in held:  # back to the bf16 storage, without a second copy
        param.data = half


def _hold_embeddings_half(model: PreTrainedModel) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Stash the bf16 embedding/head tensors behind 0-element stand-ins while peft upcasts the rest
    (an upcast then a downcast would briefly need their fp32 size, which is the peak being avoided),
    and add the dtype casts at their boundaries. Returns (parameter, its bf16 data) to put back."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    held, seen = [], set()
    for module in (emb, head):
        w = getattr(module, "weight", None)
        if w is None or w.dtype != torch.bfloat16 or id(w) in seen:
            continue
        seen.add(id(w))
        held.append((w, w.data))
        w.data = torch.empty(0, dtype=torch.float32)
    if emb is not None:
        emb.register_forward_hook(lambda _m, _i, out: out.float())
    if head is not None:
        head.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))
    return held


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model really stores, quantization state included.

    ``get_memory_footprint()`` counts a packed 4-bit weight by its logical shape on some
    backends; counting storage (once per tensor, tied weights once) is what RSS/VRAM see.
    """
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not hasattr(t, "untyped_storage"):
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or t.device.type == "meta":
            return
        seen.add(key)
        total += storage.nbytes()

    for p in model.parameters():
        add(getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's partition; p itself is an empty placeholder
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for name in ("absmax", "code"):
                add(getattr(state, name, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(nested.absmax)
                add(nested.code)
        add(getattr(p, "SCB", None))  # int8 row scales
    for b in model.buffers():
        add(b)
    return total


def describe(level: str, cuda: bool) -> str:
    if level == "none":
        return "no quantization"
    if level == "8bit":
        return "LLM.int8() 8-bit weights"
    return f"NF4 4-bit weights, double quant, {compute_dtype(cuda)} compute"
