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
from deeplab_sweep.search.mlflow_callback import error_reason
from deeplab_sweep.search.prepare import prepare_job
from deeplab_sweep.search.run_writer import RunWriter, best_report
from deeplab_sweep.search.storage import Storage
from deeplab_sweep.trainable.engine import VISUALS_DIR
from deeplab_sweep.trainable.ray_train import build_trainer
from deeplab_sweep.trainable.run_config import DEFAULT_METRIC


class MlflowReportCallback(UserCallback):
    """Ray Train controller callback: rank 0's metrics of each report into the run. MLflow down
    does not stop training: reports wait and are written at the next report that reaches it
    (what is still waiting when the run ends is only in Ray's checkpoints)."""

    def __init__(self, tracking_uri: str, run_id: str, storage_uri: str, visuals_dir: str):
        self.tracking_uri, self.run_id, self.storage_uri, self.visuals_dir = (
            tracking_uri,
            run_id,
            storage_uri,
            visuals_dir,
        )
        self._writer: RunWriter | None = None
        self._pending: list[dict] = []
        self._down = False

    def after_report(self, run_context, metrics, checkpoint):
        self._pending.append(dict(metrics[0]))
        try:
            if self._writer is None:
                self._writer = RunWriter(
                    MlflowClient(self.tracking_uri),
                    self.run_id,
                    DEFAULT_METRIC,
                    "max",
                    Storage(self.storage_uri),
                    self.visuals_dir,
                )
            self._writer.log_epochs(self._pending)
            self._writer.log_visuals()
        except Exception as e:  # noqa: BLE001 - any client/transport error: keep them waiting
            if not self._down:
                print(
                    f"MLflow is not answering; training goes on and the metrics are queued: {tracking.one_line(e)}",
                    file=sys.stderr,
                )
            self._down = True
            return
        self._pending.clear()
        self._down = False


def run_training(job: JobConfig, address: str | None = None, verbose: bool = False) -> dict:
    job = prepare_job(job)
    run_cfg = job.run
    name = job.storage.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Storage(job.storage.path)
    ml = job.mlflow
    c = tracking.client(ml)
    exp_id = tracking.ensure_experiment(ml)
    with ray_session(job.cluster, address, verbose):
        # Created once Ray is up: a cluster that cannot be reached leaves no dangling run.
        run_id = tracking.start_run(c, exp_id, name, run_cfg.to_dict(), tags={tracking.KIND_TAG: tracking.KIND_TRAIN})
        visuals = storage.join(name, VISUALS_DIR)
        trainer = build_trainer(
            run_cfg,
            name,
            job.storage.path,
            metric=DEFAULT_METRIC,
            mode="max",
            callbacks=[MlflowReportCallback(ml.tracking_uri, run_id, job.storage.path, visuals)],
        )
        try:
            result = trainer.fit()
        except (
            TrainingFailedError
        ) as e:  # the workers' own error, in one line: the run is marked, nothing logged is lost
            reason = error_reason(str(e))
            tracking.finish_run(c, run_id, tracking.FAILED, reason)
            raise RunFailed(
                f"training failed: {reason} (MLflow run {run_id}, Ray storage {storage.uri(storage.join(name))})"
            ) from None
        except BaseException as e:  # interrupted: the run is marked, nothing logged is lost
            tracking.finish_run(
                c, run_id, tracking.FAILED, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            raise
    # Ray's checkpoint manager holds the kept checkpoints with their metrics: the best is among them.
    kept = [{**metrics, "checkpoint_path": ckpt.path} for ckpt, metrics in result.best_checkpoints]
    writer = RunWriter(c, run_id, DEFAULT_METRIC, "max", storage, visuals)
    writer.finish(tracking.COMPLETED, None, kept, run_cfg.to_dict(), again=True)
    summary = {"run_id": run_id, "storage": storage.uri(storage.join(name)), "metrics": dict(result.metrics or {})}
    best = best_report(kept, DEFAULT_METRIC, "max", storage)
    if best is not None:
        summary.update(
            best_checkpoint=storage.uri(best["checkpoint_path"]),
            best_metrics=next(m for m in kept if m["checkpoint_path"] == best["checkpoint_path"]),
        )
    return summary
