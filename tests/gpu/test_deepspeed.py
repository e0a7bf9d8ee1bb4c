"""DeepSpeed on one GPU: ZeRO-2 and ZeRO-3 with the optimizer and the weights offloaded to the CPU
(configs/ds_zero2.json and ds_zero3_offload.json, as shipped) train the golden recipe to the losses of the plain
run on the same GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
# The same fp32 arithmetic; ZeRO only moves and partitions it, and reduces gradients in buckets of another order.
TOL = 1e-3


@pytest.mark.parametrize("zero", ["zero2", "zero3-offload"])
def test_deepspeed_trains_to_the_plain_runs_losses(zero, recipe_run, train_losses, figure, gpu_package):
    gpu_package("deepspeed")
    ds = REPO / "configs" / f"ds_{zero.replace('-', '_')}.json"  # as shipped
    plain_proc, _, plain_out = recipe_run("lora-fp32", "cuda")
    proc, _, out = recipe_run("lora-fp32", "cuda", DS_CONFIG=str(ds))
    assert plain_proc.returncode == 0, plain_proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"DeepSpeed {ds}" in proc.stderr  # it ran under the launcher with the config, not as a plain run
    plain, got = train_losses(plain_out), train_losses(out)
    assert sorted(got) == sorted(plain)
    diff = max(abs(got[s] - plain[s]) / abs(plain[s]) for s in plain)
    figure(
        f"DeepSpeed {zero} vs plain on one GPU (max rel. loss diff)",
        diff,
        f"<= {TOL}",
        diff <= TOL,
        f"{zero} {[round(got[s], 5) for s in sorted(got)]}",
    )
    assert diff <= TOL, (got, plain)
    assert (out / "adapter_model.safetensors").is_file()
