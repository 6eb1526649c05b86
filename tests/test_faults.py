"""Faults during training (issue 6, first part): a Ray Train worker killed mid-run is
restarted from the last checkpoint, and MLflow ends with every epoch exactly once."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from search.cli import main
from tests.conftest import CONF

pytestmark = pytest.mark.slow


def _train_worker_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ray::RayTrainWorker" in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


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
    rc = main(["train", str(CONF / "train" / "demo.yaml"), f"data.root={synth_voc_root}", "train.epochs=4",
               "train.max_failures=2", "data.max_train_images=16", "data.max_val_images=2", "storage.name=killed",
               "train.keep_checkpoints=10"])
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
