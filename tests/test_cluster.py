"""Sweeps on clusters shaped as they really run, all on this machine:

- exact fit: a head with no CPU and two worker nodes of one CPU each (`ray start` on loopback,
  own ports, a shared storage path), trials of two one-CPU workers, so each trial takes every
  worker CPU there is;
- autoscaling from zero: a head with no CPU and a worker node type the autoscaler launches on
  demand (Ray's fake multi-node provider, the one `ray.cluster_utils.AutoscalingCluster` uses),
  advertising a custom resource that the trials ask for per worker (the GPU path of placement);
- a worker node killed mid-trial: the trial resumes from its checkpoint on another node.

Each cluster is started with its own temp folder and stopped by ending exactly the processes
that name it (never `ray stop`: it would also stop any other Ray on the machine, such as the
test session's own cluster).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import CONF, REPO, descendants, free_port, pids_naming, stop_processes_naming, sweep_command

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
TOKEN = "0" * 64  # `ray start --head` turns token auth on: each test cluster brings its own token


def cluster_env(**extra: str) -> dict:
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        **extra,
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _node_args(temp_dir: str, cpus: int) -> list[str]:
    ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        )
    ]
    return [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--object-store-memory=80000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *ports,
    ]


def _run(cmd: list[str], env: dict) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


class _Cluster:
    """A cluster of this test module's own: its address, dashboard and temp folder."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
        self.gcs, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def head_args(self) -> list[str]:
        return [
            RAY,
            "start",
            "--head",
            f"--port={self.gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]

    def stop(self) -> None:
        # Ray's client server, when restarted while the head goes down, names only the GCS.
        needles = (self.temp_dir, f":{self.gcs}\0")
        for needle in needles:
            stop_processes_naming(needle)
        left = [pid for needle in needles for pid in pids_naming(needle)]
        assert not left, f"processes of the test cluster still running: {left}"


@pytest.fixture(scope="module")
def exact_fit_cluster():
    cluster = _Cluster()
    env = cluster_env()
    try:
        # `ray job stop` gives a job 60 s to end as on Ctrl-C (Ray's default: 3 s, then SIGKILL).
        _run([*cluster.head_args(), *_node_args(cluster.temp_dir, 0)], cluster_env(RAY_JOB_STOP_WAIT_TIME_S="60"))
        # One log monitor per host (the head's): each node's would tail the same session logs.
        worker = [RAY, "start", f"--address={cluster.address}", "--include-log-monitor=false"]
        for _ in range(2):
            _run([*worker, *_node_args(cluster.temp_dir, 1)], env)
        yield cluster
    finally:
        cluster.stop()


# The fake provider's own record of the head: its fixed node id and node type. A head type of
# another name is one the autoscaler finds missing: it launched one every update (~2.5 s) and
# removed it as over that type's max_workers, 20 extra nodes in a minute-long test.
FAKE_HEAD_ID = "f" * 51 + "00000"
FAKE_HEAD_TYPE = "ray.head.default"


def start_autoscaling_cluster(folder: Path) -> _Cluster:
    """A head with no CPU; worker nodes of {CPU: 1, fake_gpu: 1}, none at first, up to 2,
    launched by Ray's autoscaler (fake multi-node provider) when trials ask for them."""
    cluster = _Cluster()
    cluster.config = folder / "cluster.yaml"
    cluster.config.write_text(
        yaml.safe_dump(
            {
                "cluster_name": "deeplab-fake",
                "max_workers": 2,
                "head_node_type": FAKE_HEAD_TYPE,
                "provider": {
                    "type": "fake_multinode",
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                    "gcs_address": cluster.address,
                },
                "available_node_types": {
                    FAKE_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                    "gpu_worker": {
                        "resources": {"CPU": 1, "fake_gpu": 1, "object_store_memory": 80_000_000},
                        "node_config": {},
                        "min_workers": 0,
                        "max_workers": 2,
                    },
                },
                "auth": {},
                "upscaling_speed": 1.0,
                "idle_timeout_minutes": 5,
                "docker": {},
                "file_mounts": {},
                "initialization_commands": [],
                "setup_commands": [],
                "head_setup_commands": [],
                "worker_setup_commands": [],
                "head_start_ray_commands": [],
                "worker_start_ray_commands": [],
                "cluster_synced_files": [],
                "file_mounts_sync_continuously": False,
                "rsync_exclude": [],
                "rsync_filter": [],
            }
        )
    )
    env = cluster_env(
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_ID,
        RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_ID,
    )
    try:
        _run([*cluster.head_args(), f"--autoscaling-config={cluster.config}", *_node_args(cluster.temp_dir, 0)], env)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    cluster = start_autoscaling_cluster(tmp_path_factory.mktemp("autoscaler"))
    yield cluster
    cluster.stop()


def _sweep(cfg: Path, tmp_path: Path, cluster: _Cluster, *extra: str, data_root: Path) -> subprocess.CompletedProcess:
    cmd = sweep_command(cfg, data_root, f"storage.path={tmp_path / 'shared'}", "--address", cluster.address, *extra)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=cluster_env(), timeout=600)


