"""A two-node Ray cluster on loopback (a head and a worker started with
`ray start`, each with its own ports, CPUs and object store), a sweep submitted to it with
`--address`, trials on both nodes writing to one shared storage path, and exactly the
processes this test started stopped at the end (never `ray stop`: it would also stop any
other Ray on the machine, such as the test session's own cluster)."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CONF, REPO, free_port

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _node_args(temp_dir: str, worker_ports: int) -> list[str]:
    return [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--object-store-memory=80000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--min-worker-port={worker_ports}",
        f"--max-worker-port={worker_ports + 99}",
    ]


def _pids_of(temp_dir: str) -> list[int]:
    """Every process whose command line names this cluster's own temp folder."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if temp_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _stop(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_of(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while _pids_of(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.3)


# `ray start --head` turns Ray's token authentication on; every process that starts, joins or
# talks to the cluster needs the same token. The tests bring their own (RAY_AUTH_TOKEN) rather
# than depend on a ~/.ray/auth_token left by something else.
_TOKEN = secrets.token_hex(32)


def cluster_env() -> dict:
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": _TOKEN,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _run(cmd: list[str], env: dict) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


@pytest.fixture
def loopback_cluster():
    # Short: Ray's Unix socket paths live under it (at most 107 characters).
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    gcs, dashboard = free_port(), free_port()
    base = random.randrange(20000, 28000, 200)
    env = cluster_env()
    try:
        _run(
            [
                RAY,
                "start",
                "--head",
                f"--port={gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}",
                *_node_args(temp_dir, base),
            ],
            env,
        )
        _run([RAY, "start", f"--address=127.0.0.1:{gcs}", *_node_args(temp_dir, base + 100)], env)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir}
    finally:
        _stop(temp_dir)
        left = _pids_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {left}"


def test_sweep_on_two_loopback_nodes(loopback_cluster, synth_voc_root, tmp_path):
    shared = tmp_path / "shared"  # the one storage path both nodes write to (NFS in real life)
    cfg = tmp_path / "two_nodes.yaml"
    cfg.write_text(
        "defaults: [train/demo]\n"
        "data: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 2, cpus_per_worker: 0.9, visuals: 0}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: two-nodes}\n"
        "space:\n  train.lr: {type: grid, values: [0.01, 0.02]}\n"
    )
    env = cluster_env()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeplab_sweep.cli",
            "sweep",
            str(cfg),
            "--conf-dir",
            str(CONF),
            f"data.root={synth_voc_root}",
            f"storage.path={shared}",
            "--address",
            loopback_cluster["address"],
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "best trial" in res.stdout

    # Both trials ran at once, one per node: each node has 1 CPU and a trial's worker takes 0.9.
    nodes = _train_worker_nodes(loopback_cluster["dashboard"])
    assert len(nodes) == 2, nodes
    # Every trial wrote its results and checkpoints under the shared path.
    sweep_dir = shared / "two-nodes"
    results = [
        json.loads(line) for p in sweep_dir.glob("sweep_trial_*/result.json") for line in p.read_text().splitlines()
    ]
    assert sorted(r["epoch"] for r in results) == [1, 1, 2, 2]
    assert all(
        Path(r["checkpoint_path"]).is_relative_to(sweep_dir) and Path(r["checkpoint_path"]).is_dir()
        for r in results
        if r["epoch"] == 2
    )
    c = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    assert sorted(
        r.data.tags.get("deeplab.status", "") for r in runs if r.data.tags.get("deeplab.kind") == "trial"
    ) == ["completed", "completed"]


def _train_worker_nodes(dashboard: str) -> set[str]:
    """Node ids of the Ray Train worker actors the cluster ran (dead ones included)."""
    code = (
        "import json; from ray.util.state import list_actors; "
        f"a = list_actors(address={dashboard!r}, filters=[('class_name', '=', 'RayTrainWorker')], limit=100); "
        "print(json.dumps(sorted({x.node_id for x in a})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=cluster_env()
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))
