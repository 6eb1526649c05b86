"""`deeplab train`: one run of N Ray Train workers, logged to MLflow as one run."""
from __future__ import annotations

import time
from pathlib import Path

from ray.train import TrainingFailedError

from search import tracking
from search.cluster import ray_session
from search.configs import JobConfig, RunFailed
from search.mlflow_callback import error_reason
from search.prepare import prepare_job
from trainable.ray_train import build_trainer, run_visuals

METRIC = "val/mIoU"


def run_training(job: JobConfig, address: str | None = None, verbose: bool = False) -> dict:
    job = prepare_job(job)
    run_cfg = job.run
    name = job.storage.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    ml = job.mlflow
    c = tracking.client(ml)
    exp_id = tracking.ensure_experiment(ml)
    with ray_session(job.cluster, address, verbose):
        # Created once Ray is up: a cluster that cannot be reached leaves no dangling run.
        run_id = tracking.start_run(c, exp_id, name, run_cfg.to_dict(), tags={"deeplab.kind": "train"})
        trainer = build_trainer(run_cfg, name, job.storage.path,
                                callbacks=[tracking.MlflowReportCallback(
                                    ml.tracking_uri, run_id, str(run_visuals(job.storage.path, name)))],
                                metric=METRIC)
        try:
            result = trainer.fit()
        except TrainingFailedError as e:  # the workers' own error, in one line: the run is marked, nothing logged is lost
            reason = error_reason(str(e))
            tracking.finish_run(c, run_id, "failed", reason)
            raise RunFailed(f"training failed: {reason} (MLflow run {run_id}, Ray storage "
                            f"{Path(job.storage.path) / name})") from None
        except BaseException as e:  # interrupted: the run is marked, nothing logged is lost
            tracking.finish_run(c, run_id, "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
    best = max(result.best_checkpoints, key=lambda cm: cm[1].get(METRIC, float("-inf")), default=None)
    summary = {"run_id": run_id, "storage": str(Path(job.storage.path) / name), "metrics": dict(result.metrics or {})}
    if best is not None:
        ckpt, metrics = best
        with ckpt.as_directory() as d:
            tracking.log_checkpoint(c, run_id, d, run_cfg.to_dict())
        summary.update(best_checkpoint=ckpt.path, best_metrics=metrics)
        c.log_metric(run_id, f"best/{METRIC}", float(metrics.get(METRIC, float("nan"))))
    tracking.finish_run(c, run_id, "completed")
    return summary
