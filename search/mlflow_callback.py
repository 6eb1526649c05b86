"""The Tune callback (in the sweep driver) that writes one MLflow child run per trial under
the sweep's parent run, through `RunWriter`. Child runs are found again by their Ray trial id, so a resumed
sweep continues the same runs instead of duplicating them.

Tune calls its callbacks on its own event loop, which also moves every trial's results. The
writes (a ResNet-101 checkpoint is ~470 MB; a hung server costs timeouts) therefore happen on
writer threads, a trial's always on the same one and in the order Tune reported them, so each
trial's run sees its epochs, then its end; the results of a trial queued meanwhile go in one
request. MLflow being down never stops training: the writes wait in their queues and are tried
again every `retry_s`; what is still queued when the sweep ends is in Ray's results, which
`deeplab sync` (and the sweep itself, at its end) writes.
"""

from __future__ import annotations

import sys
import threading
import time
import zlib
from pathlib import Path

from ray.tune import Callback

from deeplab_sweep.search import tracking
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.objectives import TrialCost
from deeplab_sweep.search.overrides import apply_overrides, trial_epochs, trial_overrides
from deeplab_sweep.search.run_writer import RunWriter, trial_run

# Writer threads: a tracking server takes tens of milliseconds a request, and one thread writing
# every trial's run in turn fell 20-40 s behind 8 stand-in trials at once (driver_scale.py).
WRITERS = 4


