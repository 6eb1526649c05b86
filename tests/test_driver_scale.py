"""The sweep's driver under many trials at once (benchmarks/driver_scale.py, smaller): stand-in
trials that train nothing report a learning-curve table's rows through the real sweep path, to a
real `mlflow server`; every epoch arrives in MLflow once, soon, and Tune never warns that the
driver's own work was slow."""

from __future__ import annotations

import re
import sqlite3

import pytest
from mlflow import MlflowClient

from deeplab_sweep.search import tracking
from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.run_writer import RunWriter
from deeplab_sweep.search.standin import REPORTED_AT, StandIn
from deeplab_sweep.search.sweep import run_sweep
from deeplab_sweep.trainable.run_folder import stored_epochs
from deeplab_sweep.trainable.storage import Storage
from tests.conftest import CONF, DEMO_TABLE, DEMO_TABLE_SPACE

TRIALS, AT_ONCE = 100, 16
MAX_LAG_S = 30  # from a trial's report to its metric in MLflow, on a 2-core machine running both chains
SLOW_TUNE = re.compile(r"The `\w+` operation took|Processing trial results took")


@pytest.mark.slow
def test_many_stand_in_trials_reach_mlflow_once_and_soon(ray_cluster, synth_voc_root, mlflow_server, tmp_path, capfd):
    job = load_job(
        CONF / "sweep" / "demo.yaml",
        [
            f"data.root={synth_voc_root}",
            "train.epochs=12",
            # 16 stand-ins (asleep most of the time) on the session cluster's 2 CPUs.
            f"train.cpus_per_worker={2 / AT_ONCE}",
            f"sweep.num_samples={TRIALS}",
            f"sweep.max_concurrent={AT_ONCE}",
            "sweep.name=standins",
            "sweep.budget.epochs=null",  # every trial runs: the demo's budget would end the sweep first
            "sweep.hand_over.at=null",
            f"storage.path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri={mlflow_server.url}",
            "mlflow.system_metrics_interval_s=null",
            *(f"space.{k}={v}" for k, v in DEMO_TABLE_SPACE.items()),
        ],
    )
    summary = run_sweep(job, standin=StandIn(str(DEMO_TABLE), tuple(DEMO_TABLE_SPACE), epoch_s=0.05))
    out, err = capfd.readouterr()
    assert len(summary.trials) == TRIALS and not [t for t in summary.trials if t.error]

    c = MlflowClient(mlflow_server.url)
    exp = c.get_experiment_by_name("deeplab").experiment_id
    runs = tracking.all_runs(c, [exp], tracking.sweep_filter("standins", tracking.KIND_TRIAL))
    assert len(runs) == TRIALS
    folder = SweepFolder(str(tmp_path / "ray" / "standins"))
    lags = []
    for run in runs:
        stored = [
            e["epoch"] for e in stored_epochs(folder.storage, folder.trial_dir(run.data.tags[tracking.TRIAL_TAG]))
        ]
        history = c.get_metric_history(run.info.run_id, REPORTED_AT)
        assert sorted(m.step for m in history) == sorted(stored) == list(range(1, len(stored) + 1))
        lags += [m.timestamp / 1000 - m.value for m in history]
    assert max(lags) < MAX_LAG_S, sorted(lags)[-5:]
    # Tune's result files, but not its TensorBoard files (an fsync per result on Tune's loop).
    trial_dirs = list((tmp_path / "ray" / "standins").glob("standin_trial_*"))
    assert len(trial_dirs) == TRIALS
    assert all((d / "result.json").is_file() and (d / "progress.csv").is_file() for d in trial_dirs)
    assert not list((tmp_path / "ray" / "standins").glob("*/events.out.tfevents*"))
    assert not SLOW_TUNE.search(out + err), SLOW_TUNE.search(out + err)
    assert "View run" not in out  # MLflow's client prints two lines per ended run unless told not to

    # The study's sqlite commits on Tune's loop go without an fsync each (WAL, synchronous=NORMAL).
    with sqlite3.connect(tmp_path / "ray" / "optuna.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    # The console: status lines, not a line per event; every event in the sweep's events.log.
    events = (tmp_path / "ray" / "standins" / "events.log").read_text().splitlines()
    kinds = [line.split()[2] for line in events[1:]]
    reports = sum(len(c.get_metric_history(r.info.run_id, REPORTED_AT)) for r in runs)
    assert (kinds.count("started"), kinds.count("running")) == (TRIALS, reports)
    assert kinds.count("done") + kinds.count("pruned") == TRIALS
    assert not re.search(r"^\S+ [0-9a-f]{8} +(started|running)", out, re.M)
    last = [line for line in out.splitlines() if " trials " in line][-1]
    ended = re.search(r"trials 0 running, 0 pending, (\d+) done, (\d+) stopped early, 0 failed \| best val/mIoU", last)
    assert ended and int(ended[1]) + int(ended[2]) == TRIALS, last


def test_a_trials_queued_epochs_go_to_mlflow_in_one_request(mlflow_server, tmp_path):
    """A busy sweep's writers fall behind the tracking server; what queued meanwhile for a
    trial is one request, not one per epoch."""
    c = MlflowClient(mlflow_server.url)
    run_id = c.create_run(c.create_experiment("batched")).info.run_id
    writer = RunWriter(
        c, run_id, metric="val/mIoU", mode="max", storage=Storage(str(tmp_path)), run_dir="trial", created=True
    )
    before = mlflow_server.requests("/api/2.0/mlflow/runs/log-batch")
    reports = [{"epoch": e, "val/mIoU": e / 10, "train/loss": 1 / e} for e in (1, 2, 3)]
    assert writer.log_epochs(reports) == 3
    assert mlflow_server.requests("/api/2.0/mlflow/runs/log-batch") == before + 1
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "val/mIoU")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert writer.log_epochs(reports[1:]) == 0  # each epoch once
