"""Tune callback (runs in the sweep driver): one MLflow child run per trial under the sweep's
parent run. Child runs are found again by their Ray trial id, so a resumed sweep continues
the same runs instead of duplicating them.

MLflow being down never stops training: each trial's results and its end are queued and
written in order once the tracking server answers again (tried again every `retry_s`).
What is still queued when the sweep ends is in Ray's results; `deeplab sync` writes it.
"""
from __future__ import annotations

import math
import re
import sys
import time
from collections import deque
from pathlib import Path

from ray.tune import Callback

from search import tracking
from search.configs import apply_overrides, ran_all_epochs, trial_overrides
from trainable.ray_train import run_visuals

TRIAL_TAG = "deeplab.trial_id"
SWEEP_TAG = "deeplab.sweep"


class MlflowTrialCallback(Callback):
    def __init__(self, mlflow_cfg, experiment_id: str, parent_run_id: str, sweep_name: str, base_config: dict,
                 metric: str, mode: str, max_epochs: int, train_dir: str, retry_s: float = 15.0):
        self.cfg, self.experiment_id, self.parent_run_id = mlflow_cfg, experiment_id, parent_run_id
        self.sweep_name, self.base, self.metric, self.mode, self.max_epochs = sweep_name, base_config, metric, mode, max_epochs
        self.retry_s = retry_s
        self.train_dir = train_dir  # the trials' Ray Train runs, one folder per trial id
        self._runs: dict[str, str] = {}
        self._best: dict[str, dict] = {}
        self._last_step: dict[str, int] = {}
        self._queues: dict[str, deque] = {}
        self._trials: dict[str, object] = {}
        self._down_until = 0.0
        self.outage: str | None = None  # the last MLflow error, while writes are queued

    def _client(self):
        return tracking.client(self.cfg)

    # -- Tune's hooks: queue, then write what can be written -------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._enqueue(trial, ("start",))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._enqueue(trial, ("result", dict(result)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = ran_all_epochs(trial.config, trial.last_result, self.max_epochs)
        self._enqueue(trial, ("finish", "completed" if done else "pruned", None))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._enqueue(trial, ("finish", "failed", _error_reason(trial)))

    def on_experiment_end(self, trials, **info):
        self.flush(force=True)

    def _enqueue(self, trial, op: tuple) -> None:
        self._trials[trial.trial_id] = trial
        self._queues.setdefault(trial.trial_id, deque()).append(op)
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._down_until:
            return
        for trial_id, queue in self._queues.items():
            trial = self._trials[trial_id]
            while queue:
                try:
                    self._apply(trial, queue[0])
                except Exception as e:  # noqa: BLE001 - any client/transport error: keep it queued
                    self._mark_down(e)
                    return
                queue.popleft()
        if self.outage is not None:
            print(f"MLflow answers again: the queued trial results are written ({self.outage})", file=sys.stderr)
            self.outage = None

    def _mark_down(self, e: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_s
        first = self.outage is None
        self.outage = tracking.one_line(e)
        if first:
            print(f"MLflow is not answering; training goes on and the results are queued "
                  f"(retried every {self.retry_s:.0f} s): {self.outage}", file=sys.stderr)

    # -- the writes --------------------------------------------------------------------------

    def _apply(self, trial, op: tuple) -> None:
        kind = op[0]
        if kind == "start":
            self._run_id(trial)
        elif kind == "result":
            self._log_result(trial, op[1])
        else:
            self._finish(trial, op[1], op[2])

    def _run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        c = self._client()
        run_id, last_step, _ = find_or_create_trial_run(
            c, self.experiment_id, self.sweep_name, trial.trial_id, self.parent_run_id,
            apply_overrides(self.base, trial_overrides(trial.config)), self.metric)
        self._last_step[trial.trial_id] = last_step
        self._runs[trial.trial_id] = run_id
        return run_id

    def _log_result(self, trial, result: dict) -> None:
        run_id = self._run_id(trial)
        c = self._client()
        step = int(result.get("epoch", 0))
        # A resumed trial first replays its checkpoint's epoch: log each epoch once.
        if step > self._last_step.get(trial.trial_id, 0):
            tracking.log_metrics(c, run_id, {k: v for k, v in result.items() if "/" in k}, step=step)
            self._last_step[trial.trial_id] = step
        # Any not yet in the run (also an earlier epoch's, after an outage).
        visuals = run_visuals(self.train_dir, trial.trial_id)
        tracking.log_visuals(c, run_id, visuals, skip=tracking.logged_visuals(c, run_id))
        value = result.get(self.metric)
        best = self._best.get(trial.trial_id)
        if better(value, best[self.metric] if best else None, self.mode) and result.get("checkpoint_path"):
            self._best[trial.trial_id] = {self.metric: value, "checkpoint_path": result["checkpoint_path"],
                                          "epoch": result.get("epoch")}

    def _finish(self, trial, status: str, reason: str | None) -> None:
        run_id = self._run_id(trial)
        cfg = apply_overrides(self.base, trial_overrides(trial.config))
        finish_trial_run(self._client(), run_id, self._best.get(trial.trial_id), cfg, self.metric, status, reason)


def find_or_create_trial_run(c, experiment_id: str, sweep_name: str, trial_id: str, parent_run_id: str,
                             cfg: dict, metric: str, reopen: bool = True) -> tuple[str, int, bool]:
    """The trial's child run (reopened if it was finished and `reopen`: a resumed trial goes
    on in it), the last epoch it holds, and whether it was created now."""
    found = c.search_runs([experiment_id],
                          filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{SWEEP_TAG}` = '{sweep_name}'")
    if found:
        run_id = found[0].info.run_id
        if reopen and found[0].info.status != "RUNNING":
            c.update_run(run_id, "RUNNING")
        history = c.get_metric_history(run_id, metric)
        return run_id, max((m.step for m in history), default=0), False
    run_id = tracking.start_run(c, experiment_id, f"{sweep_name}/{trial_id}", cfg,
                                tags={TRIAL_TAG: trial_id, SWEEP_TAG: sweep_name, "deeplab.kind": "trial"},
                                parent_run_id=parent_run_id)
    return run_id, 0, True


def finish_trial_run(c, run_id: str, best: dict | None, cfg: dict, metric: str, status: str,
                     reason: str | None) -> None:
    """Best checkpoint + config artifacts, best metric, status tag, MLflow status."""
    if best is not None and Path(best["checkpoint_path"]).is_dir():
        tracking.log_checkpoint(c, run_id, best["checkpoint_path"], cfg)
        c.log_metric(run_id, f"best/{metric}", float(best[metric]), step=int(best["epoch"] or 0))
        c.set_tag(run_id, "deeplab.best_checkpoint", best["checkpoint_path"])
    tracking.finish_run(c, run_id, status, reason)


def better(value, best, mode: str) -> bool:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S")


def error_reason(text: str) -> str:
    """The innermost exception line of a traceback ("pkg.mod.Error: message"): Ray wraps
    worker errors, and the user wants the worker's own exception."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (found[-1] if found else lines[-1] if lines else "unknown error")[:500]


def _error_reason(trial) -> str:
    path = getattr(trial, "error_file", None)
    return error_reason(Path(path).read_text(errors="replace") if path and Path(path).is_file() else "")
