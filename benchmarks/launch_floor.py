"""The floor under `deeplab sweep`'s launch on this machine, measured without any of this
project's code: a new process runs the smallest Ray Tune sweep that can train (one trial, a
local Ray started as the sweep starts it, the trial importing torch and torchvision and taking
one SGD step on a one-layer model), and reports launch to that step. Each arm adds to the
driver only imports that `deeplab sweep`'s driver needs before Ray starts (torch and
torchvision to build every model the space can draw, MLflow and Optuna); nothing is built,
checked or logged. What `sweep_overhead.py --launch` measures above these figures is the
project's own; below them no implementation on Tune can go.

    python benchmarks/launch_floor.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ARMS = {
    "Tune alone": [],
    "+ torch, torchvision in the driver": ["torch", "torchvision"],
    "+ torch, torchvision, MLflow, Optuna in the driver": ["torch", "torchvision", "mlflow", "optuna"],
}


def trial(config):
    """Tune's trial: what any trial of a DeepLab sweep does before its first step."""
    import torch
    import torchvision  # noqa: F401  (the backbones)

    model = torch.nn.Conv2d(3, 2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(torch.rand(1, 3, 48, 48)).mean().backward()
    optimizer.step()
    with open(config["out"] + ".step", "w") as f:
        f.write(str(time.time()))


def child(imports: list[str], out: str) -> None:
    import importlib

    for name in imports:
        importlib.import_module(name)
    import logging

    import ray
    from ray import tune

    marks = {"imports": time.time()}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100_000_000, logging_level=logging.WARNING)
    marks["Ray up"] = time.time()
    with tempfile.TemporaryDirectory() as storage:
        tune.Tuner(
            trial,
            param_space={"out": out},
            tune_config=tune.TuneConfig(num_samples=1),
            run_config=tune.RunConfig(storage_path=storage, name="floor", verbose=0),
        ).fit()
    with open(out, "w") as f:
        json.dump(marks, f)
    ray.shutdown()


def measure(imports: list[str]) -> dict[str, float]:
    """Seconds from launch to the driver's imports' end, Ray up, the trial's first step, and
    the process's exit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "marks.json")  # the driver's marks; the trial writes beside it
        start = time.time()
        cmd = [sys.executable, __file__, "--child", json.dumps(imports), out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.time()
        with open(out) as f:
            marks = json.load(f)
        with open(out + ".step") as f:
            marks["first step"] = float(f.read())
        marks["exit"] = end
        return {k: v - start for k, v in marks.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("IMPORTS", "OUT"))
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child[0]), args.child[1])
        return
    times: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeat):  # arms alternate: this machine's noise drifts over minutes
        for arm, imports in ARMS.items():
            times[arm].append(measure(imports))
    for arm, runs in times.items():
        print(f"{arm} (s from launch):")
        for mark in runs[0]:
            print(f"  {mark}: " + " / ".join(f"{r[mark]:.1f}" for r in runs))


if __name__ == "__main__":
    main()
