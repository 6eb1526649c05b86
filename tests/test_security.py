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
