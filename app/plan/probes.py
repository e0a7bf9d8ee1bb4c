"""Calibration probes for app/plan/train_timing.py: how fast this machine runs a run's kinds of work, measured.

Each times a real forward + backward (best of a few after a warm-up) in the run's compute setting: one
projection sized like the model's (a bitsandbytes 4-bit / 8-bit layer with its dequantization, or a torch
weight in fp32 / bf16 autocast), causal SDPA at the run's length, one block's elementwise work, and an
AdamW step. Capped so all of them take about a second at most; each result is cached per setting in the
process, and torch's random state is left as it was (a run's seeded draws do not move).

A run that spent most of its time waiting for a CPU timed the other processes of a busy machine, not this
one's speed (on 2 cores with another process busy, a 64 x 128 projection took 12-16 ms instead of 0.05:
torch's second thread waited for the core); a probe whose every run did, or whose clock did not advance,
measured nothing and raises NothingMeasured rather than return a rate that is not this machine's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

# A probe projection holds at most this many weights (the model's in/out ratio kept). A dense matmul's rate
# hardly depends on the size, but a 4-bit / 8-bit layer writes out every weight dequantized in each pass,
# and a small layer's buffer stays in cache where a model's does not: with glibc's default allocator reusing
# it, a 16M-weight 4-bit probe ran at 600 GFLOP/s here, a 4096 x 13696 one (56M, ChatGLM3-6B's MLP) at 354
# as its layers do in the model. So a quantized probe runs at the model's size up to a 70B's MLP's quarter
# (about 1.5 s more than a 16M one, mostly quantizing it).
PROBE_WEIGHTS = {"none": 4 * 2**20, "8bit": 64 * 2**20, "4bit": 64 * 2**20}
PROBE_TOKENS = 512  # ... and sees at most this many tokens; attention and the elementwise work at most this length
PROBE_HEADS = 8
PROBE_REPEATS = 3  # best of, after a warm-up
BUSY_WAIT = 0.5  # a run whose threads waited for a CPU longer than this share of it timed the machine's load
_CACHE: dict[tuple, float] = {}


class NothingMeasured(Exception):
    """A probe that timed no work: why, in words (app/plan/train_timing.py then gives no time at all)."""


def _best(step: Callable[[], None], sync: Callable[[], None]) -> float:
    """The fastest of PROBE_REPEATS runs after a warm-up that ran rather than waited for a CPU (more, up to 20,
    while they total under 50 ms, or under 250 ms while too few did: the minimum of a few is what the machine
    can do, without another process's share). NothingMeasured when none did, or the clock did not advance."""
    runs: list[tuple[float, float]] = []  # (seconds, seconds this process's threads waited for a CPU meanwhile)
    clean: list[float] = []
    for i in range(21):
        waited, t = run_delay(), perf_counter()
        step()
        sync()
        t, waited = perf_counter() - t, run_delay() - waited
        if i:  # the first is the warm-up
            runs.append((t, waited))
        clean = [s for s, w in runs if s > 0 and w <= BUSY_WAIT * s]
        total = sum(s for s, _ in runs)
        if len(runs) >= PROBE_REPEATS and (len(clean) >= PROBE_REPEATS and total > 0.05 or total > 0.25):
            break
    if clean:
        return min(clean)
    if not any(s > 0 for s, _ in runs):
        raise NothingMeasured(f"its {len(runs)} runs took no measurable time: the clock did not advance")
    share = min(w / s for s, w in runs if s > 0)
    what = "the whole" if share >= 1 else f"{share:.0%} or more"
    raise NothingMeasured(
        f"this machine is busy: its threads spent {what} of each of its {len(runs)} runs waiting "
        f"for a CPU{_load()}, so it timed other processes' share, not this machine's speed; run "
        "`make info` again when it is idle"
    )


def run_delay() -> float:
    """Seconds this process's threads have spent ready to run but waiting for a CPU (Linux's schedstat);
    0 where that is not known (then no run counts as waiting)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    total = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat", "rb") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            continue
    return total / 1e9


def _load() -> str:
    try:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f", load average {os.getloadavg()[0]:.1f} on {cpus} CPUs"
    except OSError:
        return ""


def _run_probe(key: tuple, cuda: bool, body: Callable[[Any, Callable[[], None]], float]) -> float:
    """``body(torch, sync)`` -> FLOP/s, run once per key; torch's RNG is left as it was (the run is seeded)."""
    if key not in _CACHE:
        import torch

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            torch.manual_seed(0)
            _CACHE[key] = body(torch, sync)
    return _CACHE[key]


def probe_linear(
    quant: str,
    precision: str,
    n_in: int,
    n_out: int,
    tokens: int,
    trainable: bool = False,
    half_weights: bool = False,
    cuda: bool = False,
) -> float:
    """FLOP/s of one projection's forward + backward (input gradient, and the weight's if ``trainable``)
    in the run's setting: a bitsandbytes 4-bit / 8-bit layer (dequantization included), else a torch
    weight in fp32, or bf16/fp16 autocast (``half_weights``: the weights load in bf16, quantized or not). Dims
    capped (PROBE_*)."""
    scale = min(1.0, math.sqrt(PROBE_WEIGHTS[quant] / max(1, n_in * n_out)))
    n_in, n_out = (max(16, int(n * scale) // 16 * 16) for n in (n_in, n_out))
    tokens = max(1, min(tokens, PROBE_TOKENS))
    key = ("linear", quant, precision, n_in, n_out, tokens, trainable, half_weights, cuda)

    def body(torch: Any, sync: Callable[[], None]) -> float:
        device = "cuda" if cuda else "cpu"
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        w = torch.empty(n_out, n_in).uniform_(-0.05, 0.05)
        if quant in ("4bit", "8bit"):
            layer, dtype = _quantized(quant, w, half_weights, cuda), torch.float32
        else:  # bf16 weights outside autocast (a quantized run's head) take bf16 inputs
            w = w.to(device, torch.bfloat16 if half_weights else torch.float32).requires_grad_(trainable)
            layer, dtype = (lambda x: torch.nn.functional.linear(x, w)), torch.float32 if half else w.dtype
        x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
        grad: list[Any] = []

        def step() -> None:
            with torch.autocast(device, dtype=half or torch.float32, enabled=half is not None):
                y = layer(x)
            if not grad:
                grad.append(torch.ones_like(y))
            y.backward(grad[0])
            x.grad = w.grad = None

        return 2 * n_in * n_out * tokens * (3 if trainable else 2) / _best(step, sync)

    return _run_probe(key, cuda, body)


def _quantized(quant: str, w: Any, half_weights: bool, cuda: bool) -> Any:
    """A frozen bitsandbytes layer holding ``w``, set up as app.models.quantization loads the model's: quantized
    from the dtype the model loads in, which is what it dequantizes to in every pass (quantized from fp32, a
    bf16 run's 4-bit layer probed at 225 GFLOP/s against 360 for the same layer from bf16)."""
    import bitsandbytes as bnb

    from app.models.quantization import bnb_config, keep_4bit_trainable, load_dtype

    q, device = bnb_config(quant, cuda), "cuda" if cuda else "cpu"
    assert q is not None  # quant is 4bit or 8bit here
    w = w.to(load_dtype(half_weights, cuda))
    n_out, n_in = w.shape
    layer: Any
    if quant == "8bit":
        layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False, threshold=q.llm_int8_threshold)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        opts = dict(
            quant_type=q.bnb_4bit_quant_type,
            compress_statistics=q.bnb_4bit_use_double_quant,
            quant_storage=q.bnb_4bit_quant_storage,
        )
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=q.bnb_4bit_compute_dtype, **opts)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, **opts)
    layer = layer.to(device)  # quantizes
    keep_4bit_trainable(layer)
    return layer


