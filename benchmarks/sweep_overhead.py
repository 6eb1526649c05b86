"""Sweep overhead: wall time of an N-trial sweep of fixed-length trials (no early stopping)
against the trials' own training time, and each trial's start-up cost (trial start to the
end of its first epoch's training, minus that training).

    python benchmarks/sweep_overhead.py [--trials 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.sweep import run_sweep

CONF = Path(__file__).resolve().parents[1] / "conf"


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
        rows = []
        for result_file in sorted(Path(tmp, "ray", "overhead").glob("sweep_trial_*/result.json")):
            results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
            first, last = results[0], results[-1]
            train_s = sum(r["train/epoch_time_s"] for r in results)
            # time_total_s counts from the trial actor's start: the first report, less the first
            # epoch's training, is start-up (actors, process group, data) + one eval + checkpoint.
            rows.append((last["time_total_s"], train_s, first["time_total_s"] - first["train/epoch_time_s"]))
    n = len(rows)
    total_trial = sum(r[0] for r in rows)
    train = sum(r[1] for r in rows)
    print(f"{n} trials x {args.epochs} epochs (16 images/epoch, mobilenet_v2 demo config), 2 trials at a time")
    print(f"sweep wall time           {wall:7.1f} s (includes Ray start/stop, MLflow set-up, importances)")
    print(f"sum of trial lifetimes    {total_trial:7.1f} s; of which training {train:.1f} s")
    print(
        f"per-trial start-up + first eval/checkpoint: mean {sum(r[2] for r in rows) / n:.1f} s "
        f"(min {min(r[2] for r in rows):.1f}, max {max(r[2] for r in rows):.1f})"
    )
    print(f"per-trial overhead beyond training: {(total_trial - train) / n:.1f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (driver)")


if __name__ == "__main__":
    main()