# The actors that train: Ray Train's workers, and a one-worker trial's own Tune actor.
TRAIN_WORKER, IN_PROCESS_TRIAL = "RayTrainWorker", "ImplicitFunc"


# Run in a new process, with the cluster's token (cluster_env): the actors of a class the
# cluster ran, dead ones included, from its dashboard (argv: dashboard, class name).
ACTORS_OF = """
import json, sys
from ray.util.state import list_actors
def actors_of(dashboard, class_name=None):
    filters = [("class_name", "=", class_name)] if class_name else None
    return list_actors(address=dashboard, filters=filters, limit=100, detail=True)
"""


def _train_workers(dashboard: str, class_name: str = TRAIN_WORKER) -> list[dict]:
    """The actors of `class_name` the cluster ran (dead ones included): node id and state."""
    code = ACTORS_OF + (
        "print(json.dumps([{'node': x.node_id, 'state': x.state, 'pid': x.pid} "
        "for x in actors_of(sys.argv[1], sys.argv[2])]))"
    )
    return _state_query(code, dashboard, class_name)


def _actor_census(dashboard: str) -> list[list]:
    """Every actor the cluster lists, dead ones included: class name, state, node id."""
    code = ACTORS_OF + "print(json.dumps([[x.class_name, x.state, x.node_id] for x in actors_of(sys.argv[1])]))"
    return _state_query(code, dashboard)


def _nodes_ever(dashboard: str) -> list[str]:
    """Every node the cluster had, removed ones included: their ids."""
    code = (
        "import json, sys; from ray.util.state import list_nodes; "
        "print(json.dumps([n.node_id for n in list_nodes(address=sys.argv[1], limit=1000, detail=True)]))"
    )
    return _state_query(code, dashboard)


