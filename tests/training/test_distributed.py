"""Several processes on torch.distributed (torchrun + the HF Trainer's DDP, gloo on CPU).

NPROC=2 must really start two training ranks (a launcher that silently runs one process on a
CPU-only machine would pass a loss check alone): both log, each logs a digest of its trained
parameters and they are equal, and the losses and the adapter match a single process at the same
global batch. Two launchers with NNODES=2 on loopback form one job. The DeepSpeed configs the repo
ships are checked against transformers' own "auto" filling (deepspeed itself needs CUDA).
"""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app import Config, FineTuner

REPO = Path(__file__).resolve().parents[2]
DIGEST = re.compile(r"\[rank (\d)\] INFO app\.training\.dist: rank \1/2 .*trainable parameters sha256 ([0-9a-f]{64})")
# The golden recipe's data and schedule at global batch 4, without dropout (its masks differ per
# process), no evaluation and no periodic checkpoint: short and exactly comparable.
SETTINGS = {
    "MAX_SAMPLES": 40,
    "MAX_STEPS": 4,
    "GRAD_ACCUM": 2,
    "LEARNING_RATE": 1e-2,
    "WARMUP_RATIO": 0,
    "LOGGING_STEPS": 1,
    "EVAL_STEPS": 1000,
    "SAVE_STEPS": 1000,
    "VAL_SIZE": 0,
    "MAX_SEQ_LEN": 256,
    "SEED": 0,
    "NUM_THREADS": 1,
    "QUANT_LEVEL": "none",
    "TIER": "none",
    "LORA_DROPOUT": 0,
    "PRECISION": "fp32",
}  # bf16 autocast (PRECISION=auto on CPUs with AMX) rounds differently per batch shape


@pytest.fixture(scope="module")
def data(data_dir):
    """The golden recipe's training file."""
    return data_dir / "train.jsonl"


def _args(model, data, out, **extra):
    values = {"MODEL_NAME": model, "DATA_PATH": data, "OUTPUT_DIR": out, **SETTINGS, **extra}
    return [sys.executable, "-m", "app", "train", *(f"{k}={v}" for k, v in values.items())]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tiny_glm_dir, data, tmp_path_factory):
    """The reference: one process, BATCH_SIZE=2 x GRAD_ACCUM=2 = global batch 4."""
    out = tmp_path_factory.mktemp("single") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)  # models/.last_run goes there, not into the checkout
        FineTuner(
            Config.from_dict(
                {
                    "MODEL_NAME": str(tiny_glm_dir),
                    "DATA_PATH": str(data),
                    "OUTPUT_DIR": str(out),
                    **SETTINGS,
                    "BATCH_SIZE": 2,
                }
            )
        ).run()
    return out


def test_two_processes_train_as_one_job(tiny_glm_dir, data, single, tmp_path, child_env, read_metrics):
    def _losses(run):  # every logged training loss, in file order (a duplicate row would show)
        return [r["loss"] for r in read_metrics(run) if "loss" in r]

    out = tmp_path / "out"
    proc = subprocess.run(
        _args(tiny_glm_dir, data, out, NPROC=2, BATCH_SIZE=1),
        cwd=tmp_path,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "torchrun: 2 processes (gloo" in log
    # Both ranks really ran: each announced itself with the gloo backend and logged its digest.
    for r in (0, 1):
        assert (
            f"[rank {r}] INFO app.training.dist: rank {r}/2 (node 0, local rank {r}" in log
            and "training with gloo" in log
        )
    digests = dict(DIGEST.findall(log))
    assert set(digests) == {"0", "1"}, log[-4000:]
    assert digests["0"] == digests["1"]  # the same trained parameters on both ranks
    assert "all 2 ranks hold identical trainable parameters" in log
    # The same samples per optimizer step and token-weighted loss: the single-process curve.
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-4)
    assert len(_losses(out)) == 4 and _losses(out)[-1] < _losses(out)[0]
    a, b = load_file(out / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    # Only rank 0 wrote: one metrics log (no duplicate rows), one TensorBoard writer.
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert len(list((out / "runs").iterdir())) == 1
    assert not (out / "checkpoints").exists()


def test_two_nodes_on_loopback(tiny_glm_dir, data, tmp_path, child_env):
    """Two launchers, as on two machines: NNODES=2, NODE_RANK 0 and 1, MASTER_ADDR/PORT of node 0."""
    port = _free_port()
    common = dict(NNODES=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, BATCH_SIZE=1, MAX_STEPS=2)
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = []
    for n in (0, 1):
        with logs[n].open("w") as fh:
            procs.append(
                subprocess.Popen(
                    _args(tiny_glm_dir, data, tmp_path / "out", NODE_RANK=n, **common),
                    cwd=tmp_path,
                    env=child_env,
                    stdout=subprocess.DEVNULL,
                    stderr=fh,
                )
            )
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = [f.read_text() for f in logs]
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in text)
    assert f"node 1 of 2, gloo, rendezvous 127.0.0.1:{port}" in text[1]
    d0, d1 = dict(DIGEST.findall(text[0])), dict(DIGEST.findall(text[1]))
    assert set(d0) == {"0"} and set(d1) == {"1"} and d0["0"] == d1["1"]  # rank 1 ran on "node 1"
    assert "rank 1/2 (node 1, local rank 0" in text[1]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 2
    assert "done:" not in text[1]  # node 1 wrote nothing: only rank 0 writes outputs


