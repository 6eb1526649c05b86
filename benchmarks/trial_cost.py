"""What one trial logs about its cost, against stopwatches of the same trial: a one-trial sweep
(conf/sweep/demo_pareto.yaml's trial) on a local Ray, sqlite MLflow in a temp folder; then

- cost/cpu_hours x 3600 / CPUs held, against the trial's MLflow run (started and ended by the
  driver) and against the whole sweep timed from here (Ray start and MLflow included);
- model/latency_ms, against the best checkpoint's model timed here, in this quiet process;
- model/params and model/gflops, against the loaded model counted here;
- model/peak_mem_mb, against this process's RSS while it runs the same model.

    python benchmarks/trial_cost.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.sweep import run_sweep
from deeplab_sweep.trainable.inference import load_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="trial-cost-") as tmp:
        tmp = Path(tmp)
        job = load_job(
            CONF / "sweep" / "demo_pareto.yaml",
            [
                f"data.root={tmp / 'voc'}",
                f"storage.path={tmp / 'ray'}",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"mlflow.artifact_location={tmp / 'artifacts'}",
                f"sweep.optuna_storage=sqlite:///{tmp}/optuna.db",
                "sweep.num_samples=1",
                "sweep.name=one",
                f"train.epochs={args.epochs}",
                "sweep.budget={}",
            ],
            conf_root=CONF,
        )
        t = time.perf_counter()
        summary = run_sweep(job)
        sweep_s = time.perf_counter() - t
        c = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        run = c.get_run(summary.trials[0].run_id)
        m = run.data.metrics
        held = job.train.cpus_per_worker * job.train.num_workers
        run_s = (run.info.end_time - run.info.start_time) / 1e3
        cost_s = m["cost/cpu_hours"] * 3600 / held
        print(f"trial {summary.trials[0].trial_id}: {args.epochs} epochs, {held:g} CPU held")
        print(f"  cost/cpu_hours {m['cost/cpu_hours']:.5f} = {cost_s:.1f} s x {held:g} CPU")
        print(
            f"  stopwatch: the trial's MLflow run {run_s:.1f} s (ratio {cost_s / run_s:.2f}); "
            f"whole sweep {sweep_s:.1f} s"
        )

        local = Path(c.download_artifacts(run.info.run_id, "checkpoint", str(tmp / "best")))
        model, cfg, _ = load_model(local)
        if cfg.train.torch_threads:  # as the trial ran it
            torch.set_num_threads(cfg.train.torch_threads)
        crop = cfg.data.val_crop or cfg.data.crop_size
        x = torch.randn(1, 3, crop, crop)
        times = []
        with torch.no_grad():
            model.eval()
            for i in range(23):
                t = time.perf_counter()
                model(x)
                if i >= 3:
                    times.append(time.perf_counter() - t)
        here = statistics.median(times) * 1e3
        ratio = m["model/latency_ms"] / here
        print(
            f"  model/latency_ms {m['model/latency_ms']:.2f} in the trial vs {here:.2f} timed here (ratio {ratio:.2f})"
        )
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        params = sum(q.numel() for q in model.parameters())
        print(f"  model/params {m['model/params']:.0f} vs {params} counted here")
        print(f"  model/gflops {m['model/gflops']:.4f} vs {counter.get_total_flops() / 1e9:.4f} counted here (batch 1)")
        print(f"  model/peak_mem_mb {m['model/peak_mem_mb']:.0f} (the trial's training process)")


if __name__ == "__main__":
    main()
