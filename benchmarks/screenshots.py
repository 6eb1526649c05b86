"""What a user sees of a multi-objective sweep in MLflow's UI, shot by a real headless browser
(Debian's `chromium`): the experiment's runs, the sweep's parent run, its Pareto PNG in the
artifact viewer, and a front trial's system metrics. Starts `deeplab ui` over the store on
127.0.0.1 and stops it at the end.

    python benchmarks/screenshots.py --tracking-uri sqlite:///runs/mlflow.db --sweep pareto-demo --out shots/
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import free_port  # noqa: E402


def shoot(url: str, out: Path, size: str = "1600,1000") -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                shutil.which("chromium") or "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                f"--window-size={size}",
                "--virtual-time-budget=20000",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"{out}  <- {url}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--sweep", required=True)
    p.add_argument("--experiment", default="deeplab")
    p.add_argument("--artifacts", default="runs/mlartifacts", help="the store's artifact root, served by the UI")
    p.add_argument("--out", type=Path, default=Path("shots"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    c = MlflowClient(args.tracking_uri)
    exp = c.get_experiment_by_name(args.experiment)
    sweep_filter = f"tags.`deeplab.sweep` = '{args.sweep}'"
    (parent,) = c.search_runs([exp.experiment_id], f"{sweep_filter} and tags.`deeplab.kind` = 'sweep'")
    front = c.search_runs([exp.experiment_id], f"{sweep_filter} and tags.`deeplab.pareto_front` = 'true'")

    port = free_port()
    server = subprocess.Popen(  # as a user serves it: `deeplab ui`, which becomes `mlflow server`
        [sys.executable, "-m", "deeplab_sweep.cli", "ui", "--port", str(port)]
        + ["--store", args.tracking_uri, "--artifacts", args.artifacts],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        run = f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
        shoot(f"{base}/#/experiments/{exp.experiment_id}/runs", args.out / "1_runs.png")
        shoot(run, args.out / "2_parent_run.png")
        shoot(f"{run}/artifacts/pareto_front.png", args.out / "3_parent_pareto_png.png")
        shoot(f"{run}/artifacts/pareto_front.json", args.out / "4_parent_pareto_table.png")
        if front:
            trial = f"{base}/#/experiments/{exp.experiment_id}/runs/{front[0].info.run_id}"
            shoot(f"{trial}/system-metrics", args.out / "5_front_trial_system_metrics.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
