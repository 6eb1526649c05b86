"""Real sweeps on a local Ray cluster, logged to a real sqlite MLflow store and to a
real `mlflow server` process; best-checkpoint retrieval; resume after Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deeplab_sweep.search.best import fetch_best
from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.sweep import run_sweep
from deeplab_sweep.search.sync import read_trials
from deeplab_sweep.trainable.inference import evaluate_checkpoint
from tests.conftest import CONF, REPO, sweep_command

pytestmark = pytest.mark.slow

TINY_SWEEP = """\
defaults: [train/demo]
data: {max_train_images: 8, max_val_images: 4, crop_size: 48}
train: {epochs: 3, cpus_per_worker: 1}
sweep: {num_samples: %(n)d, seed: 1, asha: {grace_period: 1, reduction_factor: 2}}
space:
  train.lr: {type: loguniform, low: 0.001, high: 0.3}
  model.output_stride: {type: choice, values: [8, 16]}
"""


def _write_sweep(tmp_path: Path, n: int) -> Path:
    p = tmp_path / "tiny_sweep.yaml"
    p.write_text(TINY_SWEEP % {"n": n})
    return p


def _runs(c: MlflowClient, experiment: str = "deeplab"):
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("deeplab.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("deeplab.kind") == "trial"]
    return parent, children


@pytest.fixture(scope="module")
def tpe_asha_sweep(ray_cluster, synth_voc_root, tmp_path_factory):
    """One TPE + ASHA sweep on the session's cluster, read by the tests below: 5 trials, one
    at a time (so ASHA's decisions do not depend on which trial reports first), on a space
    wide enough that some trials are stopped early and some run all 3 epochs."""
    workdir = tmp_path_factory.mktemp("tpe_asha")
    cfg = _write_sweep(workdir, 5)
    with contextlib.chdir(workdir):
        job = load_job(cfg, [f"data.root={synth_voc_root}", "sweep.name=s1", "sweep.max_concurrent=1"], conf_root=CONF)
        summary = run_sweep(job)
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    parents, children = _runs(c)
    return SimpleNamespace(
        workdir=workdir,
        summary=summary,
        c=c,
        parents=parents,
        children=children,
        status={r.data.tags["deeplab.trial_id"]: r.data.tags["deeplab.status"] for r in children},
    )


def test_sweep_is_a_parent_run_with_one_child_per_trial(tpe_asha_sweep):
    s = tpe_asha_sweep
    assert len(s.parents) == 1 and len(s.children) == 5
    parent = s.parents[0]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in s.children)
    assert all(r.info.status != "RUNNING" for r in s.parents + s.children), "no run left RUNNING"
    assert {a.path for a in s.c.list_artifacts(parent.info.run_id)} >= {
        "summary.json",
        "search_space.json",
        "sweep_config.yaml",
        "param_importances.json",
        "parallel_coordinates.png",
        "search_curves.png",
        "search_progress.png",
    }
    assert parent.data.tags["git_commit"] and len(parent.data.tags["dataset_fingerprint"]) == 16


def test_some_trials_are_pruned_and_the_rest_complete(tpe_asha_sweep):
    s = tpe_asha_sweep
    assert sorted(set(s.status.values())) == ["completed", "pruned"], s.status


def test_each_trial_run_holds_every_epoch_it_trained_and_its_checkpoint(tpe_asha_sweep):
    s = tpe_asha_sweep
    for r in s.children:
        steps = [m.step for m in s.c.get_metric_history(r.info.run_id, "val/mIoU")]
        trial = next(t for t in s.summary.trials if t.trial_id == r.data.tags["deeplab.trial_id"])
        assert steps == list(range(1, trial.epochs + 1))
        assert (s.status[trial.trial_id] == "completed") == (trial.epochs == 3)
        assert "checkpoint" in {a.path for a in s.c.list_artifacts(r.info.run_id)}
        assert r.data.metrics["best/val/mIoU"] == max(
            m.value for m in s.c.get_metric_history(r.info.run_id, "val/mIoU")
        )


def test_parent_run_says_what_early_stopping_saved(tpe_asha_sweep):
    """Epochs trained, counted from the trial runs' histories, against 5 trials x 3 epochs."""
    s = tpe_asha_sweep
    trained = sum(max(m.step for m in s.c.get_metric_history(r.info.run_id, "val/mIoU")) for r in s.children)
    metrics = s.parents[0].data.metrics
    assert metrics["compute/epochs_trained"] == trained < 15
    assert metrics["compute/epochs_if_all_ran_in_full"] == 15
    assert metrics["compute/saved_by_early_stopping"] == pytest.approx(1 - trained / 15)


def test_each_trial_run_holds_all_resolved_params(tpe_asha_sweep):
    s = tpe_asha_sweep
    for r in s.children:
        trial = next(t for t in s.summary.trials if t.trial_id == r.data.tags["deeplab.trial_id"])
        assert float(r.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        assert r.data.params["model.output_stride"] == str(trial.params["model.output_stride"])
        assert r.data.params["data.max_train_images"] == "8" and len(r.data.params) >= 40


def test_optuna_heard_each_trial_as_mlflow_logged_it(tpe_asha_sweep):
    """Read back from Optuna's own storage: a pruned trial's last intermediate value is the
    metric of its last epoch in MLflow, at that epoch (Ray never passes the stopping result
    to the searcher's on_trial_result); a completed trial's value is its best checkpoint's, the
    best/val/mIoU MLflow holds (one rule for Optuna, MLflow, the summary and `deeplab best`)."""
    s = tpe_asha_sweep
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{s.workdir}/runs/optuna.db")
    by_lr = {t.params["train.lr"]: t for t in study.trials}
    assert len(by_lr) == len(s.children) == 5
    for r in s.children:
        history = s.c.get_metric_history(r.info.run_id, "val/mIoU")
        last = max(history, key=lambda m: m.step)
        trial = next(t for lr, t in by_lr.items() if lr == pytest.approx(float(r.data.params["train.lr"])))
        assert trial.intermediate_values == {m.step: pytest.approx(m.value) for m in history}
        if s.status[r.data.tags["deeplab.trial_id"]] == "pruned":
            assert trial.state == TrialState.PRUNED
            assert trial.intermediate_values[last.step] == pytest.approx(last.value)
        else:
            assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(r.data.metrics["best/val/mIoU"])
    assert s.summary.optuna_states == {
        "COMPLETE": list(s.status.values()).count("completed"),
        "PRUNED": list(s.status.values()).count("pruned"),
    }


def test_best_is_found_through_mlflow_loaded_and_reproduced(tpe_asha_sweep):
    s = tpe_asha_sweep
    info = fetch_best(
        f"sqlite:///{s.workdir}/runs/mlflow.db",
        "deeplab",
        s.workdir / "best",
        sweep="s1",
        register="tiny",
        alias="champion",
    )
    assert info["run_id"] == s.parents[0].data.tags["best_run_id"] == s.summary.best.run_id
    assert info["value"] == pytest.approx(s.summary.best.values["val/mIoU"])
    assert torch.load(info["local_path"], weights_only=True)["epoch"] == info["checkpoint_epoch"]
    assert evaluate_checkpoint(info["local_path"])["val/mIoU"] == info["value"]
    assert s.c.get_model_version_by_alias("tiny", "champion").run_id == info["run_id"]


def test_best_cli_json_and_unknown_experiment(workdir, capsys):
    from deeplab_sweep.cli import main

    assert main(["best", "--experiment", "nope", "--tracking-uri", f"sqlite:///{workdir}/x.db"]) == 2
    assert "no such MLflow experiment" in capsys.readouterr().err


def test_sweep_against_real_mlflow_server(ray_cluster, synth_voc_root, workdir, tmp_path, mlflow_server):
    from deeplab_sweep.cli import main

    mlflow_server = mlflow_server.url
    rc = main(
        [
            "sweep",
            str(_write_sweep(tmp_path, 2)),
            "--conf-dir",
            str(CONF),
            f"data.root={synth_voc_root}",
            "sweep.name=srv",
            "sweep.asha.enabled=false",
            "--tracking-uri",
            mlflow_server,
        ]
    )
    assert rc == 0
    c = MlflowClient(mlflow_server)
    parents, children = _runs(c)
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["deeplab.status"] == "completed" for r in children)
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in children)
    assert not (workdir / "runs" / "mlartifacts").exists(), "artifacts went to the server, not a local folder"
    info = fetch_best(mlflow_server, "deeplab", workdir / "best")
    assert Path(info["local_path"]).is_file() and info["run_id"] in {r.info.run_id for r in children}