def _state_query(code: str, *args: str):
    """What `code`, run in a new process with the cluster's token, prints last, as JSON."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=cluster_env()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _trial_runs(tmp_path: Path) -> list:
    c = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    return c, [r for r in runs if r.data.tags.get("deeplab.kind") == "trial"]


TINY = "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48, batch_size: 4}\n"


def test_exact_fit_nodes_under_a_head_without_cpu(exact_fit_cluster, synth_voc_root, tmp_path):
    """Two one-CPU nodes, trials of two one-CPU workers: each trial takes both nodes, one trial
    at a time. A trial driver that took a slice of a CPU would leave no room for a worker."""
    cfg = tmp_path / "exact.yaml"
    cfg.write_text(
        TINY + "train: {epochs: 2, num_workers: 2, cpus_per_worker: 1, visuals: 0}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: exact}\n"
        "space:\n  train.lr: {type: grid, values: [0.01, 0.02]}\n"
    )
    res = _sweep(cfg, tmp_path, exact_fit_cluster, data_root=synth_voc_root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    workers = _train_workers(exact_fit_cluster.dashboard)
    assert len(workers) == 4 and len({w["node"] for w in workers}) == 2, workers  # 2 trials x 2 workers, 2 nodes
    c, trials = _trial_runs(tmp_path)
    assert sorted(r.data.tags["deeplab.status"] for r in trials) == ["completed", "completed"]
    # every trial wrote its epochs and checkpoints under the one shared path
    for r in trials:
        run_dir = tmp_path / "shared" / "exact" / "train" / r.data.tags["deeplab.trial_id"]
        assert sorted(p.name for p in (run_dir / "epochs").iterdir()) == ["epoch_0001.json", "epoch_0002.json"]


def _working_copy(dest: Path) -> Path:
    """The repository as a user's checkout has it: every file git tracks or would track (what
    `ray job submit --working-dir .` uploads), nothing it ignores."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((REPO / name).read_bytes())
    return dest


# A user's model, and one hook of the test's: while the file GATE names exists, training waits
# in its third step (the second epoch of 8 images in batches of 4), so that `ray job stop` (a
# new process, seconds) lands mid-trial however fast the machine trains.
USER_MODEL = """\
import os
import time

from torch import nn

GATE = %(gate)r
_steps = 0


class Tiny(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, x):
        global _steps
        _steps += self.training
        while self.training and _steps > 2 and os.path.exists(GATE):
            time.sleep(0.1)
        return self.net(x)


def build(num_classes, cfg):
    return Tiny(num_classes)
"""


def _job(cluster: _Cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", *args[:1], "--address", cluster.dashboard, *args[1:]],
        capture_output=True,
        text=True,
        env=cluster_env(),
        timeout=timeout,
    )


