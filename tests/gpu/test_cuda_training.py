"""Training on CUDA: the golden recipe's LoRA and QLoRA 4-bit losses against the same run on this machine's CPU
and against goldens fixed after the first GPU run; bf16 autocast; full tuning's fp32 master weights; kill -9 and
resume."""

from __future__ import annotations

import json
import re
import signal

import pytest

pytestmark = pytest.mark.gpu

# Per-step losses of the recipe on CUDA (H100, torch 2.11.0+cu130 as the lent machine has it), recorded by this
# tier's first run (bench/gpu.md lists them under "recorded") and then fixed here. None: not recorded yet; the
# test then records them and compares with the CPU only.
CUDA_GOLDEN: dict[str, list[float] | None] = {"lora-fp32": None, "qlora-4bit": None}
# fp32 kernels differ between GPU generations and library versions in the last bits, which six steps at
# LR 1e-2 grow to ~1e-4; the CPU computes the same fp32 recipe with other kernels (the same bound, doubled
# by the two kernel sets), and a 4-bit layer dequantizes and computes in bf16 on CUDA where the CPU keeps
# its embeddings and head in bf16 too, but runs other bf16 kernels: bf16's 3 significant digits.
GOLDEN_TOL = 1e-3
CPU_TOL = {"lora-fp32": 1e-3, "qlora-4bit": 2e-2}
BF16_TOL = 3e-2  # bf16 autocast against the fp32 run on the same GPU


# `python -m app train` with every nn.Linear's CUDA output dtype recorded: what autocast really computed in.
LINEAR_DTYPES = """
import atexit, json, os, torch
seen = set()
forward = torch.nn.Linear.forward
def probe(self, x):
    y = forward(self, x)
    if y.is_cuda:
        seen.add(str(y.dtype))
    return y
torch.nn.Linear.forward = probe
atexit.register(lambda: open(os.environ["CUDA_MEMORY_FILE"] + ".dtypes", "w").write(json.dumps(sorted(seen))))
"""


def _losses(proc, out, train_losses) -> list[float]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = train_losses(out)
    return [losses[s] for s in sorted(losses)]


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def _against_golden(variant: str, losses: list[float], figure) -> None:
    want = CUDA_GOLDEN[variant]
    if want is None:
        figure(
            f"{variant}: CUDA golden losses",
            [round(x, 5) for x in losses],
            "recorded now",
            None,
            "paste into tests/gpu/test_cuda_training.py CUDA_GOLDEN",
        )
        return
    diff = _rel(losses, want)
    figure(f"{variant}: CUDA losses vs the golden (max rel. diff)", diff, f"<= {GOLDEN_TOL}", diff <= GOLDEN_TOL)
    assert diff <= GOLDEN_TOL, (losses, want)


@pytest.mark.parametrize("variant", ["lora-fp32", "qlora-4bit"])
def test_cuda_losses_follow_the_cpu_and_the_golden(variant, recipe_run, train_losses, figure):
    cuda_proc, memory, cuda_out = recipe_run(variant, "cuda")
    cpu_proc, _, cpu_out = recipe_run(variant, "cpu")
    cuda, cpu = _losses(cuda_proc, cuda_out, train_losses), _losses(cpu_proc, cpu_out, train_losses)
    assert memory.get("max_reserved_mb", 0) > 0, "the CUDA run held no GPU memory: it did not train on the GPU"
    diff = _rel(cuda, cpu)
    figure(
        f"{variant}: CUDA vs CPU losses (max rel. diff)",
        diff,
        f"<= {CPU_TOL[variant]}",
        diff <= CPU_TOL[variant],
        f"CUDA {[round(x, 5) for x in cuda]}, CPU {[round(x, 5) for x in cpu]}",
    )
    _against_golden(variant, cuda, figure)
    assert cuda[-1] < cuda[0] - 0.3, cuda  # it learns, not just runs
    assert diff <= CPU_TOL[variant], (cuda, cpu)
    if variant == "qlora-4bit":
        assert "NF4 4-bit weights, double quant, bf16 compute" in cuda_proc.stderr


