"""`deeplab train`: one run of N Ray Train workers, logged to MLflow as one run by `RunWriter`."""

from __future__ import annotations

import sys
import time

from mlflow.tracking import MlflowClient
from ray.train import TrainingFailedError, UserCallback

from deeplab_sweep.errors import RunFailed
from deeplab_sweep.search import tracking
from deeplab_sweep.search.cluster import ray_session
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.prepare import prepare_job
from deeplab_sweep.search.run_writer import RunWriter
from deeplab_sweep.trainable.ray_train import build_trainer
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
    job = prepare_job(job)
    name = job.storage.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Storage(job.storage.path)
    run_dir = storage.join(name)
    c = tracking.client(job.mlflow)
    exp_id = tracking.ensure_experiment(job.mlflow)
    with ray_session(job.cluster, address, verbose):
        # Created once Ray is up: a cluster that cannot be reached leaves no dangling run.
        run_id = tracking.start_run(c, exp_id, name, job.run.to_dict(), tags={tracking.KIND_TAG: tracking.KIND_TRAIN})
        writer = RunWriter(c, run_id, metric=DEFAULT_METRIC, mode="max", storage=storage, run_dir=run_dir)
        callback = MlflowReportCallback(job.mlflow.tracking_uri, run_id, job.storage.path, run_dir)
        trainer = build_trainer(job.run, name, job.storage.path, DEFAULT_METRIC, "max", callbacks=[callback])
        try:
            result = trainer.fit()
        except TrainingFailedError as e:  # the workers' own error in one line; every stored epoch is logged
            reason = tracking.error_reason(str(e))
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
    summary = {"run_id": run_id, "storage": storage.uri(run_dir), "metrics": dict(result.metrics or {})}
    best = best_report(stored_checkpoints(storage, run_dir), DEFAULT_METRIC, "max")
    if best is not None:
        summary.update(best_checkpoint=storage.uri(best["checkpoint_path"]), best_metrics=best)
    return summary
