"""`deeplab ui`: the MLflow UI and tracking API over the local store, on 127.0.0.1 by default."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from deeplab_sweep.cli.common import command
from deeplab_sweep.trainable.run_config import DEFAULT_ARTIFACTS, DEFAULT_TRACKING_URI

NAME = "ui"


def add(sub) -> None:
    u = command(
        sub,
        NAME,
        "serve the MLflow UI and tracking API over the local store (127.0.0.1 by default)",
        """\
        Start `mlflow server` on the project's store. It binds 127.0.0.1 unless --host says
        otherwise: MLflow's server has no authentication, so anyone who can reach the port can
        read and change every run. Reach it from elsewhere through an SSH tunnel.""",
        """
        deeplab ui                                   # http://127.0.0.1:5000
        deeplab ui --port 5001 --store sqlite:///runs/mlflow.db
        ssh -L 5000:127.0.0.1:5000 head-node         # from your laptop""",
    )
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--store", default=DEFAULT_TRACKING_URI, help="backend store URI")
    u.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact folder for runs logged through it")


# MLflow's job runner (GenAI jobs such as scorers) is 8 more processes, each importing MLflow
# (about 12 s of CPU at every start on the 2-core build machine), for nothing a page of training
# runs shows. Set the variable to true to have it.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def run(args) -> int:
    from deeplab_sweep.search.tracking import resolve_tracking_uri

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"warning: binding {args.host}: the MLflow server has no authentication; anyone who reaches "
            f"port {args.port} can read and change every run",
            file=sys.stderr,
        )
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--backend-store-uri",
        resolve_tracking_uri(args.store),
        "--artifacts-destination",
        str(Path(args.artifacts).resolve()),
        "--workers",
        "1",
    ]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI: {base}", flush=True)
    for name, link in _runs_links(cmd[cmd.index("--backend-store-uri") + 1], base):
        # MLflow's UI opens an experiment on its GenAI overview; the runs are a page of their own.
        print(f"  training runs of {name!r}: {link}", flush=True)
    for var, value in SERVER_ENV.items():
        os.environ.setdefault(var, value)
    os.execv(sys.executable, cmd)  # the server replaces this process: Ctrl-C and signals reach it directly
    return 0


def _runs_links(store: str, base: str) -> list[tuple[str, str]]:
    """(experiment, its runs page) for each experiment the store holds (none when it is new)."""
    from deeplab_sweep.search.tracking import runs_link

    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        return []
    from mlflow.tracking import MlflowClient

    experiments = MlflowClient(store).search_experiments()
    return [(e.name, runs_link(base, e.experiment_id)) for e in experiments if e.name != "Default"]
