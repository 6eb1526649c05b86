"""`deeplab train`: one run (in this process, or N Ray Train workers), logged to MLflow as one run
by `RunWriter`."""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

from mlflow.tracking import MlflowClient
from ray.train import TrainingFailedError, UserCallback

from deeplab_sweep.errors import RunFailed
from deeplab_sweep.search import tracking
from deeplab_sweep.search.cluster import RaySession, cluster_address
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.prepare import prepare_job
from deeplab_sweep.search.run_writer import RunWriter
from deeplab_sweep.trainable.ray_train import build_in_process_trainer, build_trainer, runs_in_process
from deeplab_sweep.trainable.run_config import DEFAULT_METRIC
from deeplab_sweep.trainable.run_folder import best_report, stored_checkpoints
from deeplab_sweep.trainable.storage import Storage


class MlflowReportCallback(UserCallback):
    """Ray Train controller callback: rank 0's metrics of each report into the run. MLflow down
    does not stop training: the run's folder in storage keeps every epoch, and the next report
    that reaches MLflow (or the end of the run) writes what it is missing."""

    def __init__(self, tracking_uri: str, run_id: str, storage_uri: str, run_dir: str):
        self.tracking_uri, self.run_id, self.storage_uri, self.run_dir = tracking_uri, run_id, storage_uri, run_dir
        self._writer: RunWriter | None = None
        self._down = False

    def after_report(self, run_context, metrics, checkpoint):
        try:
            if self._writer is None:
                storage = Storage(self.storage_uri)
                self._writer = RunWriter(
                    MlflowClient(self.tracking_uri),
                    self.run_id,
                    metric=DEFAULT_METRIC,
                    mode="max",
                    storage=storage,
                    run_dir=self.run_dir,
                )
            if self._down:  # back: everything stored since it went down
                self._writer.reconcile()
            else:
                self._writer.log_epochs([metrics[0]])
                self._writer.log_visuals()
        except Exception as e:  # noqa: BLE001 - any client/transport error: storage keeps the epochs
            if not self._down:
                print(f"MLflow is not answering; training goes on: {tracking.one_line(e)}", file=sys.stderr)
            self._down = True
            return
        self._down = False


def run_training(job: JobConfig, address: str | None = None, verbose: bool = False) -> dict:
    """One run, one MLflow run. One worker with no cluster to join trains in this process (Ray
    Train's local mode, the same `TorchTrainer` and worker a one-worker sweep trial uses; no Ray
    is started), retried from its last stored checkpoint up to `train.max_failures` times. More
    workers, or a cluster named (`--address`, `cluster.address`, `RAY_ADDRESS`: the run belongs
    on its nodes, e.g. the GPU one), are a Ray Train worker group, which Ray Train retries."""
    joined = cluster_address(job.cluster, address)  # unreachable: one line, before anything is made
    job = prepare_job(job)
    name = job.storage.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Storage(job.storage.path)
    run_dir = storage.join(name)
    c = tracking.client(job.mlflow)
    exp_id = tracking.ensure_experiment(job.mlflow)
    in_process = runs_in_process(job.train.num_workers) and joined is None
    with contextlib.nullcontext() if in_process else RaySession(job.cluster, joined, verbose):
        # Created once Ray is up: a cluster that cannot be reached leaves no dangling run.
        run_id = tracking.start_run(c, exp_id, name, job.run.to_dict(), tags={tracking.KIND_TAG: tracking.KIND_TRAIN})
        writer = RunWriter(c, run_id, metric=DEFAULT_METRIC, mode="max", storage=storage, run_dir=run_dir)
        callback = MlflowReportCallback(job.mlflow.tracking_uri, run_id, job.storage.path, run_dir)
        try:
            if in_process:
                last = _fit_in_process(job, storage.uri(run_dir), callback)
            else:
                trainer = build_trainer(job.run, name, job.storage.path, DEFAULT_METRIC, "max", callbacks=[callback])
                last = dict(trainer.fit().metrics or {})
        except (TrainingFailedError, _Failed) as e:  # its own error in one line; every stored epoch is logged
            reason = e.reason if isinstance(e, _Failed) else tracking.error_reason(str(e))
            writer.reconcile()
            writer.finish(tracking.FAILED, reason, job.run.to_dict(), again=True)
            raise RunFailed(
                f"training failed: {reason} (MLflow run {run_id}, Ray storage {storage.uri(run_dir)})"
            ) from None
        except BaseException as e:  # interrupted: the run is marked, nothing logged is lost
            tracking.finish_run(
                c, run_id, tracking.FAILED, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            raise
    writer.reconcile()  # what MLflow missed while it was down, up to the last epoch
    writer.finish(tracking.COMPLETED, None, job.run.to_dict(), again=True)
    summary = {"run_id": run_id, "storage": storage.uri(run_dir), "metrics": last}
    best = best_report(stored_checkpoints(storage, run_dir), DEFAULT_METRIC, "max")
    if best is not None:
        summary.update(best_checkpoint=storage.uri(best["checkpoint_path"]), best_metrics=best)
    return summary


class _Failed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _fit_in_process(job: JobConfig, run_uri: str, callback: MlflowReportCallback) -> dict:
    """Train in this process; a failed attempt is tried again from the run's last stored
    checkpoint (what Ray Train does for a worker group), at most train.max_failures times.
    Returns the last report."""
    reports: list[dict] = []

    def on_report(metrics: dict) -> None:
        reports.append(metrics)
        callback.after_report(None, [metrics], None)

    failures = 0
    while True:
        try:
            build_in_process_trainer(job.run, run_uri, DEFAULT_METRIC, "max", on_report=on_report).fit()
            return reports[-1] if reports else {}
        except Exception as e:  # noqa: BLE001 - the training's own error, as a worker group reports it
            reason = traceback.format_exception_only(e)[-1].strip()
            if failures >= job.train.max_failures >= 0:
                raise _Failed(reason) from None
            failures += 1
            print(f"training failed ({reason}); attempt {failures + 1}, from the last checkpoint", file=sys.stderr)