def test_bf16_autocast_computes_in_bf16_and_trains_like_fp32(recipe_run, train_losses, figure):
    bf16_proc, _, bf16_out = recipe_run("lora-bf16", "cuda", prefix=LINEAR_DTYPES)
    fp32_proc, _, fp32_out = recipe_run("lora-fp32", "cuda")
    bf16, fp32 = _losses(bf16_proc, bf16_out, train_losses), _losses(fp32_proc, fp32_out, train_losses)
    dtypes = json.loads(next(bf16_out.parent.glob("*-cuda-memory.json.dtypes")).read_text())
    figure(
        "bf16 autocast: dtypes the Linear layers computed in",
        dtypes,
        "['torch.bfloat16']",
        dtypes == ["torch.bfloat16"],
    )
    diff = _rel(bf16, fp32)
    figure("bf16 autocast vs fp32 on CUDA (max rel. loss diff)", diff, f"<= {BF16_TOL}", diff <= BF16_TOL)
    assert dtypes == ["torch.bfloat16"], dtypes
    assert diff <= BF16_TOL, (bf16, fp32)
    assert bf16[-1] < bf16[0] - 0.3, bf16


def test_full_tuning_under_bf16_autocast_keeps_fp32_master_weights(recipe_run, train_losses, figure):
    """METHOD=full, PRECISION=bf16: the weights the optimizer steps stay fp32 (a bf16 weight loses any step below
    ~2**-9 of itself); only the matmuls run in bf16, so the losses follow the all-fp32 run's."""
    bf16_proc, _, bf16_out = recipe_run("full-bf16", "cuda")
    fp32_proc, _, fp32_out = recipe_run("full-fp32", "cuda")
    bf16, fp32 = _losses(bf16_proc, bf16_out, train_losses), _losses(fp32_proc, fp32_out, train_losses)
    said = re.search(r"full fine-tuning: [\d,]+ trainable parameters, (\w+)", bf16_proc.stderr)
    stored = said.group(1) if said else None
    figure("METHOD=full under bf16 autocast: the master weights' dtype", stored, "float32", stored == "float32")
    diff = _rel(bf16, fp32)
    figure("METHOD=full, bf16 autocast vs fp32 (max rel. loss diff)", diff, f"<= {BF16_TOL}", diff <= BF16_TOL)
    assert stored == "float32", bf16_proc.stderr[-3000:]
    assert diff <= BF16_TOL, (bf16, fp32)
    assert bf16[-1] < bf16[0] - 0.3, bf16


def test_kill_9_then_resume_on_cuda_equals_an_uninterrupted_run(
    recipe_run, train_run, recipe, tiny_glm_dir, make_data, tmp_path, kill_9_while_saving, read_metrics, figure
):
    """As tests/training/test_train.py's kill -9 test, on CUDA with LoRA dropout: the resumed run restores the CUDA
    generator too, so its curve is the uninterrupted one's."""
    ref_proc, _, ref_out = recipe_run("lora-dropout", "cuda")
    assert ref_proc.returncode == 0, ref_proc.stderr[-4000:]
    out = tmp_path / "out"
    cfg = recipe(tiny_glm_dir, make_data(n_train=80, n_dev=10, seed=1), out)
    killed, _ = train_run(cfg, "cuda", kill_9_while_saving)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    resumed, _ = train_run(cfg, "cuda")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr

    def curve(d):
        rows = read_metrics(d)
        return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in rows if "loss" in r or "eval_loss" in r]

    got, want = curve(out), curve(ref_out)
    assert [g[0] for g in got] == [w[0] for w in want]
    diff = max(abs(g[1] - w[1]) for g, w in zip(got, want, strict=True))
    figure("kill -9 + resume on CUDA: curve vs uninterrupted (max abs. diff)", diff, "<= 1e-4", diff <= 1e-4)
    assert diff <= 1e-4, (got, want)
