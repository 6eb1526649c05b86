"""The one writer of a training run's MLflow run (a sweep trial, or `deeplab train`).

It writes from what the run stored, in its folder in Ray's storage, whatever happened to the
driver or the tracking server since: one JSON of metrics per evaluated epoch (`epochs/`), the
eval PNGs (`visuals/`), and the checkpoints Ray kept, each with its epoch and metrics beside it.
Each epoch goes to MLflow once, by step; each PNG once; and, when the run ends, its best
checkpoint (the best of those still stored), best metric and end status. Every method only
writes what MLflow is missing, so the live callbacks, a resumed sweep and `deeplab sync` all
reconcile through it, as often as they like.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from mlflow.entities import Metric, Run, RunTag
from mlflow.tracking import MlflowClient

from deeplab_sweep.search import tracking
from deeplab_sweep.trainable.run_folder import VISUALS_DIR, best_report, stored_checkpoints, stored_epochs
from deeplab_sweep.trainable.storage import Storage


class RunWriter:
    def __init__(
        self,
        c: MlflowClient,
        run_id: str,
        *,
        metric: str,
        mode: str,
        storage: Storage,
        run_dir: str,
        also: tuple[str, ...] = (),
        created: bool = False,
        read: Run | None = None,
    ):
        # `also`: metrics logged at the best checkpoint's epoch too (a sweep's other objectives
        # and constrained metrics: what its Pareto front is made of). `created`: the caller
        # created the run, so it holds no end status nor best checkpoint yet. `read`: the run as
        # the caller's search just returned it (its end status and tags: `finish` asks no more).
        self.c, self.run_id, self.metric, self.mode, self.also = c, run_id, metric, mode, also
        self._untouched, self._read = created, read
        self.storage, self.run_dir = storage, run_dir
        # Epochs and PNGs already in MLflow: read once, or none in a run just created.
        self._steps: set[int] | None = set() if created else None
        self._visuals: set[str] | None = set() if created else None

    def log_epochs(self, reports: Iterable[dict]) -> int:
        if self._steps is None:
            self._steps = {m.step for m in self.c.get_metric_history(self.run_id, self.metric)}
        new = {}
        for r in reports:
            step = int(r.get("epoch") or 0)
            if step and step not in self._steps:
                new.setdefault(step, r)
        # A trial's queued epochs in one request: the tracking server is what a busy sweep waits on.
        for steps, metrics in tracking.metric_batches(list(new.items()), int(time.time() * 1000)):
            tracking.log_metrics(self.c, self.run_id, metrics)
            self._steps.update(steps)
        return len(new)

    def log_visuals(self) -> int:
        folder = f"{self.run_dir}/{VISUALS_DIR}"
        stored = [f.base_name for f in self.storage.list(folder) if f.base_name.endswith(".png")]
        if not stored:  # asks MLflow nothing (a run with `train.visuals: 0`)
            return 0
        if self._visuals is None:
            self._visuals = {a.path for a in self.c.list_artifacts(self.run_id, VISUALS_DIR)}
        new = [name for name in stored if f"{VISUALS_DIR}/{name}" not in self._visuals]
        if new:
            with self.storage.local_copy(folder) as local:
                for name in new:
                    self.c.log_artifact(self.run_id, str(local / name), artifact_path=VISUALS_DIR)
                    self._visuals.add(f"{VISUALS_DIR}/{name}")
        return len(new)

    def reconcile(self) -> int:
        """Every stored epoch and PNG that MLflow is missing; returns the epochs written. (A
        checkpoint's own metrics count too: a worker stopped right after saving it wrote no
        epoch file.)"""
        stored = {e["epoch"]: e for e in stored_checkpoints(self.storage, self.run_dir)}
        stored.update({e["epoch"]: e for e in stored_epochs(self.storage, self.run_dir)})
        logged = self.log_epochs(sorted(stored.values(), key=lambda e: e["epoch"]))
        self.log_visuals()
        return logged

    def finish(self, status: str, reason: str | None, cfg: dict, again: bool, metrics: dict | None = None) -> bool:
        """Best checkpoint + config, best metric and end status (with `metrics`, e.g. the
        trial's cost, in the same request). A run that has an end status already is left as it
        is, unless `again` (its trial just ended once more, after a resume); it is only closed
        if a resume reopened it. Returns whether it wrote the end."""
        run = None if self._untouched else (self._read or self.c.get_run(self.run_id))
        self._untouched, self._read = False, None
        tags_now = run.data.tags if run is not None else {}
        ended = tags_now.get(tracking.STATUS_TAG)
        if ended and not again:
            if run.info.status == "RUNNING":
                self.c.set_terminated(self.run_id, "FAILED" if ended.startswith(tracking.FAILED) else "FINISHED")
            return False
        now = int(time.time() * 1000)
        values = [Metric(name, float(v), now, 0) for name, v in (metrics or {}).items()]
        tags = {tracking.STATUS_TAG: tracking.status_text(status, reason)}
        best = best_report(stored_checkpoints(self.storage, self.run_dir), self.metric, self.mode)
        uri = self.storage.uri(best["checkpoint_path"]) if best else None
        if best is not None and tags_now.get(tracking.BEST_CHECKPOINT_TAG) != uri:
            with self.storage.local_copy(best["checkpoint_path"]) as folder:
                tracking.log_checkpoint(self.c, self.run_id, folder, cfg)
            for name in (self.metric, *self.also):
                if isinstance(best.get(name), (int, float)):
                    values.append(Metric(tracking.best_metric(name), float(best[name]), now, best["epoch"]))
            tags[tracking.BEST_CHECKPOINT_TAG] = uri
        self.c.log_batch(self.run_id, metrics=values, tags=[RunTag(k, v) for k, v in tags.items()])
        self.c.set_terminated(self.run_id, tracking.mlflow_status(status))
        return True


def trial_run(
    c: MlflowClient,
    experiment_id: str,
    sweep: str,
    trial_id: str,
    parent_run_id: str,
    cfg: dict,
    reopen: bool,
    new: bool = False,
) -> tuple[str, bool]:
    """The trial's child run, found by its trial id (reopened if `reopen`: a resumed trial goes
    on in it) or created now; and whether it was created. `new`: the caller knows there is none
    (a trial started for the first time in a sweep not resumed): created without a search."""
    found = (
        []
        if new
        else c.search_runs(
            [experiment_id],
            filter_string=f"tags.`{tracking.TRIAL_TAG}` = '{trial_id}' and "
            f"{tracking.sweep_filter(sweep, tracking.KIND_TRIAL)}",
        )
    )
    if found:
        run_id = found[0].info.run_id
        if reopen and found[0].info.status != "RUNNING":
            c.update_run(run_id, "RUNNING")
        return run_id, False
    tags = {tracking.TRIAL_TAG: trial_id, tracking.SWEEP_TAG: sweep, tracking.KIND_TAG: tracking.KIND_TRIAL}
    return tracking.start_run(
        c, experiment_id, f"{sweep}/{trial_id}", cfg, tags=tags, parent_run_id=parent_run_id
    ), True
