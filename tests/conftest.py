"""Shared fixtures: generated datasets in the real layouts, and one real local Ray cluster
(2 CPUs, capped object store, dashboard on) shut down at the end of the session."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# The demo space's learning-curve table (benchmarks/learning_curves.py), and the space over
# what it holds: what stand-in trials report from.
DEMO_TABLE = REPO / "benchmarks" / "learning_curves" / "demo_space.csv"
DEMO_TABLE_SPACE = {
    "train.lr": "{type: loguniform, low: 0.005, high: 0.2}",
    "model.output_stride": "{type: choice, values: [8, 16]}",
    "data.crop_size": "{type: choice, values: [48, 64]}",
    "model.backbone": "{type: choice, values: [mobilenet_v2, resnet50]}",
    "data.batch_size": "{type: choice, values: [4, 8]}",
}


def sweep_command(cfg: Path, data_root: Path, *overrides: str) -> list[str]:
    """`deeplab sweep CFG` as a new process runs it, on the repository's conf/ and the given data."""
    return [
        sys.executable,
        "-m",
        "deeplab_sweep.cli",
        "sweep",
        str(cfg),
        "--conf-dir",
        str(CONF),
        f"data.root={data_root}",
        *overrides,
    ]


# Quiet, small, bounded: tests must never swap this 2-core machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# One torch thread per process (and per subprocess and Ray worker, which inherit it): the two
# xdist workers, their sweeps' trials and Ray's own processes share 2 cores, and OpenMP threads
# spinning over one another made a 13 s CPU test take 98 s and the cluster tests 4-6x longer.
# A test that wants more asks for them (`train.torch_threads`).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# What starts Ray or a server runs in one of two chains, one per xdist worker, each in order
# with its own session cluster and module fixtures (built once, not once per worker); the other
# tests go to whichever worker is free. A chain is a set of whole modules, known from the test
# id alone, which is all xdist's scheduler sees: xdist's own groups (`xdist_group` marks with
# `--dist loadgroup`) are silently dropped on pytest 9.2, which no longer reads the ids xdist
# rewrites (pytest-dev/pytest-xdist#1386). The chains are split to take about as long.
# The chains run at once: a test that kills or counts Ray processes must find its own by more
# than a name (`descendants`, `pids_naming`), or it hits the other chain's trials.
SERVICES = {
    "ray_cluster",
    "ray_tmpdir",
    "mlflow_server",
    "s3_service",
    "s3_server",
    "exact_fit_cluster",
    "autoscaling_cluster",
}
CHAINS = {
    "services-1": {"test_cluster.py", "test_sweep.py", "test_packaging.py", "test_driver_scale.py"},
    "services-2": {
        "test_faults.py",
        "test_ray_train.py",
        "test_pareto.py",
        "test_security.py",
        "test_import_checkpoint.py",
        "test_models.py",
        "test_replay.py",
        "test_model_factory.py",
        "test_mlflow_model.py",
    },
}
CHAIN_OF = {module: chain for chain, modules in CHAINS.items() for module in modules}


def pytest_runtest_setup(item):
    needs_service = item.get_closest_marker("slow") or SERVICES & set(getattr(item, "fixturenames", ()))
    if needs_service and item.path.name not in CHAIN_OF:
        pytest.fail(f"{item.path.name} starts Ray or a server: give it a chain in tests/conftest.py's CHAINS")


def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by module, with each chain's modules as one unit of work (for `-n`
    alone: another `--dist` asked for is left to xdist)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Chains(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return CHAIN_OF.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)

    return Chains(config, log)