def probe_attention(precision: str, head_dim: int, seq: float, cuda: bool = False) -> float:
    """FLOP/s of causal SDPA forward + backward, counted as ``micro_batch_flops`` counts attention."""
    seq = max(16, min(int(seq), PROBE_TOKENS))
    key = ("attention", precision, head_dim, seq, cuda)

    def body(torch: Any, sync: Callable[[], None]) -> float:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        q, k, v = (
            torch.randn(1, PROBE_HEADS, seq, head_dim, device="cuda" if cuda else "cpu", dtype=dtype).requires_grad_()
            for _ in range(3)
        )

        def step() -> None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None

        return 3 * 4 * seq**2 * PROBE_HEADS * head_dim / _best(step, sync)

    return _run_probe(key, cuda, body)


def probe_glue(hidden: int, intermediate: int, tokens: int, half: bool = False, cuda: bool = False) -> float:
    """Seconds per token of one block's work besides its matmuls, forward + backward: two RMSNorms, two
    residual adds and two dropouts on the hidden state, the gated activation and a dropout on the
    intermediate one; in fp32, or bf16 where the frozen weights (and so the residual stream) are."""
    tokens = max(1, min(tokens, PROBE_TOKENS))
    key = ("glue", hidden, intermediate, tokens, half, cuda)

    def body(torch: Any, sync: Callable[[], None]) -> float:
        f, dtype = torch.nn.functional, torch.bfloat16 if half else torch.float32
        x, g = (
            torch.randn(tokens, n, device="cuda" if cuda else "cpu", dtype=dtype).requires_grad_()
            for n in (hidden, 2 * intermediate)
        )

        def step() -> None:
            h = x
            for _ in range(2):
                h = h + f.dropout(h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(dtype), 0.05)
            gate, up = g.chunk(2, -1)
            a = f.dropout(f.silu(gate) * up, 0.05)
            torch.autograd.backward([h, a], [torch.ones_like(h), torch.ones_like(a)])
            x.grad = g.grad = None

        return _best(step, sync) / tokens

    return _run_probe(key, cuda, body)