def test_resume_after_ctrl_c_continues_same_runs_on_s3(synth_voc_root, tmp_path, s3_server, monkeypatch):
    """Ray's storage and MLflow's artifacts in S3 (a real S3-compatible server on 127.0.0.1).
    Ctrl-C the sweep once a trial has finished, then --resume: finished trials are not rerun,
    interrupted ones continue from their last checkpoint, in the same MLflow runs; `deeplab
    best` then downloads the best checkpoint from S3, and it reproduces its metric."""
    cfg = _write_sweep(tmp_path, 3)  # two at a time: one unstarted at Ctrl-C, whatever the timing
    bucket = f"s3://{s3_server.bucket}"
    for var, value in s3_server.env.items():  # this process reads MLflow's S3 artifacts too
        monkeypatch.setenv(var, value)
    cmd = sweep_command(
        cfg,
        synth_voc_root,
        "sweep.name=r1",
        "sweep.asha.enabled=false",
        "train.epochs=4",
        "cluster.num_cpus=2",
        "cluster.object_store_memory=100000000",
        f"storage.path={bucket}/ray",
        f"mlflow.artifact_location={bucket}/mlartifacts",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **s3_server.env}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, last = [], {}  # the progress table's lines; each trial's last (status, epoch)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        parts = line.split()
        if len(parts) > 3 and "/" in parts[3]:
            last[parts[1]] = (parts[2], int(parts[3].split("/")[0]))
        # Ctrl-C once a trial is done and another has stored a checkpoint and not finished.
        stored = [t for t, (status, epoch) in last.items() if status == "running" and 1 <= epoch < 4]
        if (any(status == "done" for status, _ in last.values()) and stored) or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert any(" done " in ln for ln in seen) and stored, "".join(seen)[-3000:]

    c = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    _, before = _runs(c)
    finished = {r.data.tags["deeplab.trial_id"]: r for r in before if r.data.tags.get("deeplab.status") == "completed"}
    assert finished
    done_steps = {t: len(c.get_metric_history(r.info.run_id, "val/mIoU")) for t, r in finished.items()}

    res = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parents, after = _runs(c)
    assert len(parents) == 1, "the same parent run continues"
    ids = [r.data.tags["deeplab.trial_id"] for r in after]
    assert len(ids) == len(set(ids)) == 3, "one child run per trial, none duplicated"
    assert all(r.data.tags["deeplab.status"] == "completed" for r in after)
    for r in after:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "val/mIoU")]
        assert steps == [1, 2, 3, 4], (r.data.tags["deeplab.trial_id"], steps)  # nothing lost, nothing repeated
        t = r.data.tags["deeplab.trial_id"]
        if t in done_steps:
            assert len(steps) == done_steps[t]  # a finished trial was not rerun
    # The interrupted trial went on from its stored checkpoint (the resumed driver's results for
    # it start with the restored epoch, replayed), training no epoch up to it again.
    rows = {rec.trial_id: rec.rows for rec in read_trials(SweepFolder(f"{bucket}/ray/r1"))}
    for trial_id in stored:
        replayed = [r["epoch"] for r in rows[trial_id] if r.get("replayed")]
        trained = [r["epoch"] for r in rows[trial_id] if not r.get("replayed")]
        assert replayed and all(e > max(replayed) for e in trained), (trial_id, rows[trial_id])
    summary = json.loads(
        c.download_artifacts(parents[0].info.run_id, "summary.json", str(tmp_path / "s"))
        and (tmp_path / "s" / "summary.json").read_text()
    )
    assert len(summary["trials"]) == 3
    # The summary after a resume covers the trials finished before it too.
    assert all(t["run_id"] and t["values"]["val/mIoU"] is not None for t in summary["trials"])
    assert summary["best"]["run_id"] in {r.info.run_id for r in after}
    assert summary["optuna_states"] == {"COMPLETE": 3}
    assert summary["best"]["checkpoint"].startswith(f"{bucket}/ray/r1/train/")
    assert all(r.info.artifact_uri.startswith(f"{bucket}/mlartifacts/") for r in after)
    assert not (tmp_path / "runs" / "ray").exists() and not (tmp_path / "runs" / "mlartifacts").exists()

    res = subprocess.run(
        [str(Path(sys.executable).with_name("deeplab")), "best", "--sweep", "r1", "--out", "best", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert info["run_id"] == summary["best"]["run_id"] and info["artifact_uri"].startswith(f"{bucket}/mlartifacts/")
    assert evaluate_checkpoint(info["local_path"])["val/mIoU"] == pytest.approx(info["value"])


def test_nan_trial_fails_alone_with_reason(ray_cluster, synth_voc_root, workdir, tmp_path):
    """Grid over a sane and an absurd learning rate: the absurd trial's loss goes non-finite;
    it is marked failed with the reason, the other trial completes and the sweep finishes."""
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(
        "defaults: [train/demo]\n"
        "data: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 2, cpus_per_worker: 1}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}}\n"
        "space:\n  train.lr: {type: choice, values: [0.01, 1.0e+12]}\n"
    )
    job = load_job(cfg, [f"data.root={synth_voc_root}", "sweep.name=nan"], conf_root=CONF)
    summary = run_sweep(job)
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    parents, children = _runs(c)
    by_lr = {float(r.data.params["train.lr"]): r for r in children}
    bad, good = by_lr[1e12], by_lr[0.01]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["deeplab.status"].startswith("failed: ")
    assert "NonFiniteLoss" in bad.data.tags["deeplab.status"] and "loss became" in bad.data.tags["deeplab.status"]
    assert good.info.status == "FINISHED" and good.data.tags["deeplab.status"] == "completed"
    assert parents[0].info.status == "FINISHED"
    assert summary.best.run_id == good.info.run_id
    assert sum(1 for t in summary.trials if t.error) == 1


def test_trial_failing_before_its_first_epoch_has_one_run_and_retention_follows_the_metric(
    ray_cluster, synth_voc_root, workdir, tmp_path
):
    """Grid over a batch size that fits 8 images and one that does not. The second trial fails
    before it reports anything: it gets exactly one (FAILED) run, also after the end-of-sweep
    sync. The sweep optimises train/lr (max: epoch 1, under the poly schedule), so Ray keeps
    epoch 1's checkpoint as the best, and that is the checkpoint MLflow gets."""
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(
        "defaults: [train/demo]\n"
        "data: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 3, cpus_per_worker: 1, keep_checkpoints: 1, visuals: 0}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, metric: train/lr, mode: max}\n"
        "space:\n  data.batch_size: {type: choice, values: [4, 64]}\n"
    )
    summary = run_sweep(load_job(cfg, [f"data.root={synth_voc_root}", "sweep.name=early"], conf_root=CONF))
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    _, children = _runs(c)
    assert sorted(r.data.params["data.batch_size"] for r in children) == ["4", "64"]
    assert len({r.data.tags["deeplab.trial_id"] for r in children}) == 2
    failed = next(r for r in children if r.data.params["data.batch_size"] == "64")
    assert failed.info.status == "FAILED"
    assert "data.batch_size = 64 is larger than the 8 training images" in failed.data.tags["deeplab.status"]
    good = next(r for r in children if r.data.params["data.batch_size"] == "4")
    assert [m.step for m in c.get_metric_history(good.info.run_id, "best/train/lr")] == [1]
    local = c.download_artifacts(good.info.run_id, "checkpoint", str(tmp_path / "dl"))
    assert torch.load(Path(local) / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert summary.best.run_id == good.info.run_id


def test_asha_self_check_measures_its_rungs_in_a_real_sweep(ray_cluster, synth_voc_root, workdir):
    """The first `check_trials` trials run in full whatever ASHA would decide (the unselected
    sample); the parent run holds each rung's rank correlation with the last epoch, which equals
    scipy's Spearman over those trials' histories in MLflow; once they have run, a rung whose
    correlation is below `min_rank_corr` at the stated confidence is turned off and stops none
    of the later trials. min_rank_corr = 1 turns off every rung whose correlation is measured
    (its upper bound is below 1): the sweep's training loss ranks, unlike a tiny model's mIoU,
    which ties."""
    from scipy.stats import spearmanr

    cfg = _write_sweep(workdir, 6)
    job = load_job(
        cfg,
        [
            f"data.root={synth_voc_root}",
            "sweep.name=check",
            "sweep.max_concurrent=1",  # trials in order: the first four are the measured ones
            "sweep.metric=train/loss",
            "sweep.mode=min",
            "sweep.asha.min_rank_corr=1",
            "sweep.asha.check_trials=4",
        ],
        conf_root=CONF,
    )
    summary = run_sweep(job)
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (parent,), children = _runs(c)
    curves = {
        r.data.tags["deeplab.trial_id"]: {m.step: m.value for m in c.get_metric_history(r.info.run_id, "train/loss")}
        for r in children
    }
    order = [r.data.tags["deeplab.trial_id"] for r in sorted(children, key=lambda r: r.info.start_time)]
    check = summary.asha_check
    assert check is not None and check["sample"] == order[:4] and check["trials_in_full"] == 4
    assert all(len(curves[t]) == 3 for t in order[:4]), "a measured trial was stopped early"
    for rung in (1, 2):
        rho = spearmanr([curves[t][rung] for t in order[:4]], [curves[t][3] for t in order[:4]]).statistic
        assert parent.data.metrics[f"asha/rank_corr/epoch_{rung}"] == pytest.approx(rho)
    assert set(check["rungs_off"]) == {"1", "2"}, check
    assert "asha_check.png" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert all(len(curves[t]) == 3 for t in order[4:]), "a rung turned off stopped a later trial"