@pytest.fixture(scope="session")
def synth_voc_root(tmp_path_factory) -> Path:
    from deeplab_sweep.datasets.synth import synth_voc

    return synth_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def synth_cityscapes_root(tmp_path_factory) -> Path:
    from deeplab_sweep.datasets.synth import synth_cityscapes

    return synth_cityscapes(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture
def voc_copy(synth_voc_root, tmp_path) -> Path:
    """A private copy a test may damage."""
    dest = tmp_path / "voc"
    shutil.copytree(synth_voc_root, dest)
    return dest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # Ray puts the driver's working directory on the workers' sys.path: the repo root,
        # so that they import test helpers such as `tests.toy_model` (a test may have chdir-ed).
        with contextlib.chdir(REPO):
            ray.init(
                num_cpus=2,
                object_store_memory=150 * 1024 * 1024,
                include_dashboard=True,
                log_to_driver=False,
                configure_logging=False,
            )
    yield
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder: the embedded defaults (runs/...) land inside it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pids_naming(needle: str, among: list[int] | None = None) -> list[int]:
    """Every process (of `among`, if given) whose command line names `needle`, such as a Ray
    temp folder of the test's own."""
    if among is None:
        among = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]
    pids = []
    for pid in among:
        if pid != os.getpid():
            try:
                if needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                pass
    return pids


def descendants(pid: int) -> list[int]:
    """Every process `pid` started, and theirs, down the tree."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def stop_processes_naming(folder: str) -> None:
    """Exactly the processes of a Ray the test started (never `ray stop`: it would also stop
    any other Ray on the machine, such as the test session's own cluster)."""
    import signal
    import time

    # SIGTERM first, for a clean exit; then SIGKILL. Sent again each round: a process that
    # survives a moment may have started others (Ray's fake autoscaler launches nodes).
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        deadline = time.monotonic() + grace
        while (pids := pids_naming(folder)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.3)


@pytest.fixture
def ray_tmpdir():
    """A private RAY_TMPDIR for a local Ray that a test's subprocess starts: its processes are
    found by it and stopped at the end, and none may be left."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths live under it
    yield folder
    stop_processes_naming(folder)
    left = pids_naming(folder)
    shutil.rmtree(folder, ignore_errors=True)
    assert not left, f"processes of the test's Ray still running: {left}"


def random_checkpoint(folder: Path, *overrides: str, metrics: dict | None = None) -> Path:
    """A checkpoint of the demo's model (with `overrides`) at random weights, with batch-norm
    statistics that are not the identity."""
    import torch

    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.trainable.checkpoint import save_checkpoint
    from deeplab_sweep.trainable.models import build_from_config

    base = ["data.root=unused", "model.pretrained_backbone=false"]
    cfg = load_job(CONF / "train" / "demo.yaml", [*base, *overrides]).run
    torch.manual_seed(0)
    model = build_from_config(cfg.model, cfg.data.num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {"model_state": model.state_dict(), "config": cfg.to_dict(), "epoch": 3}
    return save_checkpoint(folder, **state, metrics=metrics or {"val/mIoU": 0.5})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, server, timeout_s: float, what: str) -> None:
    """Poll `url` until it answers; a server whose process exits, or that stays silent past
    `timeout_s`, is stopped and the test fails saying which."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                server.stop()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.3)


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 over a sqlite store in `folder`; it can be
    stopped and started again on the same port and store (a tracking server outage)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{folder}/server.db"
        self.proc = None

    def requests(self, path: str) -> int:
        """How many requests to `path` the server has answered (its access log)."""
        return (self.folder / "server.log").read_text().count(f" {path} HTTP/")

    def start(self, timeout_s: float = 90) -> None:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "deeplab_sweep.cli", "ui", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--store", self.store, "--artifacts", str(self.folder / "art")]
        with open(self.folder / "server.log", "ab") as log:  # its access log: the requests it answered
            # As `deeplab ui` starts it: the server replaces that process.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_answering(f"{self.url}/health", self, timeout_s, "mlflow server")

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, stopped at the end."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


class S3Server:
    """A real S3-compatible server (moto's) on 127.0.0.1, and the environment that points
    pyarrow (Ray's storage), boto3 and MLflow at it."""

    def __init__(self):
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until_answering(self.url, self, 60, "moto server")
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
        }

    def new_bucket(self) -> str:
        import uuid

        import boto3

        name = f"deeplab-test-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_service():
    """One S3 server for the test session (a worker's): tests share it, each in its own bucket."""
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_server(s3_service):
    """The session's S3 server, seen through a bucket of this test's own (`.bucket`, `.env`, `.url`)."""
    from types import SimpleNamespace

    return SimpleNamespace(bucket=s3_service.new_bucket(), env=s3_service.env, url=s3_service.url)