class MlflowTrialCallback(Callback):
    def __init__(
        self,
        *,
        mlflow_cfg,
        experiment_id: str,
        parent_run_id: str,
        folder: SweepFolder,
        base_config: dict,
        metric: str,
        mode: str,
        max_epochs: int,
        also: tuple[str, ...] = (),
        cost: tuple[str, float] = ("cost/cpu_hours", 1.0),
        retry_s: float = 15.0,
    ):
        """`also`: further metrics logged at the best checkpoint (RunWriter); `cost`: the cost
        metric's name and the units a trial holds, logged with each result and at the end."""
        self.cfg, self.experiment_id, self.parent_run_id = mlflow_cfg, experiment_id, parent_run_id
        self.folder, self.base, self.metric, self.mode = folder, base_config, metric, mode
        self.max_epochs, self.retry_s = max_epochs, retry_s
        self.also, self.cost_metric, self.cost = also, cost[0], TrialCost(cost[1])
        self._init_runtime()
        self._fresh = True  # a sweep not resumed: a trial's first start has no run yet

    def _init_runtime(self) -> None:
        self._lanes = [_Lane() for _ in range(WRITERS)]
        self._closing = False
        self._writers: dict[str, RunWriter] = {}
        self._attempted: set[str] = set()  # trials whose run this process set out to create
        self._said = threading.Lock()
        self.outage: str | None = None  # the last MLflow error, while writes are queued
        self.drained = False  # at the experiment's end, every write queued was written

    # Tune pickles its callbacks with the experiment: the thread, its queue and the clients stay
    # behind; the cost so far travels in Tune's callback state (`get_state`).
    _LIVE = ("_lanes", "_closing", "_writers", "_attempted", "_said", "outage", "drained")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._LIVE}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()
        self._fresh = False  # restored: runs of its trials may exist

    def get_state(self) -> dict:
        return {"cost": self.cost}

    def set_state(self, state: dict) -> None:
        self.cost = state["cost"]

    # -- Tune's hooks (Tune's loop): snapshot what is needed, queue it -----------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self.cost.started(trial.trial_id)
        self._enqueue(trial.trial_id, ("start", dict(trial.config)))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.cost.ended(trial.trial_id)  # it starts again: the attempt that failed is counted

    def on_trial_result(self, iteration, trials, trial, result, **info):
        hours = self.cost.hours(trial.trial_id)
        self._enqueue(trial.trial_id, ("result", dict(trial.config), {**result, self.cost_metric: hours}))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = (trial.last_result or {}).get("epoch", 0)
        status = tracking.end_status(None, last, trial_epochs(trial.config, self.max_epochs))
        self._finish(trial, status, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, tracking.FAILED, _error_reason(trial))

    def _finish(self, trial, status: str, reason: str | None) -> None:
        self.cost.ended(trial.trial_id)
        hours = self.cost.hours(trial.trial_id)
        self._enqueue(trial.trial_id, ("finish", dict(trial.config), status, reason, {self.cost_metric: hours}))

    def on_experiment_end(self, trials, **info):
        self.drained = self.close()

    def _enqueue(self, trial_id: str, op: tuple) -> None:
        lane = self._lanes[zlib.crc32(trial_id.encode()) % len(self._lanes)]
        with lane.cv:
            lane.ops.append((trial_id, op))
            lane.cv.notify()
            if lane.thread is None:
                lane.thread = threading.Thread(target=self._drain, args=(lane,), name="mlflow-writer", daemon=True)
                lane.thread.start()

    def close(self, timeout_s: float = 600.0) -> bool:
        """Write what is queued (one more try if MLflow is down); True when nothing is left."""
        self._closing = True
        for lane in self._lanes:
            with lane.cv:
                lane.cv.notify_all()
        deadline = time.monotonic() + timeout_s
        for lane in self._lanes:
            if lane.thread is not None:
                lane.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(lane.ops for lane in self._lanes)

    # -- the writer threads --------------------------------------------------------------------

    def _drain(self, lane: _Lane) -> None:
        """Everything queued in the lane at once, trial by trial, each trial's ops in order and
        its consecutive results in one request; what is written leaves the queue."""
        while True:
            with lane.cv:
                while not lane.ops and not self._closing:
                    lane.cv.wait()
                if not lane.ops:
                    return
                batch = list(lane.ops)
            written: set[int] = set()
            try:
                for trial_id, ops in _by_trial(batch).items():
                    self._apply_all(trial_id, [op for _, op in ops])
                    written.update(id(item) for item in ops)
            except Exception as e:  # noqa: BLE001 - any client/transport error: keep it queued
                self._mark_down(e)
                with lane.cv:
                    lane.ops = [item for item in lane.ops if id(item) not in written]
                    if self._closing:
                        return  # what is left is in Ray's results: the sweep syncs it
                    lane.cv.wait(self.retry_s)
                continue
            with lane.cv:
                lane.ops = [item for item in lane.ops if id(item) not in written]
            if self.outage is not None:
                with self._said:
                    if self.outage is not None:
                        print(
                            f"MLflow answers again: the queued trial results are written ({self.outage})",
                            file=sys.stderr,
                        )
                        self.outage = None

    def _mark_down(self, e: Exception) -> None:
        with self._said:
            first = self.outage is None
            self.outage = tracking.one_line(e)
        if first:
            print(
                f"MLflow is not answering; training goes on and the results are queued "
                f"(retried every {self.retry_s:.0f} s): {self.outage}",
                file=sys.stderr,
            )

    def _apply_all(self, trial_id: str, ops: list[tuple]) -> None:
        """A trial's ops in order, its consecutive results written together."""
        results: list[dict] = []
        for op in ops:
            if op[0] == "result":
                results.append(op[2])
                continue
            if results:
                self._apply(trial_id, ("result", op[1], *results))
                results = []
            self._apply(trial_id, op)
        if results:
            self._apply(trial_id, ("result", ops[-1][1], *results))

    def _apply(self, trial_id: str, op: tuple) -> None:
        kind, config = op[0], op[1]
        writer = self._writer(trial_id, config)
        if kind == "result":
            writer.log_epochs(op[2:])
            writer.log_visuals()
        elif kind == "finish":
            # What a previous driver, killed, never wrote is in storage: reconcile first.
            writer.reconcile()
            writer.finish(op[2], op[3], self._trial_config(config), again=True, metrics=op[4])

    def _trial_config(self, config: dict) -> dict:
        return apply_overrides(self.base, trial_overrides(config))

    def _writer(self, trial_id: str, config: dict) -> RunWriter:
        if trial_id not in self._writers:
            # A retry after a failed attempt searches: that attempt may have created the run.
            new = self._fresh and trial_id not in self._attempted
            self._attempted.add(trial_id)
            c = tracking.client(self.cfg)
            run_id, created = trial_run(
                c,
                self.experiment_id,
                self.folder.name,
                trial_id,
                self.parent_run_id,
                self._trial_config(config),
                reopen=True,
                new=new,
            )
            self._writers[trial_id] = RunWriter(
                c,
                run_id,
                metric=self.metric,
                mode=self.mode,
                storage=self.folder.storage,
                run_dir=self.folder.trial_dir(trial_id),
                also=self.also,
                created=created,
            )
        return self._writers[trial_id]


class _Lane:
    """One writer thread and its queue: a trial's writes always go to the same lane, in order."""

    def __init__(self):
        self.ops: list[tuple[str, tuple]] = []
        self.cv = threading.Condition()
        self.thread: threading.Thread | None = None


def _by_trial(batch: list[tuple[str, tuple]]) -> dict[str, list[tuple[str, tuple]]]:
    grouped: dict[str, list[tuple[str, tuple]]] = {}
    for item in batch:
        grouped.setdefault(item[0], []).append(item)
    return grouped


def _error_reason(trial) -> str:
    path = getattr(trial, "error_file", None)
    return tracking.error_reason(Path(path).read_text(errors="replace") if path and Path(path).is_file() else "")
