"""`deeplab ui` start-up: seconds until the MLflow server answers, and the processes and CPU
seconds its process tree has used 10 s later, with MLflow's job runner on (MLflow's default)
and off (what `deeplab ui` sets), alternating, on a new store each time.

    python benchmarks/ui_startup.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import free_port  # noqa: E402


def one(job_execution: str) -> str:
    folder, port = tempfile.mkdtemp(), free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": job_execution}
    cmd = [sys.executable, "-m", "deeplab_sweep.cli", "ui", "--port", str(port)]
    cmd += ["--store", f"sqlite:///{folder}/mlflow.db", "--artifacts", f"{folder}/artifacts"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("the server exited before it answered") from None
                time.sleep(0.2)
        answers = time.monotonic() - start
        time.sleep(10)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        cpu = sum(p.cpu_times().user + p.cpu_times().system for p in tree)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return f"job runner {job_execution:5}: answers after {answers:.1f} s; {len(tree)} processes, {cpu:.1f} s of CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    for _ in range(args.repeat):
        for job_execution in ("true", "false"):
            print(one(job_execution), flush=True)


if __name__ == "__main__":
    main()
