"""Tune callback (runs in the sweep driver): one MLflow child run per trial under the sweep's
parent run. Child runs are found again by their Ray trial id, so a resumed sweep continues
the same runs instead of duplicating them."""
from __future__ import annotations

import math
import re
from pathlib import Path

from ray.tune import Callback

from search import tracking
from search.configs import apply_overrides, ran_all_epochs, trial_overrides

TRIAL_TAG = "deeplab.trial_id"
SWEEP_TAG = "deeplab.sweep"


class MlflowTrialCallback(Callback):
    def __init__(self, mlflow_cfg, experiment_id: str, parent_run_id: str, sweep_name: str, base_config: dict,
                 metric: str, mode: str, max_epochs: int):
        self.cfg, self.experiment_id, self.parent_run_id = mlflow_cfg, experiment_id, parent_run_id
        self.sweep_name, self.base, self.metric, self.mode, self.max_epochs = sweep_name, base_config, metric, mode, max_epochs
        self._runs: dict[str, str] = {}
        self._best: dict[str, dict] = {}
        self._last_step: dict[str, int] = {}

    def _client(self):
        return tracking.client(self.cfg)

    def _run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        c = self._client()
        found = c.search_runs([self.experiment_id],
                              filter_string=f"tags.`{TRIAL_TAG}` = '{trial.trial_id}' and tags.`{SWEEP_TAG}` = '{self.sweep_name}'")
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                c.update_run(run_id, "RUNNING")  # resumed: continue the same run
            history = c.get_metric_history(run_id, self.metric)
            self._last_step[trial.trial_id] = max((m.step for m in history), default=0)
        else:
            cfg = apply_overrides(self.base, trial_overrides(trial.config))
            run_id = tracking.start_run(c, self.experiment_id, f"{self.sweep_name}/{trial.trial_id}", cfg,
                                        tags={TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name,
                                              "deeplab.kind": "trial"},
                                        parent_run_id=self.parent_run_id)
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_id(trial)
        step = int(result.get("epoch", 0))
        # A resumed trial first replays its checkpoint's epoch: log each epoch once.
        if step > self._last_step.get(trial.trial_id, 0):
            tracking.log_metrics(self._client(), run_id, {k: v for k, v in result.items() if "/" in k}, step=step)
            self._last_step[trial.trial_id] = step
        value = result.get(self.metric)
        best = self._best.get(trial.trial_id)
        if isinstance(value, (int, float)) and not math.isnan(value) and result.get("checkpoint_path") and (
                best is None or (value > best[self.metric] if self.mode == "max" else value < best[self.metric])):
            self._best[trial.trial_id] = {self.metric: value, "checkpoint_path": result["checkpoint_path"],
                                          "epoch": result.get("epoch")}

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = ran_all_epochs(trial.config, trial.last_result, self.max_epochs)
        self._finish(trial, "completed" if done else "pruned")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed", _error_reason(trial))

    def _finish(self, trial, status: str, reason: str | None = None) -> None:
        c = self._client()
        run_id = self._run_id(trial)
        best = self._best.get(trial.trial_id)
        if best is not None and Path(best["checkpoint_path"]).is_dir():
            cfg = apply_overrides(self.base, trial_overrides(trial.config))
            tracking.log_checkpoint(c, run_id, best["checkpoint_path"], cfg)
            c.log_metric(run_id, f"best/{self.metric}", float(best[self.metric]), step=int(best["epoch"] or 0))
            c.set_tag(run_id, "deeplab.best_checkpoint", best["checkpoint_path"])
        tracking.finish_run(c, run_id, status, reason)


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S")


def _error_reason(trial) -> str:
    """The innermost exception line of the trial's traceback ("pkg.mod.Error: message"): Ray
    wraps worker errors, and the user wants the worker's own exception."""
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (found[-1] if found else lines[-1] if lines else "unknown error")[:500]
