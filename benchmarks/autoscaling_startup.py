"""Launch to first trial start on an autoscaling cluster that starts with no worker node: the
cluster of tests/test_cluster.py (a CPU-less head, Ray's fake multi-node autoscaler, worker
nodes of {CPU: 1, fake_gpu: 1}), one `deeplab sweep` of one trial asking for one such worker.

Prints the time of each step, from the command's launch: the sweep said its trial was pending
(preflight, joining Ray, Tune), the worker node up (the autoscaler), the trial started (its
actor placed on that node: a one-worker trial trains in it), the first epoch reported (torch,
data, one tiny epoch). Run from the repo root:
`.venv/bin/python benchmarks/autoscaling_startup.py`."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplab_sweep.datasets.synth import synth_voc  # noqa: E402
from tests.conftest import sweep_command  # noqa: E402
from tests.test_cluster import TINY, cluster_env, start_autoscaling_cluster  # noqa: E402


def worker_nodes_up(cluster) -> int:
    code = (
        f"import ray; ray.init(address={cluster.address!r}, logging_level='ERROR'); "
        "print('NODES', sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('fake_gpu')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cluster_env(), timeout=60)
    counts = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("NODES ")]
    return int(counts[-1]) if counts else 0


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="as-bench-") as tmp:
        tmp = Path(tmp)
        data = synth_voc(tmp / "voc")
        cfg = tmp / "one.yaml"
        cfg.write_text(
            TINY + "train: {epochs: 1, cpus_per_worker: 1, resources_per_worker: {fake_gpu: 1}, visuals: 0}\n"
            "sweep: {search: grid, num_samples: 1, asha: {enabled: false}, name: one}\n"
            "space:\n  train.lr: {type: grid, values: [0.01]}\n"
        )
        cluster = start_autoscaling_cluster(tmp)
        events: dict[str, float] = {}
        try:
            cmd = sweep_command(
                cfg,
                data,
                f"storage.path={tmp / 'shared'}",
                "--address",
                cluster.address,
                "--cluster-config",
                str(cluster.config),
            )
            t0 = time.monotonic()
            proc = subprocess.Popen(
                cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster_env()
            )

            def watch_nodes():
                while proc.poll() is None and "node up" not in events:
                    if worker_nodes_up(cluster):
                        events["node up"] = time.monotonic() - t0
                    time.sleep(0.2)

            threading.Thread(target=watch_nodes, daemon=True).start()
            for line in proc.stdout:
                for word, name in (
                    (" started ", "trial started (its actor on the new node)"),
                    (" pending ", "said pending"),
                    (" running ", "first epoch reported"),
                ):
                    if word in line and name not in events:
                        events[name] = time.monotonic() - t0
            proc.wait()
            events["sweep done"] = time.monotonic() - t0
        finally:
            cluster.stop()
        print(json.dumps({k: round(v, 1) for k, v in sorted(events.items(), key=lambda kv: kv[1])}, indent=2))


if __name__ == "__main__":
    main()
