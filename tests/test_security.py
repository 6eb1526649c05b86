"""Credentials in URIs are never stored with a run or a checkpoint, and the
tracking server the tool starts (`deeplab ui`) listens on 127.0.0.1 only. (Checkpoints load
with weights_only=True: tests/test_import.py; archive extraction cannot escape its folder:
tests/test_datasets.py. Ray's token auth is left as Ray sets it: nothing here turns it off.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import torch

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.tracking import config_params
from deeplab_sweep.trainable.engine import LocalWorker, fit
from tests.conftest import CONF, free_port

SECRET = "s3cr3t-t0ken"


def test_credentials_in_uris_are_not_stored(synth_voc_root, tmp_path):
    cfg = load_job(
        CONF / "train" / "demo.yaml",
        [
            f"data.root={synth_voc_root}",
            "train.epochs=1",
            "data.max_train_images=8",
            "data.max_val_images=2",
            f"mlflow.tracking_uri=https://alice:{SECRET}@mlflow.example.com",
            f"storage.path=s3://AKIA:{SECRET}@bucket/ray",
            "train.visuals=0",
        ],
    ).run
    params = {p.key: p.value for p in config_params(cfg.to_dict())}
    assert params["mlflow.tracking_uri"] == "https://***@mlflow.example.com"
    assert params["storage.path"] == "s3://***@bucket/ray"
    assert not any(SECRET in v for v in params.values())
    fit(cfg, LocalWorker(checkpoint_root=tmp_path))
    stored = torch.load(tmp_path / "epoch_0001" / "checkpoint.pt", weights_only=True)["config"]
    assert SECRET not in repr(stored) and stored["mlflow"]["tracking_uri"] == "https://***@mlflow.example.com"


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def test_ui_listens_on_loopback_only(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deeplab_sweep.cli",
            "ui",
            "--port",
            str(port),
            "--store",
            f"sqlite:///{tmp_path}/ui.db",
            "--artifacts",
            str(tmp_path / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(CONF.parent)},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "deeplab ui did not start"
                time.sleep(0.5)
        assert _listening(port) == {"0100007F"}, _listening(port)  # 127.0.0.1, nothing else
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_redaction_covers_secrets_with_slashes():
    from deeplab_sweep.trainable.run_config import redacted

    assert redacted("s3://AKIA:ab/cd+ef@bucket/ray") == "s3://***@bucket/ray"
    assert redacted("https://token@host:5000/x") == "https://***@host:5000/x"
    assert redacted("s3://bucket/prefix@v2/x") == "s3://bucket/prefix@v2/x"  # not credentials: left alone


def _files_with(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_credentialed_tracking_uri_works_and_leaves_no_trace(
    ray_cluster, mlflow_server, synth_voc_root, workdir, tmp_path, monkeypatch, capfd
):
    """http://user:TOKEN@host: the credentials go where MLflow's client reads them (the
    environment of this process), and nowhere else: not in the MLflow store, its artifacts,
    the sweep's storage (Tune's pickles included), Optuna's study, or what is printed."""
    from mlflow.tracking import MlflowClient

    from deeplab_sweep.cli import main

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "")  # restored (unset) after the test
    host = mlflow_server.url.removeprefix("http://")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 1, cpus_per_worker: 1}\n"
        "sweep: {num_samples: 1, asha: {enabled: false}, name: creds}\n"
        "space:\n  train.lr: {type: loguniform, low: 0.001, high: 0.1}\n"
    )
    rc = main(
        [
            "sweep",
            str(cfg),
            "--conf-dir",
            str(CONF),
            f"data.root={synth_voc_root}",
            "--tracking-uri",
            f"http://alice:{SECRET}@{host}",
        ]
    )
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    c = MlflowClient(mlflow_server.url)
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    assert {r.data.tags["deeplab.kind"] for r in runs} == {"sweep", "trial"}
    assert runs[0].data.params["mlflow.tracking_uri"] == mlflow_server.url
    assert SECRET not in out + err
    assert _files_with(mlflow_server.folder, SECRET.encode()) == []
    assert _files_with(workdir / "runs", SECRET.encode()) == []
