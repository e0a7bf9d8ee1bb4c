"""Trainer callbacks: progress bar, metrics JSONL, best adapter + early stopping, loss plot."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from app.core.atomic import staged_dir
from app.models.loading import save_kwargs
from app.training.dist import is_main
from app.training.metrics_file import loss_figure

if TYPE_CHECKING:
    import torch
    from tqdm.auto import tqdm
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from app.training.sampler import MemorySampler

log = logging.getLogger(__name__)


class Throughput:
    """Tokens/s of this process, from the Trainer's own non-padding token count.

    A resumed run's count starts at the checkpoint's: only the tokens after ``begin`` (on_train_begin,
    once the checkpoint's state is loaded) were trained in this process's seconds."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.eval_time = 0.0  # evaluation is not training throughput
        self.tokens0 = 0

    def begin(self, state: TrainerState) -> None:
        """The token count training starts from; the same at every call before the first step."""
        self.tokens0 = state.num_input_tokens_seen

    def tokens_per_s(self, state: TrainerState) -> float:
        elapsed = time.perf_counter() - self.t0 - self.eval_time
        return (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed > 0 else 0.0


def tokens_trained(state: TrainerState, resumed_from: Path | None) -> int:
    """The tokens this process trained: the Trainer's count less the one saved in the checkpoint it
    resumed from (its trainer_state.json), which counts the tokens of the run before the resume."""
    if resumed_from is None:
        return state.num_input_tokens_seen
    try:  # the resume check read it already: a checkpoint gone since is not worth failing the run for
        saved = json.loads((resumed_from / "trainer_state.json").read_text(encoding="utf-8"))
        return state.num_input_tokens_seen - int(saved.get("num_input_tokens_seen") or 0)
    except (OSError, ValueError):
        return state.num_input_tokens_seen


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimizer steps with loss, tokens/s and ETA (rank 0 only)."""

    def __init__(self, throughput: Throughput):
        self.tp, self.last_loss, self.eval_start = throughput, math.nan, 0.0
        self.bar: tqdm | None = None
        self.eval_bar: tqdm | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        from tqdm.auto import tqdm

        self.tp.begin(state)
        if not state.is_world_process_zero:
            return
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)

    def _draw(self, state: TrainerState) -> None:
        # The latest logged loss: LOGGING_STEPS apart, the steps between show the last one logged. The
        # postfix first: update() draws the bar, and would show the previous step's.
        if self.bar is None:
            return
        loss = "-" if math.isnan(self.last_loss) else f"{self.last_loss:.4f}"
        self.bar.set_postfix(loss=loss, tok_s=f"{self.tp.tokens_per_s(state):.0f}", refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # A step the Trainer logs (should_log, set by its flow callback before this one) is drawn by on_log,
        # with its own loss, which is logged only after on_step_end.
        if self.bar is not None and not control.should_log:
            self._draw(state)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.last_loss = logs["loss"]
            if self.bar is not None and not self.bar.disable:
                self._draw(state)

    def on_prediction_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        eval_dataloader: Any = None,
        **kw: Any,
    ) -> None:
        from tqdm.auto import tqdm

        if not state.is_world_process_zero:
            return
        if not self.eval_start:
            self.eval_start = time.perf_counter()
            total = len(eval_dataloader) if eval_dataloader is not None else None
            self.eval_bar = tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if self.eval_start:
            self.tp.eval_time += time.perf_counter() - self.eval_start
            self.eval_start = 0.0
            if self.eval_bar is not None:
                self.eval_bar.close()
        if metrics and "eval_loss" in metrics and self.bar is not None and not self.bar.disable:
            self.bar.write(f"step {state.global_step}: eval_loss {metrics['eval_loss']:.4f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar.disable = True


class MetricsJsonl(TrainerCallback):
    """Append every log record (train and eval) as one JSON line, with tokens/s and time."""

    def __init__(
        self, path: Path, throughput: Throughput, sampler: MemorySampler | None = None, budget_mb: float = 0.0
    ):
        self.path, self.tp, self.sampler, self.budget_mb = path, throughput, sampler, budget_mb
        self.trackers: list[Any] = []  # REPORT_TO's callbacks (TensorBoard's too): rows logged outside on_log
        self._now: tuple[Any, Any, Any] | None = None  # (args, state, control) of the last evaluation

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.tp.begin(state)  # as ProgressBar does: whichever of the two is in use

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        ours = {
            "tokens_seen": state.num_input_tokens_seen,
            "tokens_per_s": round(self.tp.tokens_per_s(state), 1),
            "max_steps": state.max_steps,
        }  # with time_s, a watcher's progress and ETA (the web UI)
        if self.budget_mb:
            ours["budget_mb"] = round(self.budget_mb, 1)  # the plan's memory budget, beside the RSS below
        if self.sampler is not None:  # memory now and at its peak so far (RSS / cgroup / CUDA)
            ours.update(
                {
                    k: v
                    for k, v in {**self.sampler.current(), **self.sampler.peaks()}.items()
                    if v is not None and k != "samples"
                }
            )
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs, **ours}
        logs.update(ours)  # the trackers' callbacks come after this one: they get the tool's metrics too
        self.write(row)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._now = (args, state, control)

    def write(self, row: dict[str, Any]) -> None:
        if not is_main():  # one log for the run, written by rank 0
            return
        row = {**row, "time_s": round(time.perf_counter() - self.tp.t0, 2)}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if "eval_f1" in row and self._now is not None:  # F1 comes after the Trainer has logged the evaluation
            values = {k: v for k, v in row.items() if k not in ("step", "time_s") and isinstance(v, (int, float))}
            for tracker in self.trackers:
                tracker.on_log(*self._now, logs=dict(values))


class BestAdapter(TrainerCallback):
    """Keep the best adapter (lowest eval loss, or highest eval F1) in ``out_dir``; stop after
    PATIENCE evaluations without improvement.

    Every rank keeps the score (eval metrics are already gathered over ranks, so they agree on
    when to stop); rank 0 writes. ``resumed``: the evaluations logged before a checkpoint this run
    resumes from, so the best so far is not forgotten. ``state_dict``: a callable gathering the full
    weights on every rank (DeepSpeed ZeRO-3 shards them), else None.
    """

    def __init__(
        self,
        out_dir: Path,
        patience: int = 0,
        metric: str = "eval_loss",
        resumed: list[dict[str, Any]] | None = None,
        state_dict: Callable[[], dict[str, torch.Tensor] | None] | None = None,
    ):
        self.out_dir, self.patience, self.metric, self.state_dict = out_dir, patience, metric, state_dict
        self.sign = 1 if metric == "eval_loss" else -1  # compare as "lower is better"
        self.best, self.bad_evals = math.inf, 0
        self.best_step: int | None = None
        for row in resumed or []:
            if row.get(metric) is not None:
                self._score(self.sign * row[metric], row.get("step"))

    def _score(self, loss: float, step: int | None) -> bool:
        if loss < self.best:
            self.best, self.best_step, self.bad_evals = loss, step, 0
            return True
        self.bad_evals += 1
        return False

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        model: Any = None,
        **kw: Any,
    ) -> None:
        value = (metrics or {}).get(self.metric)
        if value is None:
            return
        if self._score(self.sign * value, state.global_step):
            weights = self.state_dict() if self.state_dict is not None else None  # collective under ZeRO-3
            if state.is_world_process_zero:
                with staged_dir(self.out_dir) as tmp:
                    model.save_pretrained(
                        tmp, **({"state_dict": weights} if weights is not None else {}), **save_kwargs(model)
                    )
        else:
            if self.patience and self.bad_evals >= self.patience:
                log.info(
                    "early stopping: %s has not improved on %.4f (step %s) for %d evaluations",
                    self.metric,
                    self.sign * self.best,
                    self.best_step,
                    self.bad_evals,
                )
                control.should_training_stop = True


def plot_losses(metrics_path: Path, out_png: Path) -> bool:
    """Write loss_figure(metrics_path) to ``out_png``; returns False when there is nothing to plot."""
    from app.core.plots import text_context

    # Titled with the run (OUTPUT_DIR's name, perhaps Chinese): a shared PNG says whose curve it is.
    title = metrics_path.resolve().parent.name
    with text_context(title):  # the title is its only text that can be Chinese
        fig = loss_figure(metrics_path, title)
        if fig is None:
            return False
        fig.savefig(out_png, dpi=100)
    return True