@pytest.mark.parametrize("name, stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3), ("ds_zero3_offload.json", 3)])
def test_shipped_deepspeed_configs_fill_from_the_trainer(name, stage):
    """Parse, required keys, and every "auto" is one transformers fills from TrainingArguments and
    the model: its own filling code runs here (on accelerate's config class; deepspeed, which needs
    CUDA, is not installed for the CPU suite)."""
    from types import SimpleNamespace

    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = REPO / "configs" / name
    conf = json.loads(path.read_text())
    assert conf["zero_optimization"]["stage"] == stage
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
        "bf16",
        "fp16",
    ):
        assert key in conf, key
    assert "optimizer" not in conf and "scheduler" not in conf  # OPTIM / LR_SCHEDULER stay in charge
    members = {k: v for k, v in vars(HfTrainerDeepSpeedConfig).items() if not k.startswith("__")}
    Filler = type("Filler", (HfDeepSpeedConfig,), members)
    ds = Filler(str(path))
    ds._dtype, ds.mismatches = None, []
    args = TrainingArguments(
        output_dir="unused",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to="none",
    )
    ds.trainer_config_process(args)
    ds.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 100)
    assert ds.mismatches == []
    assert "auto" not in json.dumps(ds.config), ds.config  # nothing left for deepspeed to choke on
    assert ds.config["train_batch_size"] == 8 and ds.config["gradient_clipping"] == 1.0
    assert ds.is_zero3() == (stage == 3)


def test_ds_config_on_cpu_is_one_clear_line(tmp_path, run_app, write_dataset):
    write_dataset(tmp_path, n_train=10, n_dev=1, seed=1)  # valid data: the DS_CONFIG line is the only problem
    proc = run_app(
        ["train", "NPROC=2", f"DS_CONFIG={REPO / 'configs/ds_zero2.json'}", "DATA_PATH=train.jsonl", "MODEL_NAME=tiny"],
        timeout=120,
    )
    errors = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: DS_CONFIG is allowed here")
    assert proc.returncode == 2 and len(errors) == 1 and "DS_CONFIG=" in errors[0] and "CUDA" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_ds_config_on_one_gpu_starts_under_torchrun(tmp_path):
    """DeepSpeed initializes from torchrun's RANK/MASTER_ADDR variables: DS_CONFIG with NPROC=1 (ZeRO-3 offload
    on one GPU) used to train in a plain process, whose deepspeed.init_distributed fails without them."""
    from app.training import dist

    cfg = Config.from_dict({"DS_CONFIG": str(REPO / "configs/ds_zero2.json")})
    assert cfg.distributed.nproc == 1 and dist.wants_launch(cfg)
    assert not dist.wants_launch(Config.from_dict({}))


def test_a_worker_ends_its_process_group_itself(tmp_path):
    """Left to the interpreter's exit, gloo's threads were torn down joinable and a worker whose run had
    succeeded could abort ("terminate called without an active exception", once in two full suite runs)."""
    import torch.distributed as tdist

    from app.training import dist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert tdist.is_initialized()
    dist.close()
    assert not tdist.is_initialized()
    dist.close()  # nothing to end: a no-op