def probe_lora(precision: str, hidden: int, rank: int, tokens: int, cuda: bool = False) -> float:
    """Seconds per token and per unit of a target's in + out features of LoRA's adapter path, forward +
    backward: the dropout on the input, A and B (trainable, rank ``rank``), the scaled add onto the base
    layer's output. Elementwise and skinny matmuls: at rank 8 it costs far more than its FLOPs say."""
    hidden, tokens = min(hidden, 4096), max(1, min(tokens, PROBE_TOKENS))
    key = ("lora", precision, hidden, rank, tokens, cuda)

    def body(torch: Any, sync: Callable[[], None]) -> float:
        f, device = torch.nn.functional, "cuda" if cuda else "cpu"
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        x, base = (torch.randn(tokens, hidden, device=device) for _ in range(2))
        x.requires_grad_()
        a, b = (torch.nn.Parameter(torch.randn(*s, device=device) * 0.01) for s in ((rank, hidden), (hidden, rank)))

        def step() -> None:
            with torch.autocast(device, dtype=half or torch.float32, enabled=half is not None):
                y = base + f.linear(f.linear(f.dropout(x, 0.05), a), b) * 2.0
            y.backward(torch.ones_like(y))
            x.grad = a.grad = b.grad = None

        return _best(step, sync) / (tokens * 2 * hidden)

    return _run_probe(key, cuda, body)


def probe_bandwidth(cuda: bool = False) -> float:
    """Bytes/s read from memory: a sum over a buffer twice the last-level cache (at least 256 MiB, at most 1 GiB),
    which no cache holds. A decode step reads every weight once: this bounds generation
    (app/evaluation/eval_timing.py)."""
    size = min(2**30, max(2**28, 2 * last_level_cache()))
    key = ("bandwidth", size, cuda)

    def body(torch: Any, sync: Callable[[], None]) -> float:
        buf = torch.ones(size // 4, device="cuda" if cuda else "cpu")
        return size / _best(lambda: buf.sum(), sync)

    return _run_probe(key, cuda, body)


def last_level_cache() -> int:
    """Bytes of the largest CPU cache Linux reports (0 where it does not)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        try:
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except ValueError:
            continue
    return max(sizes, default=0)


def probe_optimizer(params: int, cuda: bool = False) -> float:
    """Seconds per trainable parameter of one AdamW step with gradient-norm clipping (fp32)."""
    n = max(1024, min(params, 2**20))
    key = ("adamw", n, cuda)

    def body(torch: Any, sync: Callable[[], None]) -> float:
        p = torch.nn.Parameter(torch.randn(n, device="cuda" if cuda else "cpu"))
        p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW([p], lr=1e-4)

        def step() -> None:
            torch.nn.utils.clip_grad_norm_([p], 1.0)
            opt.step()

        return _best(step, sync) / n

    return _run_probe(key, cuda, body)
