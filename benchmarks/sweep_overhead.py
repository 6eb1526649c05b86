"""Sweep overhead: wall time of an N-trial sweep of fixed-length trials (no early stopping)
against the trials' own training time, and each trial's start-up cost (trial start to the
end of its first epoch's training, minus that training). With --launch: the fixed cost of the
`deeplab sweep` command itself, a one-trial one-epoch demo sweep run as a user runs it (a new
process): launch to the trial's start and to its first step, the end of its training to the
process's exit, and the driver's own steps (`--verbose` timings); each launch followed by
`launch_floor.py`'s floor (bare Tune with the same driver imports), in the same run.

    python benchmarks/sweep_overhead.py [--trials 4] [--epochs 3] [key=value ...]
    python benchmarks/sweep_overhead.py --launch [--repeat 2]
    python benchmarks/sweep_overhead.py --train [--repeat 2]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import launch_floor  # beside this script, which runs as one

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.sweep import run_sweep

CONF = Path(__file__).resolve().parents[1] / "conf"
FLOOR_ARM = "+ torch, torchvision, MLflow, Optuna in the driver"


def trial_times(tracking_uri: str, experiment: str) -> list[dict]:
    """Where each trial's lifetime went, from the driver's clock as MLflow holds it: a trial's
    run starts when Tune starts the trial and ends when it ends; an epoch's metrics are logged
    when Tune receives them. Start-up is the first arrival less the first epoch's training
    (actors, process group, data, one eval + checkpoint); each later epoch's gap less its
    training is its eval + checkpoint + report; the tail is the last arrival to the run's end.
    Independent of Tune's own `time_total_s`, which starts once the trial's actor is up."""
    from mlflow.tracking import MlflowClient

    from deeplab_sweep.search import tracking

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    rows = []
    for run in c.search_runs([exp.experiment_id], f"tags.{tracking.KIND_TAG} = '{tracking.KIND_TRIAL}'"):
        arrivals = sorted((m.step, m.timestamp / 1000) for m in c.get_metric_history(run.info.run_id, "val/mIoU"))
        train = dict((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "train/epoch_time_s"))
        evaluation = dict((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "val/time_s"))
        start, end = run.info.start_time / 1000, run.info.end_time / 1000
        gaps = [t - prev_t - train[step] for (_, prev_t), (step, t) in zip(arrivals, arrivals[1:], strict=False)]
        rows.append(
            {
                "life": end - start,
                "train": sum(train.values()),
                "eval": sum(evaluation.values()),
                "start_up": arrivals[0][1] - start - train[arrivals[0][0]],
                "first_eval": evaluation[arrivals[0][0]],
                "per_epoch": sum(gaps) / len(gaps) if gaps else 0.0,
                "tail": end - arrivals[-1][1],
            }
        )
    return rows


def launch(repeat: int, overrides: list[str]) -> None:
    """`deeplab sweep` as a new process: when each line of its output arrived."""
    import json
    import subprocess
    import sys

    deeplab = str(Path(sys.executable).with_name("deeplab"))
    for i in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                deeplab,
                "sweep",
                str(CONF / "sweep" / "demo.yaml"),
                f"data.root={tmp}/voc",
                f"storage.path={tmp}/ray",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"mlflow.artifact_location={tmp}/art",
                "sweep.num_samples=1",
                "train.epochs=1",
                "sweep.asha.enabled=false",
                "--verbose",
                *overrides,
            ]
            # The data is generated before the clock starts: a user's data is there already.
            subprocess.run([deeplab, "data", "synth", "voc", "--out", f"{tmp}/voc"], check=True, capture_output=True)
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
            proc.wait()
            end = time.perf_counter() - start
            # The floor in the same run, right after: bare Tune with the driver's imports.
            floor = launch_floor.measure(launch_floor.ARMS[FLOOR_ARM])["first step"]
            at = lambda word, lines=lines: next(t for t, ln in lines if f" {word} " in ln and ln[:2].isdigit())  # noqa: E731
            marks = {ln.split("timing: ", 1)[1] for _, ln in lines if ln.startswith("timing: ")}
            run = next(r for r in _client(tmp).search_runs(["1"]) if r.data.tags.get("deeplab.kind") == "trial")
            m = run.data.metrics
            # Back from the first report to the end of the first step: the epoch's training after
            # that step, its evaluation, then the model's profile and checkpoint (not timed here).
            to_first_step = at("running") - (m["train/epoch_time_s"] - m["train/first_step_s"]) - m["val/time_s"]
            print(
                json.dumps(
                    {
                        "run": i,
                        "launch_to_started_s": round(at("started"), 2),
                        "launch_to_first_step_s_at_most": round(to_first_step, 2),
                        "floor_first_step_s": round(floor, 2),
                        "above_floor_s_at_most": round(to_first_step - floor, 2),
                        "done_to_exit_s": round(end - at("done"), 2),
                        "wall_s": round(end, 2),
                        "driver_steps": sorted(marks, key=lambda x: float(x.rsplit(" at ", 1)[1].split()[0])),
                    }
                ),
                flush=True,
            )


def launch_train(repeat: int, overrides: list[str]) -> None:
    """One-worker `deeplab train` (in this process, no Ray) as a new process, one epoch: launch to
    its MLflow run's start, to the end of the first training step at most (the exit less what
    follows that step: the epoch's other steps and its evaluation; the checkpoint and the run's
    end are not subtracted), and to exit."""
    import json
    import subprocess
    import sys

    deeplab = str(Path(sys.executable).with_name("deeplab"))
    for i in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([deeplab, "data", "synth", "voc", "--out", f"{tmp}/voc"], check=True, capture_output=True)
            cmd = [deeplab, "train", str(CONF / "train" / "demo.yaml"), "train.epochs=1", f"data.root={tmp}/voc"]
            cmd += [f"storage.path={tmp}/ray", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", *overrides]
            launched, start = time.time(), time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - start
            run = _client(tmp).search_runs(["1"])[0]
            m = run.data.metrics
            after_first_step = m["train/epoch_time_s"] - m["train/first_step_s"] + m["val/time_s"]
            print(
                json.dumps(
                    {
                        "run": i,
                        "launch_to_mlflow_run_s": round(run.info.start_time / 1000 - launched, 2),
                        "launch_to_first_step_s_at_most": round(wall - after_first_step, 2),
                        "epoch_s": round(m["train/epoch_time_s"], 2),
                        "val_s": round(m["val/time_s"], 2),
                        "wall_s": round(wall, 2),
                    }
                ),
                flush=True,
            )


def _client(tmp: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--launch", action="store_true", help="the command's fixed cost: a one-epoch trial, a new process")
    p.add_argument(
        "--train", action="store_true", help="one-worker `deeplab train`'s fixed cost: one epoch, a new process"
    )
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="further key=value overrides, e.g. train.visuals=0")
    args = p.parse_args()
    if args.launch:
        launch(args.repeat, args.overrides)
        return
    if args.train:
        launch_train(args.repeat, args.overrides)
        return
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
                "sweep.budget.epochs=null",  # every trial in full: the demo's budget would cut the 12-epoch sweep
                "sweep.hand_over.at=null",
                "sweep.name=overhead",
                "data.max_train_images=16",
                "data.max_val_images=4",
                *args.overrides,
            ],
        )
        start = time.perf_counter()
        run_sweep(job)
        wall = time.perf_counter() - start
        rows = trial_times(job.mlflow.tracking_uri, job.mlflow.experiment)
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    total_trial, train, evaluation = mean("life") * n, mean("train") * n, mean("eval") * n
    t = job.train
    print(
        f"{n} trials x {args.epochs} epochs of 16 images, the demo sweep's space, "
        f"{t.num_workers} worker(s) of {t.cpus_per_worker:g} CPU per trial on a 2-CPU local Ray"
    )
    print(f"sweep wall time           {wall:7.1f} s (includes Ray start/stop, MLflow set-up, importances)")
    print(
        f"sum of trial lifetimes    {total_trial:7.1f} s; of which training {train:.1f} s ({train / total_trial:.0%}), "
        f"evaluation {evaluation:.1f} s ({evaluation / total_trial:.0%})"
    )
    print(
        f"per-trial start-up + first eval/checkpoint: mean {mean('start_up'):.1f} s "
        f"(min {min(r['start_up'] for r in rows):.1f}, max {max(r['start_up'] for r in rows):.1f})"
    )
    print(f"  of which the first evaluation: mean {mean('first_eval'):.1f} s")
    print(f"each later epoch's eval + checkpoint + report: mean {mean('per_epoch'):.1f} s")
    print(f"last report to the trial's end (best checkpoint to MLflow): mean {mean('tail'):.1f} s")
    print(f"per-trial overhead beyond training: {(total_trial - train) / n:.1f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (driver)")


if __name__ == "__main__":
    main()