# Run in a new process: the preflight's check of a cluster's address alone (argv: address).
CHECK_ADDRESS = """
import sys
from deeplab_sweep.errors import UserInputError
from deeplab_sweep.search.cluster import cluster_address
from deeplab_sweep.search.job_config import ClusterConfig
try:
    cluster_address(ClusterConfig(), sys.argv[1])
except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_cluster_that_cannot_take_the_driver_is_one_line_before_anything_is_logged(
    exact_fit_cluster, synth_voc_root, tmp_path
):
    """Joined by its address, a cluster with Ray's token authentication on refuses a driver
    without the token: `deeplab sweep` says so in one line naming cluster.address and what to
    set, exit 2, before anything is logged (`ray.init` retried for a minute, a log line a second,
    with the sweep's parent run open). `deeplab train` with another token: refused the same way,
    before its MLflow experiment is made. The check alone at the cluster's dashboard port:
    something answers there that is not Ray (`ray.init` retried for minutes)."""
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        TINY + "sweep: {num_samples: 1, asha: {enabled: false}}\n"
        "space:\n  train.lr: {type: loguniform, low: 0.01, high: 0.1}\n"
    )
    no_token = cluster_env()
    del no_token["RAY_AUTH_MODE"], no_token["RAY_AUTH_TOKEN"]
    cmd = sweep_command(cfg, synth_voc_root, "--address", exact_fit_cluster.address)
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=no_token, timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stderr.startswith(f"error: cluster.address = '{exact_fit_cluster.address}': ")
    assert "set RAY_AUTH_MODE=token with the head's token" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "runs").exists(), "nothing logged, nothing stored"

    other_token = "1" * 64
    train = [sys.executable, "-m", "deeplab_sweep.cli", "train", str(CONF / "train" / "demo.yaml"), "--address"]
    dashboard = f"127.0.0.1:{exact_fit_cluster.dashboard_port}"
    for cmd, address, env, says in [
        (train, exact_fit_cluster.address, cluster_env(RAY_AUTH_TOKEN=other_token), "this driver's token"),
        ([sys.executable, "-c", CHECK_ADDRESS], dashboard, cluster_env(), "something answers there, but not a Ray"),
    ]:
        res = subprocess.run([*cmd, address], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2 and not (tmp_path / "runs").exists(), res.stderr[-3000:]
        said = res.stderr.splitlines()
        assert len(said) == 1 and said[0].startswith(f"error: cluster.address = '{address}': "), res.stderr[-3000:]
        assert says in said[0] and other_token not in res.stderr and TOKEN not in res.stderr, said[0]


def test_the_readmes_job_flow_with_a_users_own_model(exact_fit_cluster, synth_voc_root, tmp_path):
    """`ray job submit --working-dir .` from a checkout holding the user's own model package
    (importable only from the uploaded folder) and a checkpoint in best/ (ignored: never
    uploaded), with `--no-wait`; `ray job logs -f` until a trial reports, `ray job stop`: the
    sweep's runs end as on Ctrl-C; a job with `--resume` continues it to the end, the sweep's
    summary ends that job's log, and `deeplab best` from outside the job finds MLflow's runs and
    the checkpoint."""
    work = _working_copy(tmp_path / "checkout")
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    gate = tmp_path / "gate"
    (work / "mypkg" / "model.py").write_text(USER_MODEL % {"gate": str(gate)})
    (work / "best").mkdir()
    (work / "best" / "checkpoint.pt").write_bytes(b"\0" * 30_000_000)  # what `deeplab best --out best/` leaves
    (work / "job.yaml").write_text(
        TINY + 'model: {factory: "mypkg.model:build"}\n'
        "train: {epochs: 2, cpus_per_worker: 1, visuals: 0}\n"
        "sweep: {num_samples: 2, asha: {enabled: false}}\n"
        "space:\n  train.lr: {type: loguniform, low: 0.01, high: 0.1}\n"
    )
    shared = tmp_path / "shared"
    store = f"sqlite:///{shared}/mlflow.db"
    deeplab = str(Path(sys.executable).with_name("deeplab"))

    def sweep(name: str, *extra: str) -> tuple[str, ...]:
        # The uploaded folder must not hold best/: Ray leaves out what .gitignore names.
        return (
            "sh",
            "-c",
            " ".join(
                [
                    "test ! -e best && test -d mypkg &&",
                    deeplab,
                    "sweep job.yaml",
                    f"data.root={synth_voc_root}",
                    f"storage.path={shared}/ray",
                    f"mlflow.tracking_uri={store}",
                    f"mlflow.artifact_location={shared}/art",
                    f"sweep.name={name}",
                    *extra,
                ]
            ),
        )

    # The embedded defaults (runs/...) would land in the uploaded folder, which Ray deletes. A
    # credential on the entrypoint is kept by Ray in clear (its job table, the log's first line):
    # the driver warns of it, and prints it nowhere.
    res = _job(
        exact_fit_cluster,
        "submit",
        "--working-dir",
        str(work),
        "--",
        deeplab,
        "sweep",
        "job.yaml",
        f"data.root={synth_voc_root}",
        "--tracking-uri",
        "http://alice:EntryS3cret@127.0.0.1:9",
    )
    assert (
        res.returncode != 0
        and "storage.path: " in res.stdout
        and "inside this Ray job's uploaded working dir" in (res.stdout)
    ), res.stdout[-3000:]
    assert "warning: this Ray job's entrypoint holds a credential, which Ray keeps in clear" in res.stdout
    assert all(ln.startswith("Running entrypoint for job") for ln in res.stdout.splitlines() if "EntryS3cret" in ln)

    # --no-wait, the live log, `ray job stop` while the first trial waits at the gate in its
    # second epoch, then --resume without the gate.
    epochs = 3
    one_at_a_time = (f"train.epochs={epochs}", "sweep.max_concurrent=1")
    gate.touch()
    res = _job(
        exact_fit_cluster,
        "submit",
        "--no-wait",
        "--submission-id",
        "j2-run",
        "--working-dir",
        str(work),
        "--",
        *sweep("j2", *one_at_a_time),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    logs = subprocess.Popen(
        [RAY, "job", "logs", "-f", "--address", exact_fit_cluster.dashboard, "j2-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster_env(),
    )
    seen = []
    for line in logs.stdout:
        seen.append(line)
        if re.search(rf" running +[1-9]/{epochs} ", line):
            break
    assert any(" running " in ln for ln in seen), "".join(seen)[-3000:]
    stop = _job(exact_fit_cluster, "stop", "j2-run", timeout=120)
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    logs.wait(timeout=120)
    status = _job(exact_fit_cluster, "status", "j2-run")
    assert "Job 'j2-run' was stopped" in status.stdout, status.stdout
    c = MlflowClient(store)
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id], "tags.`deeplab.sweep` = 'j2'")
    parent = next(r for r in runs if r.data.tags["deeplab.kind"] == "sweep")
    assert (parent.info.status, parent.data.tags["deeplab.status"]) == ("KILLED", "interrupted"), (
        parent.data.tags,
        _job(exact_fit_cluster, "logs", "j2-run").stdout[-4000:],
    )
    assert any(
        r.data.tags.get("deeplab.status") == "interrupted" for r in runs if r.data.tags["deeplab.kind"] == "trial"
    )

    gate.unlink()
    res = _job(exact_fit_cluster, "submit", "--working-dir", str(work), "--", *sweep("j2", *one_at_a_time, "--resume"))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id], "tags.`deeplab.sweep` = 'j2'")
    assert sorted(r.data.tags["deeplab.kind"] for r in runs) == ["sweep", "trial", "trial"]
    trials = [r for r in runs if r.data.tags["deeplab.kind"] == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    for r in trials:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val/mIoU")] == list(range(1, epochs + 1))
    # The resumed job ran the sweep to its end: its summary ends the job's log, and `deeplab
    # best` from outside the job finds MLflow's runs and the checkpoint.
    assert "best trial " in res.stdout and "stopped by num_samples: all 2 trials ran" in res.stdout, res.stdout[-3000:]
    best = subprocess.run(
        [
            deeplab,
            "best",
            "--sweep",
            "j2",
            "--tracking-uri",
            store,
            "--out",
            str(tmp_path / "best"),
            "--json",
            "--model-factory",
            "mypkg.model:build",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**cluster_env(), "PYTHONPATH": f"{work}:{REPO}"},
    )
    assert best.returncode == 0, best.stderr[-3000:]
    assert Path(json.loads(best.stdout)["local_path"]).is_file()


def _kill_the_node_running(cluster: _Cluster, proc_title: str) -> int | None:
    """SIGKILL, as a machine dies, the node of `cluster` that runs a process titled `proc_title`
    (a Ray actor's): its raylet and every process it started. Found in /proc in milliseconds: a
    watcher asking Ray's state API (its imports and each query seconds on a busy machine) once
    saw a whole 4 s trial start and end before it answered. The actor's pid, or None."""
    raylets = [
        pid for pid in pids_naming(cluster.temp_dir) if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    for raylet in raylets:
        tree = descendants(raylet)
        actors = pids_naming(f"ray::{proc_title}", among=tree)
        if actors:
            for pid in [raylet, *tree]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return actors[0]
    return None


def test_worker_node_killed_mid_trial_resumes_on_another_node(exact_fit_cluster, synth_voc_root, tmp_path):
    """The node running a one-worker trial (its own Tune actor, training in process) dies after
    the trial's first checkpoint: Tune starts the trial on the other node, it resumes from the
    checkpoint it stored, and completes with every epoch once."""
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(
        TINY + "train: {epochs: 8, cpus_per_worker: 1, visuals: 0, max_failures: 2, keep_checkpoints: 10}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: kill}\n"
        "space:\n  train.lr: {type: grid, values: [0.01]}\n"
    )
    before = {w["pid"] for w in _train_workers(exact_fit_cluster.dashboard, IN_PROCESS_TRIAL)}
    killed: list[int] = []  # the trial's actor, killed with its node
    done = threading.Event()

    def kill_the_node_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        train_dir = tmp_path / "shared" / "kill" / "train"
        while (
            time.monotonic() < deadline and not done.is_set() and not list(train_dir.glob("*/epochs/epoch_0001.json"))
        ):
            time.sleep(0.1)
        if not done.is_set() and (actor := _kill_the_node_running(exact_fit_cluster, IN_PROCESS_TRIAL)):
            killed.append(actor)

    threading.Thread(target=kill_the_node_after_the_first_checkpoint, daemon=True).start()
    try:
        res = _sweep(cfg, tmp_path, exact_fit_cluster, data_root=synth_voc_root)
    finally:
        done.set()
    assert killed, "no worker node was killed: the test proved nothing"
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trial_actors = [w for w in _train_workers(exact_fit_cluster.dashboard, IN_PROCESS_TRIAL) if w["pid"] not in before]
    # the trial went on, on the other node
    assert killed[0] in {w["pid"] for w in trial_actors} and len({w["node"] for w in trial_actors}) == 2, trial_actors
    c, (run,) = _trial_runs(tmp_path)
    assert run.data.tags["deeplab.status"] == "completed"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/mIoU")] == list(range(1, 9))
    # From its checkpoint, not from scratch: no epoch trained twice, the restored one replayed.
    # The node may die after the checkpoint is stored and before its epoch's result reaches
    # Tune: that epoch is then only in the replayed rows.
    (result,) = (tmp_path / "shared" / "kill").glob("sweep_trial_*/result.json")
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    trained = [r["epoch"] for r in rows if not r.get("replayed")]
    replayed = [r["epoch"] for r in rows if r.get("replayed")]
    assert replayed and len(trained) == len(set(trained)), rows
    assert sorted(set(trained) | set(replayed)) == list(range(1, 9)), rows
    first_replayed = next(i for i, r in enumerate(rows) if r.get("replayed"))
    after = [r["epoch"] for r in rows[first_replayed:] if not r.get("replayed")]
    assert all(e > max(replayed) for e in after), rows  # no epoch up to the checkpoint trained again


def test_sweep_launched_at_zero_workers_grows_the_cluster(autoscaling_cluster, synth_voc_root, tmp_path):
    cfg = tmp_path / "grow.yaml"
    cfg.write_text(
        TINY + "train: {epochs: 2, cpus_per_worker: 1, resources_per_worker: {fake_gpu: 1}, visuals: 0}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: grow}\n"
        "space:\n  train.lr: {type: grid, values: [0.01, 0.02]}\n"
    )
    res = _sweep(
        cfg,
        tmp_path,
        autoscaling_cluster,
        "--cluster-config",
        str(autoscaling_cluster.config),
        data_root=synth_voc_root,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the trials waited for nodes, and said so, instead of failing
    assert "pending: waiting for 1 x {CPU: 1, fake_gpu: 1}" in res.stdout, res.stdout[-3000:]
    workers = _train_workers(autoscaling_cluster.dashboard, IN_PROCESS_TRIAL)
    # Should the trials' actors be missing: what this dashboard does list, and its nodes.
    assert workers, (_actor_census(autoscaling_cluster.dashboard), _nodes_ever(autoscaling_cluster.dashboard))
    assert FAKE_HEAD_ID not in {w["node"] for w in workers}  # on launched nodes, not the head
    # Nodes only for the trials: the head and at most max_workers (2), none launched and removed.
    assert len(_nodes_ever(autoscaling_cluster.dashboard)) <= 3
    c, trials = _trial_runs(tmp_path)
    assert sorted(r.data.tags["deeplab.status"] for r in trials) == ["completed", "completed"]
