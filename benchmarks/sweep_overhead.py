"""Sweep overhead: wall time of an N-trial sweep of fixed-length trials (no early stopping)
against the trials' own training time, and each trial's start-up cost (trial start to the
end of its first epoch's training, minus that training).

    python benchmarks/sweep_overhead.py [--trials 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.sweep import run_sweep

CONF = Path(__file__).resolve().parents[1] / "conf"


def trial_times(tracking_uri: str, experiment: str) -> list[tuple[float, float, float]]:
    """(lifetime, training, start-up) of each trial, from the driver's clock as MLflow holds it:
    a trial's run starts when Tune starts the trial and ends when it ends; its first epoch's
    metrics are logged when Tune receives them. Start-up is that first arrival less the first
    epoch's training: actors, process group, data, and one eval + checkpoint. Independent of
    Tune's own `time_total_s`, which starts once the trial's actor is up."""
    from mlflow.tracking import MlflowClient

    from deeplab_sweep.search import tracking

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    rows = []
    for run in c.search_runs([exp.experiment_id], f"tags.{tracking.KIND_TAG} = '{tracking.KIND_TRIAL}'"):
        first = min(c.get_metric_history(run.info.run_id, "val/mIoU"), key=lambda m: m.step)
        train_hist = c.get_metric_history(run.info.run_id, "train/epoch_time_s")
        first_train = next(m.value for m in train_hist if m.step == first.step)
        life = (run.info.end_time - run.info.start_time) / 1000
        rows.append(
            (life, sum(m.value for m in train_hist), (first.timestamp - run.info.start_time) / 1000 - first_train)
        )
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(
            CONF / "sweep" / "demo.yaml",
            [
                f"data.root={tmp}/voc",
                f"storage.path={tmp}/ray",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"mlflow.artifact_location={tmp}/art",
                f"sweep.num_samples={args.trials}",
                f"train.epochs={args.epochs}",
                "sweep.asha.enabled=false",
                "sweep.name=overhead",
                "data.max_train_images=16",
                "data.max_val_images=4",
            ],
        )
        start = time.perf_counter()
        run_sweep(job)
        wall = time.perf_counter() - start
        rows = trial_times(job.mlflow.tracking_uri, job.mlflow.experiment)
    n = len(rows)
    total_trial = sum(r[0] for r in rows)
    train = sum(r[1] for r in rows)
    print(f"{n} trials x {args.epochs} epochs (16 images/epoch, mobilenet_v2 demo config), 2 trials at a time")
    print(f"sweep wall time           {wall:7.1f} s (includes Ray start/stop, MLflow set-up, importances)")
    print(
        f"sum of trial lifetimes    {total_trial:7.1f} s; of which training {train:.1f} s ({train / total_trial:.0%})"
    )
    print(
        f"per-trial start-up + first eval/checkpoint: mean {sum(r[2] for r in rows) / n:.1f} s "
        f"(min {min(r[2] for r in rows):.1f}, max {max(r[2] for r in rows):.1f})"
    )
    print(f"per-trial overhead beyond training: {(total_trial - train) / n:.1f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (driver)")


if __name__ == "__main__":
    main()
