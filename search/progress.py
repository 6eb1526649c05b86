"""The sweep's console (Tune's own reporter prints a box per event): a line per trial event,
or, with many trials at once, one status line at most every few seconds, every event then in
the sweep's events.log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from ray.tune import Callback

from deeplab_sweep.search import tracking
from deeplab_sweep.search.overrides import trial_epochs, trial_overrides
from deeplab_sweep.search.placement import pending_placement_groups, shape_name
from deeplab_sweep.trainable.run_folder import better


@dataclass(frozen=True)
class StatusLines:
    """One status line at most every `every_s`; every event in `events_log` (a local file)."""

    every_s: float
    events_log: str
    budget_epochs: int | None = None
    budget_wall_s: float | None = None


class ProgressTable(Callback):
    def __init__(
        self,
        metric: str,
        mode: str,
        max_epochs: int,
        worker: dict[str, float],
        workers: int,
        status: StatusLines | None = None,
    ):
        # No stream held: Tune pickles its callbacks with the experiment state.
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.worker, self.workers = worker, workers  # one trial's worker group, to say what it waits for
        self.status = status
        self._header_done = False
        self._checked = 0.0
        self._said_pending: set[str] = set()
        self._ended = {"done": 0, "stopped early": 0, "failed": 0}
        self._best: float | None = None
        self._started_at: float | None = None
        self._said_at = 0.0

    def _row(self, trial, status: str, result: dict | None = None, note: str = "") -> None:
        if not self._header_done:
            self._emit(f"{'time':<8} {'trial':<10} {'status':<10} {'epoch':>7} {self.metric:>10}  params")
            self._header_done = True
        r = result or trial.last_result or {}
        value = r.get(self.metric)
        epochs = trial_epochs(trial.config, self.max_epochs)
        params = " ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in sorted(trial_overrides(trial.config).items()))
        self._emit(
            f"{time.strftime('%H:%M:%S'):<8} {trial.trial_id:<10} {status:<10} {r.get('epoch', 0):>3}/{epochs:<3} "
            f"{f'{value:.4f}' if isinstance(value, float) else '-':>10}  {params}{note}"
        )

    def _emit(self, line: str) -> None:
        if self.status is None:
            print(line, file=sys.stdout, flush=True)
            return
        with open(self.status.events_log, "a") as log:
            log.write(line + "\n")

    def on_trial_start(self, iteration, trials, trial, **info):
        if self._started_at is None:
            self._started_at = time.monotonic()
        self._row(trial, "started")

    def on_step_end(self, iteration, trials, **info):
        if self.status is not None and time.monotonic() - self._said_at >= self.status.every_s:
            self._say_status(trials)

    def on_experiment_end(self, trials, **info):
        if self.status is not None:
            self._say_status(trials)

    def _say_status(self, trials) -> None:
        """trials 64 running, 2 pending, 120 done, 700 stopped early, 0 failed | best val/mIoU
        0.9613 | epochs 4,120 / 12,000, about 6 min left"""
        self._said_at = now = time.monotonic()
        st = self.status
        running = sum(t.status == "RUNNING" for t in trials)
        pending = sum(t.status == "PENDING" for t in trials)
        counts = ", ".join(f"{n} {what}" for what, n in self._ended.items())
        best = f"best {self.metric} {self._best:.4f}" if self._best is not None else f"no {self.metric} yet"
        spent = sum((t.last_result or {}).get("epoch", 0) for t in trials)
        epochs = f"epochs {spent:,}" + (f" / {st.budget_epochs:,}" if st.budget_epochs else "")
        elapsed = now - (self._started_at or now)
        left = None
        if st.budget_epochs and spent:
            left = (st.budget_epochs - spent) * elapsed / spent
        elif st.budget_wall_s:
            left = st.budget_wall_s - elapsed
        when = f", about {_duration(left)} left" if left is not None and left > 0 else ""
        print(
            f"{time.strftime('%H:%M:%S')} trials {running} running, {pending} pending, {counts} | {best} | "
            f"{epochs}{when}",
            file=sys.stdout,
            flush=True,
        )

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
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and better(value, self._best, self.mode):
            self._best = value
        self._row(trial, "running", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = (trial.last_result or {}).get("epoch", 0)
        status = tracking.end_status(None, last, trial_epochs(trial.config, self.max_epochs))
        done = status == tracking.COMPLETED
        self._ended["done" if done else "stopped early"] += 1
        self._row(trial, "done" if done else "pruned")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended["failed"] += 1
        self._row(trial, "FAILED")


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
