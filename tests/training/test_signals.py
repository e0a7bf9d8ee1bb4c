"""Stop signals: `docker compose stop` (SIGTERM) or Ctrl-C (SIGINT) during training ends the run
at the end of the optimizer step it is in (not at the end of training or of an epoch, which is what
keeps it inside docker's 10 s grace period), with a resumable checkpoint and exit status 128 + signal;
the same command then resumes. Outside training, SIGTERM still ends any command cleanly.

No assertion here is on wall-clock time (a loaded machine makes any threshold flaky): what is
checked is the step the run stopped at. Timeouts are hang guards only."""

import json
import signal
import subprocess

import pytest

from app.training.metrics_file import read_metrics
from app.training.signals import Interrupted, StopRequest


def _train_args(model_dir, data_dir, out, max_steps):
    # Enough steps that the run is still going when the signal comes; no periodic checkpoint or
    # evaluation, so the only checkpoint is the one the signal causes.
    values = {
        "MODEL_NAME": model_dir,
        "DATA_PATH": data_dir / "train.jsonl",
        "OUTPUT_DIR": out,
        "MAX_SAMPLES": 40,
        "MAX_STEPS": max_steps,
        "BATCH_SIZE": 1,
        "GRAD_ACCUM": 1,
        "LOGGING_STEPS": 1,
        "SAVE_STEPS": 10_000,
        "EVAL_STEPS": 10_000,
        "MAX_SEQ_LEN": 128,
        "NUM_THREADS": 1,
        "QUANT_LEVEL": "none",
        "TIER": "none",
        "SEED": 0,
    }
    return ["train", *(f"{k}={v}" for k, v in values.items())]


def _logged_steps(metrics):
    """The step of every complete line of a live run's metrics.jsonl: the app's own lenient reader
    (no file yet: none; a line still being written is left out), not conftest's strict one."""
    return [r["step"] for r in read_metrics(metrics)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_exits_fast_and_resumes(tiny_glm_dir, tmp_path, sig, make_data, app_process, run_app):
    data = make_data(n_train=60, n_dev=5, seed=1)
    out, metrics = tmp_path / "out", tmp_path / "out" / "metrics.jsonl"
    # app_process sends stderr to a file (proc.text()): a pipe, once full, would block the progress bar
    proc = app_process(_train_args(tiny_glm_dir, data, out, 5000))
    proc.wait_for(lambda: metrics.is_file() and '"loss"' in metrics.read_text())  # its first step
    # Freeze the run, note the last step it logged, signal it and let it go on. The signal is
    # handled in the step after that one, or (if the freeze fell between a step's end and its
    # log line: the Trainer logs after on_step_end) in the step after that.
    proc.proc.send_signal(signal.SIGSTOP)
    try:
        logged = _logged_steps(metrics)
        proc.proc.send_signal(sig)  # pending until the process runs again
    finally:
        proc.proc.send_signal(signal.SIGCONT)
    rc = proc.wait()
    text = proc.text()
    assert rc == 128 + sig, text[-3000:]
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1, text[-3000:]
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["global_step"]
    assert 1 <= step < 5000 and ckpts[0].name == f"checkpoint-{step}"
    # It stopped at the end of the step it was in: checkpointed right there, and ran no step after it.
    assert logged and step in (logged[-1] + 1, logged[-1] + 2), (logged[-1], step)
    assert max(_logged_steps(metrics)) == step
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= {p.name for p in ckpts[0].iterdir()}
    assert f"stopped by {sig.name} at step {step} of 5000" in text and "run the same command to resume" in text
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from an unfinished run
    if sig != signal.SIGTERM:
        return  # the same code path from here on; resuming is checked once

    # The same command, now with an end in sight, resumes from that checkpoint and finishes.
    done = run_app(_train_args(tiny_glm_dir, data, out, step + 2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {ckpts[0]}" in done.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2
    assert not (out / "checkpoints").exists()


def test_second_signal_stops_at_once():
    req = StopRequest()
    req.handle(signal.SIGTERM, None)
    assert req.requested and req.name == "SIGTERM"
    with pytest.raises(Interrupted) as e:
        req.handle(signal.SIGINT, None)
    assert e.value.exit_code == 130 and "stopped at once" in str(e.value)


def test_sigterm_outside_training_exits_143(tiny_glm_dir, app_process):
    """Any command (here a chat waiting for input) ends on SIGTERM, also as PID 1 in a container,
    where a signal without a handler would be ignored."""
    proc = app_process(
        ["predict", "INTERACTIVE=1", "ADAPTER_DIR=none", f"MODEL_NAME={tiny_glm_dir}"], stdin=subprocess.PIPE, text=True
    )
    proc.wait_for(lambda: "chat: type a message" in proc.text())  # the model is loaded, input() waits
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143, proc.text()[-3000:]
    assert "stopped by SIGTERM" in proc.text()
