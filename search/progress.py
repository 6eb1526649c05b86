"""A compact live progress table for sweeps (Tune's own reporter prints a box per event)."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from deeplab_sweep.search import tracking
from deeplab_sweep.search.overrides import trial_epochs, trial_overrides
from deeplab_sweep.search.placement import pending_placement_groups, shape_name


class ProgressTable(Callback):
    def __init__(self, metric: str, max_epochs: int, worker: dict[str, float], workers: int):
        # No stream held: Tune pickles its callbacks with the experiment state.
        self.metric, self.max_epochs = metric, max_epochs
        self.worker, self.workers = worker, workers  # one trial's worker group, to say what it waits for
        self._header_done = False
        self._checked = 0.0
        self._said_pending: set[str] = set()

    def _row(self, trial, status: str, result: dict | None = None, note: str = "") -> None:
        if not self._header_done:
            print(f"{'time':<8} {'trial':<10} {'status':<10} {'epoch':>7} {self.metric:>10}  params", file=sys.stdout)
            self._header_done = True
        r = result or trial.last_result or {}
        value = r.get(self.metric)
        epochs = trial_epochs(trial.config, self.max_epochs)
        params = " ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in sorted(trial_overrides(trial.config).items()))
        print(
            f"{time.strftime('%H:%M:%S'):<8} {trial.trial_id:<10} {status:<10} {r.get('epoch', 0):>3}/{epochs:<3} "
            f"{f'{value:.4f}' if isinstance(value, float) else '-':>10}  {params}{note}",
            file=sys.stdout,
            flush=True,
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial, "started")

    def on_step_begin(self, iteration, trials, **info):
        """Once a second: a trial Ray cannot place yet (a one-worker trial's own actor, or a
        started trial's worker group) is said to be waiting, and for what (on an autoscaling
        cluster, nodes that are coming)."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        quiet = [
            t
            for t in trials
            if t.trial_id not in self._said_pending
            and (t.status == "PENDING" or (t.status == "RUNNING" and not t.has_reported_at_least_once))
        ]
        if not quiet:
            return
        waiting = f"  pending: waiting for {self.workers} x {shape_name(self.worker)}"
        for trial in quiet[: pending_placement_groups(self.worker)]:
            self._row(trial, "pending", note=waiting)
            self._said_pending.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._row(trial, "running", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = (trial.last_result or {}).get("epoch", 0)
        status = tracking.end_status(None, last, trial_epochs(trial.config, self.max_epochs))
        self._row(trial, "done" if status == tracking.COMPLETED else "pruned")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial, "FAILED")


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
