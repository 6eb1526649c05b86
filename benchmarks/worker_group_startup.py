"""What Ray Train itself takes to start a worker group, with nothing of ours in it: a
`TorchTrainer` of N CPU workers whose train function only imports torch and notes the time,
fitted several times in one Ray session (as a sweep fits one per multi-worker trial). Prints,
per fit, the time from `fit()` to the train function running on every worker and to `fit()`
returning, and the actors Ray Train started for the fits.

    python benchmarks/worker_group_startup.py [--workers 2] [--fits 2]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path


def loop(config: dict) -> None:
    import ray.train
    import torch  # noqa: F401 - as any torch train function would

    rank = ray.train.get_context().get_world_rank()
    Path(config["marks"], f"rank{rank}").write_text(f"{time.time():.3f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fits", type=int, default=2)
    args = p.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.state import list_actors

    ray.init(num_cpus=args.workers, object_store_memory=100 * 2**20, include_dashboard=True, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.fits):
                marks = Path(tmp, f"marks{i}")
                marks.mkdir()
                start = time.time()
                TorchTrainer(
                    loop,
                    train_loop_config={"marks": str(marks)},
                    scaling_config=ScalingConfig(num_workers=args.workers),
                    run_config=RunConfig(storage_path=tmp, name=f"fit{i}"),
                ).fit()
                done = time.time()
                running = max(float(f.read_text()) for f in marks.iterdir())
                print(
                    f"fit {i}: train function on all {args.workers} workers after {running - start:5.1f} s, "
                    f"fit() returned after {done - start:5.1f} s"
                )
        started = collections.Counter(a.class_name for a in list_actors(limit=1000))
        print(f"actors started for {args.fits} fits: " + ", ".join(f"{n} x {k}" for k, n in sorted(started.items())))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
