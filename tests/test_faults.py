"""Faults during training: a Ray Train worker killed mid-run is restarted from the
last checkpoint, and MLflow ends with every epoch exactly once; the MLflow server down for
part of a sweep costs no training and nothing logged (`deeplab sync` writes it afterwards)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from deeplab_sweep.cli import main
from tests.conftest import CONF, MlflowServer, descendants, pids_naming, stop_processes_naming, sweep_command

pytestmark = pytest.mark.slow


def _pids_with(marker: str) -> list[int]:
    """This test's own Ray processes (the session cluster this process started) whose command
    line has `marker`: a test in the other xdist worker may be running its own trials."""
    return pids_naming(marker, among=descendants(os.getpid()))


def _train_worker_pids() -> list[int]:
    return _pids_with("ray::RayTrainWorker")


def _registered(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train has registered (fully uploaded), from its snapshot file. A worker
    killed mid-upload can leave a partial folder behind that Ray never registers or uses."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(snap.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def test_killed_worker_resumes_from_checkpoint(ray_cluster, synth_voc_root, workdir):
    run_dir = workdir / "runs" / "ray" / "killed"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if _registered(run_dir):
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.1)

    threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    rc = main(
        [
            "train",
            str(CONF / "train" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            "train.epochs=4",
            "train.max_failures=2",
            "train.num_workers=2",  # a worker group (one worker trains in the driver's own process)
            "data.max_train_images=16",
            "data.max_val_images=2",
            "storage.name=killed",
            "train.keep_checkpoints=10",
        ]
    )
    assert killed, "the worker was never killed: the test proved nothing"
    assert rc == 0
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    assert run.data.tags["deeplab.status"] == "completed"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "val/mIoU")]
    assert steps == [1, 2, 3, 4], steps  # nothing lost, nothing logged twice
    # One checkpoint per epoch: the restarted worker continued after the last checkpoint
    # instead of training a completed epoch again.
    epochs = sorted(torch.load(run_dir / d / "checkpoint.pt", weights_only=True)["epoch"] for d in _registered(run_dir))
    assert epochs == [1, 2, 3, 4], epochs


def test_one_worker_train_runs_in_process_and_a_failure_goes_on_from_its_checkpoint(synth_voc_root, workdir, capsys):
    """`deeplab train` with one worker: no Ray started, the run trains in this process (Ray
    Train's local mode); its training fails once in epoch 2 and is tried again from the epoch 1
    checkpoint it stored, and MLflow ends with every epoch once."""
    import ray

    from tests import toy_model

    toy_model._Flaky.steps = 0  # one training step per epoch: 8 images, batches of 8
    ray_before = ray.is_initialized()  # the session's cluster, when another test started it here
    rc = main(
        [
            "train",
            str(CONF / "train" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            "model.factory=tests.toy_model:build_flaky",
            f"model.options={{fail_at: 2, marks: {workdir / 'failed'}}}",
            "train.epochs=3",
            "train.max_failures=1",
            "train.visuals=0",
            "data.max_train_images=8",
            "data.max_val_images=2",
            "storage.name=flaky",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert (workdir / "failed").exists(), "the run never failed: the test proved nothing"
    assert "training failed (RuntimeError: a flaky failure mid-training); attempt 2, from the last checkpoint" in err
    assert ray.is_initialized() == ray_before, "deeplab train started Ray for one worker"
    assert toy_model._Flaky.steps == 4, "epochs 1 and 2 (failed), then 2 and 3: not started over from epoch 1"
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    assert run.data.tags["deeplab.status"] == "completed"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/mIoU")] == [1, 2, 3]
    metas = sorted(
        json.loads(p.read_text())["epoch"] for p in (workdir / "runs/ray/flaky").glob("checkpoint_*/checkpoint.json")
    )
    assert metas == [1, 2, 3]


def test_killed_in_process_trial_resumes_from_its_stored_checkpoint(ray_cluster, synth_voc_root, workdir, tmp_path):
    """A one-worker trial trains in its Tune actor (Ray Train's local mode). That process killed
    after its first checkpoint: Tune starts the trial again (train.max_failures), it resumes
    from the checkpoint it stored, and MLflow ends with every epoch once."""
    cfg = tmp_path / "one.yaml"
    cfg.write_text(
        "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 4, max_failures: 2, keep_checkpoints: 10, visuals: 0}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: kt}\n"
        "space:\n  train.lr: {type: grid, values: [0.01]}\n"
    )
    sweep_dir = workdir / "runs" / "ray" / "kt"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if list(sweep_dir.glob("train/*/epochs/epoch_0001.json")):
                for pid in _pids_with("ray::ImplicitFunc"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    rc = main(["sweep", str(cfg), "--conf-dir", str(CONF), f"data.root={synth_voc_root}"])
    assert killed, "the trial's process was never killed: the test proved nothing"
    assert rc == 0
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = [
        r
        for r in c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
        if r.data.tags.get("deeplab.kind") == "trial"
    ]
    assert run.data.tags["deeplab.status"] == "completed"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/mIoU")] == [1, 2, 3, 4]
    (result,) = sweep_dir.glob("sweep_trial_*/result.json")
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    # The kill may land before or after Tune has epoch 1's result: the restarted trial replays
    # what it stored either way, so an epoch reaches Tune trained, replayed, or both, never trained twice.
    trained = [r["epoch"] for r in rows if not r.get("replayed")]
    assert len(trained) == len(set(trained)), f"an epoch was trained twice: {trained}"
    assert sorted({r["epoch"] for r in rows}) == [1, 2, 3, 4], f"an epoch never reached Tune: {rows}"
    assert any(r.get("replayed") for r in rows), "the restarted trial did not resume from its checkpoint"
    metas = sorted(json.loads(p.read_text())["epoch"] for p in sweep_dir.glob("train/*/checkpoint_*/checkpoint.json"))
    assert metas == [1, 2, 3, 4]


def test_mlflow_down_mid_sweep_training_goes_on_then_sync(ray_cluster, synth_voc_root, workdir, tmp_path, capsys):
    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.search.sweep import run_sweep

    server = MlflowServer(tmp_path)
    server.start()
    store = MlflowClient(server.store)  # the server's own store, readable while it is down
    stopped = threading.Event()

    def stop_server_after_first_epoch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            exp = store.get_experiment_by_name("deeplab")
            runs = store.search_runs([exp.experiment_id]) if exp else []
            if any(r.data.metrics.get("val/mIoU") is not None for r in runs):
                server.stop()
                stopped.set()
                return
            time.sleep(0.2)

    (tmp_path / "s.yaml").write_text(
        # Epochs long enough that the server is down before a trial's epochs all reach it (the
        # callback sends a trial's queued results in one request).
        "defaults: [train/demo]\ndata: {max_train_images: 16, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 3, cpus_per_worker: 1, visuals: 1}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: outage}\n"
        "space:\n  train.lr: {type: grid, values: [0.01, 0.02]}\n"
    )
    job = load_job(
        tmp_path / "s.yaml", [f"data.root={synth_voc_root}", f"mlflow.tracking_uri={server.url}"], conf_root=CONF
    )
    threading.Thread(target=stop_server_after_first_epoch, daemon=True).start()
    try:
        summary = run_sweep(job)
        assert stopped.is_set(), "the server was never stopped: the test proved nothing"
        err = capsys.readouterr().err
        assert "MLflow is not answering; training goes on" in err
        assert f"deeplab sync {workdir}/runs/ray/outage" in err
        # Training went on: every trial ran all its epochs; the best comes from Ray's results.
        assert summary.mlflow_error and [t.epochs for t in summary.trials] == [3, 3]
        assert summary.best.values["val/mIoU"] is not None and Path(summary.best.checkpoint).is_dir()
        runs = store.search_runs([store.get_experiment_by_name("deeplab").experiment_id])
        trials = [r for r in runs if r.data.tags.get("deeplab.kind") == "trial"]
        assert any(len(store.get_metric_history(r.info.run_id, "val/mIoU")) < 3 for r in trials)

        server.start()  # back, same port and store
        assert main(["sync", summary.sweep_path, "--tracking-uri", server.url]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^2 trials: [1-9]\d* epochs logged, 0 runs created, 2 runs finished$", out, re.M), out
        c = MlflowClient(server.url)
        runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
        trials = [r for r in runs if r.data.tags.get("deeplab.kind") == "trial"]
        (parent,) = [r for r in runs if r.data.tags.get("deeplab.kind") == "sweep"]
        assert len(trials) == 2
        for r in trials:
            assert [m.step for m in c.get_metric_history(r.info.run_id, "val/mIoU")] == [1, 2, 3]
            assert r.data.tags["deeplab.status"] == "completed" and r.info.status == "FINISHED"
            arts = {a.path for a in c.list_artifacts(r.info.run_id)}
            assert {"checkpoint", "config.yaml", "visuals"} <= arts
            assert len(c.list_artifacts(r.info.run_id, "visuals")) == 6  # 3 epochs x (grid, confusion)
        assert parent.data.tags["best_run_id"] in {r.info.run_id for r in trials}
        assert parent.info.status == "FINISHED"
        # Idempotent: a second sync writes nothing.
        assert main(["sync", summary.sweep_path, "--tracking-uri", server.url]) == 0
        assert "0 epochs logged, 0 runs created, 0 runs finished" in capsys.readouterr().out
    finally:
        server.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only): a real full disk, not a simulated one."""
    import subprocess

    mounts = []

    def make(size_mb: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(d)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:100]})")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_unwritable_storage_is_reported_before_ray(synth_voc_root, workdir, capsys):
    import ray

    (workdir / "a-file").write_text("not a folder")
    ray_before = ray.is_initialized()
    rc = main(
        [
            "train",
            str(CONF / "train" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            f"storage.path={workdir}/a-file/ray",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"storage.path = '{workdir}/a-file/ray': not writable (Not a directory)" in err, err
    assert ray.is_initialized() == ray_before


def test_storage_too_small_for_one_checkpoint_is_reported_before_ray(synth_voc_root, workdir, small_disk, capsys):
    disk = small_disk(2)
    rc = main(["train", str(CONF / "train" / "demo.yaml"), f"data.root={synth_voc_root}", f"storage.path={disk}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"storage.path = '{disk}': 2 MB free, but one checkpoint of this model takes ~40 MB" in err, err


def test_disk_full_mid_run_fails_clearly_and_keeps_earlier_epochs(
    ray_cluster, synth_voc_root, workdir, small_disk, capsys
):
    """Room for two checkpoints of ~40 MB: the third epoch's does not fit. The run fails with
    one line saying so, and epochs 1-2 stay in MLflow and in storage, loadable."""
    disk = small_disk(100)
    rc = main(
        [
            "train",
            str(CONF / "train" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            f"storage.path={disk}",
            "storage.name=full",
            "train.epochs=4",
            "train.keep_checkpoints=10",
            "train.visuals=0",
            "data.max_train_images=8",
            "data.max_val_images=2",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1, err[-2000:]
    assert (
        "error: training failed: deeplab_sweep.trainable.ray_train.StorageError: "
        f"storage.path = '{disk}': no space left on device while saving the epoch 3 checkpoint" in err
    ), err[-2000:]
    assert "Traceback" not in err
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    assert run.info.status == "FAILED" and "no space left on device" in run.data.tags["deeplab.status"]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/mIoU")] == [1, 2]
    # One worker trains in this process and stores a checkpoint folder only once it is whole.
    kept = sorted(torch.load(p, weights_only=True)["epoch"] for p in (disk / "full").glob("checkpoint_*/checkpoint.pt"))
    assert kept == [1, 2]


def test_hung_tracking_server_does_not_hold_up_training(ray_cluster, synth_voc_root, workdir, tmp_path, monkeypatch):
    """The tracking server hangs (SIGSTOP: connections open, no answer) after the first logged
    epoch, with a 120 s request timeout. Tune's loop never waits on MLflow: both trials report
    every epoch to Ray while the server hangs; once it answers again, MLflow gets every epoch
    of both trials, in order, and their end."""
    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.search.sweep import run_sweep

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    server = MlflowServer(tmp_path)
    server.start()
    store = MlflowClient(server.store)
    sweep_dir = workdir / "runs" / "ray" / "hung"
    seen: dict = {}

    def epochs_in_ray() -> list[int]:
        last = []
        for p in sweep_dir.glob("sweep_trial_*/result.json"):
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            last.append(max((r.get("epoch", 0) for r in rows), default=0))
        return sorted(last)

    def hang_then_answer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            exp = store.get_experiment_by_name("deeplab")
            runs = store.search_runs([exp.experiment_id]) if exp else []
            if any(r.data.metrics.get("val/mIoU") is not None for r in runs):
                break
            time.sleep(0.2)
        os.killpg(server.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while time.monotonic() - stopped < 100 and epochs_in_ray() != [3, 3]:
            time.sleep(0.2)
        seen.update(epochs=epochs_in_ray(), seconds=time.monotonic() - stopped)
        os.killpg(server.proc.pid, signal.SIGCONT)

    (tmp_path / "s.yaml").write_text(
        "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 3, cpus_per_worker: 1, visuals: 1}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: hung}\n"
        "space:\n  train.lr: {type: grid, values: [0.01, 0.02]}\n"
    )
    job = load_job(
        tmp_path / "s.yaml", [f"data.root={synth_voc_root}", f"mlflow.tracking_uri={server.url}"], conf_root=CONF
    )
    watcher = threading.Thread(target=hang_then_answer, daemon=True)
    watcher.start()
    try:
        summary = run_sweep(job)
        watcher.join(timeout=10)
        assert seen["epochs"] == [3, 3], seen  # every epoch reached Ray while MLflow hung
        assert seen["seconds"] < 100, seen
        assert summary.mlflow_error is None
        runs = store.search_runs([store.get_experiment_by_name("deeplab").experiment_id])
        trials = [r for r in runs if r.data.tags.get("deeplab.kind") == "trial"]
        assert len(trials) == 2
        for r in trials:
            assert [m.step for m in store.get_metric_history(r.info.run_id, "val/mIoU")] == [1, 2, 3]
            assert r.data.tags["deeplab.status"] == "completed" and r.info.status == "FINISHED"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()


def test_driver_killed_mid_trial_then_resume(synth_voc_root, tmp_path, ray_tmpdir):
    """`kill -9` of the `deeplab sweep` process while a trial is between its checkpoints, its
    local Ray gone with it; then the same command with --resume. Every trial ends in one run
    (none duplicated, none left RUNNING) holding every epoch once, its best metric (the best of
    its whole history, also when that epoch came before the kill) and that checkpoint; no epoch
    is trained twice past its last checkpoint."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 4, cpus_per_worker: 1, keep_checkpoints: 1, visuals: 0}\n"
        "sweep: {num_samples: 3, seed: 3, asha: {enabled: false}, name: k}\n"
        "space:\n  train.lr: {type: loguniform, low: 0.003, high: 0.3}\n"
    )
    cmd = sweep_command(cfg, synth_voc_root, "cluster.num_cpus=2", "cluster.object_store_memory=100000000")
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    sweep_dir = tmp_path / "runs" / "ray" / "k"

    def epochs_reported() -> list[int]:
        """Per trial, the last epoch Tune has (in the driver's staging folder: Tune copies it to
        storage only now and then)."""
        staged = Path(ray_tmpdir).glob("ray/session_*/artifacts/*/k/driver_artifacts/sweep_trial_*/result.json")
        return [
            max((json.loads(line).get("epoch", 0) for line in p.read_text().splitlines() if line.strip()), default=0)
            for p in staged
        ]

    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(2 <= e < 4 for e in epochs_reported()):
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert any(2 <= e < 4 for e in epochs_reported()), "no trial was mid-run: the test proved nothing"
    stop_processes_naming(ray_tmpdir)  # the driver's local Ray does not outlive the machine it ran on

    res = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    trials = [r for r in runs if r.data.tags.get("deeplab.kind") == "trial"]
    assert len(trials) == len({r.data.tags["deeplab.trial_id"] for r in trials}) == 3
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for r in trials:
        history = c.get_metric_history(r.info.run_id, "val/mIoU")
        # Every epoch once. MLflow lists them by when they were logged: an epoch the killed driver
        # never wrote is written from storage when its trial ends, after the later ones (seen
        # once under load: [1, 3, 4, 2]).
        assert sorted(m.step for m in history) == [1, 2, 3, 4]
        assert r.data.tags["deeplab.status"] == "completed"
        assert r.data.metrics["best/val/mIoU"] == max(m.value for m in history)
        local = c.download_artifacts(r.info.run_id, "checkpoint", str(tmp_path / r.info.run_id))
        best_epoch = max(history, key=lambda m: m.value).step
        assert torch.load(Path(local) / "checkpoint.pt", weights_only=True)["epoch"] == best_epoch
    replayed = 0
    for p in sweep_dir.glob("sweep_trial_*/result.json"):
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        trained = [r["epoch"] for r in rows if not r.get("replayed")]
        assert len(trained) == len(set(trained)), f"an epoch was trained twice: {trained}"
        replayed += any(r.get("replayed") for r in rows)
    # The trial killed mid-run (after its second epoch) went on from its stored checkpoint.
    assert replayed >= 1, "no trial resumed from its checkpoint"


def test_unusable_s3_location_is_one_line_before_ray(s3_server, synth_voc_root, workdir, monkeypatch, capsys):
    """A bucket that does not exist, or an endpoint that does not answer: one line naming the
    location without its credentials, exit 2, before Ray starts."""
    import ray

    for var, value in s3_server.env.items():
        monkeypatch.setenv(var, value)
    demo = str(CONF / "train" / "demo.yaml")
    ray_before = ray.is_initialized()
    rc = main(["train", demo, f"data.root={synth_voc_root}", "storage.path=s3://AKIA:s3cr/et@no-such-bucket/ray"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: storage.path = 's3://no-such-bucket/ray': not writable (Bucket"), err
    assert "s3cr" not in err and err.count("\n") == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    rc = main(["train", demo, f"data.root={synth_voc_root}", f"storage.path=s3://{s3_server.bucket}/ray"])
    err = capsys.readouterr().err
    assert rc == 2 and f"storage.path = 's3://{s3_server.bucket}/ray': not writable" in err, err
    assert ray.is_initialized() == ray_before


def test_budget_counts_attempts_that_died_before_reporting_and_a_resume_keeps_why_it_stopped(
    ray_cluster, synth_voc_root, workdir, tmp_path
):
    """A trial whose process dies twice, 3 s into its first epoch, before any report, then
    trains (a tiny model: a second or two): its cost counts all three attempts, whose 6 s cross
    the CPU-hour budget alone, so no second trial starts. A --resume of the finished sweep
    still says it stopped on its budget (the searcher Tune restored decided it, not a fresh one)."""
    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.search.sweep import run_sweep

    (tmp_path / "s.yaml").write_text(f"""\
defaults: [train/demo]
model: {{factory: "tests.toy_model:build_dying", options: {{die_after_s: 3, deaths: 2, marks: "{tmp_path / "marks"}"}}}}
data: {{max_train_images: 8, max_val_images: 2, crop_size: 48}}
train: {{epochs: 1, cpus_per_worker: 1, max_failures: 2, visuals: 0}}
sweep: {{num_samples: 3, max_concurrent: 1, asha: {{enabled: false}}, name: die, budget: {{cpu_hours: {5.5 / 3600}}}}}
space:
  train.lr: {{type: loguniform, low: 0.01, high: 0.1}}
""")
    job = load_job(tmp_path / "s.yaml", [f"data.root={synth_voc_root}"], conf_root=CONF)
    summary = run_sweep(job)
    assert len(list((tmp_path / "marks").iterdir())) == 2, "the trial's process did not die twice"
    (trial,) = summary.trials
    assert trial.status == "completed" and trial.cost * 3600 >= 2 * 3
    assert summary.stop_reason.startswith("budget.cpu_hours spent: "), summary.stop_reason
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    parent = next(
        r
        for r in c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
        if r.data.tags.get("deeplab.kind") == "sweep"
    )
    assert parent.data.metrics["compute/cpu_hours"] * 3600 >= 2 * 3

    resumed = run_sweep(job, resume=True)
    assert resumed.stop_reason == summary.stop_reason
    assert [t.trial_id for t in resumed.trials] == [trial.trial_id]


def test_disk_full_in_a_one_worker_trial_is_the_storage_error(
    ray_cluster, synth_voc_root, workdir, small_disk, tmp_path
):
    """A one-worker trial writes its checkpoints in its run folder: the third of ~40 MB does not
    fit in 100 MB. The trial fails with the one line that says so (not torch's "PytorchStreamWriter
    failed writing file"), and its first two epochs stay in MLflow and in storage."""
    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.search.sweep import run_sweep

    disk = small_disk(100)
    (tmp_path / "s.yaml").write_text(
        "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 4, keep_checkpoints: 10, visuals: 0}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: full1}\n"
        "space:\n  train.lr: {type: grid, values: [0.01]}\n"
    )
    job = load_job(tmp_path / "s.yaml", [f"data.root={synth_voc_root}", f"storage.path={disk}"], conf_root=CONF)
    (trial,) = run_sweep(job).trials
    assert trial.status == "failed"
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    run = c.get_run(trial.run_id)
    assert run.data.tags["deeplab.status"].startswith(
        "failed: deeplab_sweep.trainable.ray_train.StorageError: "
        f"storage.path = '{disk}': no space left on device while saving the epoch 3 checkpoint"
    ), run.data.tags["deeplab.status"]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/mIoU")] == [1, 2]
    kept = sorted(json.loads(p.read_text())["epoch"] for p in disk.glob("full1/train/*/checkpoint_*/checkpoint.json"))
    assert kept == [1, 2]
