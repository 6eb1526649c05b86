"""Where a sweep's driver stalls Tune's loop: the demo sweep run in this process, as
`deeplab sweep` runs it, with each of Python's full (generation 2) collections timed while
Tune runs (`gc.callbacks`), and each call of the searcher's `on_trial_result` and of Tune's
scheduler timed. Two arms in one run: the product as it is (what survives a full collection
is frozen, `sweep.FreezeSurvivors`), and the same with `gc.freeze` made a no-op (the driver as
it was). Ray Tune warns of "a performance bottleneck" when one of its calls takes over 0.5 s.

    python benchmarks/driver_pauses.py [--trials 8] [key=value ...]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

from deeplab_sweep.search.compose import load_job

CONF = Path(__file__).resolve().parents[1] / "conf"


class Timings:
    def __init__(self):
        self.pauses: list[float] = []  # full collections while Tune runs, s
        self.calls: dict[str, list[float]] = {}
        self.fitting = False
        self._start = 0.0

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif info["generation"] == 2 and self.fitting:
            self.pauses.append(time.perf_counter() - self._start)

    def timed(self, name: str, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.setdefault(name, []).append(time.perf_counter() - t)

        return call


def run(arm: str, trials: int, overrides: list[str]) -> Timings:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from deeplab_sweep.search import sweep
    from deeplab_sweep.search.searcher import OptunaSearcher

    timings = Timings()
    gc.callbacks.append(timings.on_gc)
    patched = [
        (OptunaSearcher, "on_trial_result"),
        (ASHAScheduler, "on_trial_result"),
        (tune.Tuner, "fit"),
    ]
    saved = [(cls, name, getattr(cls, name)) for cls, name in patched]
    freeze = gc.freeze
    try:
        OptunaSearcher.on_trial_result = timings.timed("searcher.on_trial_result", OptunaSearcher.on_trial_result)
        ASHAScheduler.on_trial_result = timings.timed("scheduler.on_trial_result", ASHAScheduler.on_trial_result)
        fit = tune.Tuner.fit

        def fitting(self):
            timings.fitting = True
            try:
                return fit(self)
            finally:
                timings.fitting = False

        tune.Tuner.fit = fitting
        if arm == "no-freeze":
            gc.freeze = lambda: None
        with tempfile.TemporaryDirectory() as tmp:
            job = load_job(
                CONF / "sweep" / "demo.yaml",
                [
                    f"sweep.num_samples={trials}",
                    f"data.root={tmp}/data",
                    f"storage.path={tmp}/ray",
                    f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                    f"mlflow.artifact_location={tmp}/art",
                    *overrides,
                ],
            )
            sweep.run_sweep(job)
    finally:
        gc.freeze = freeze
        for cls, name, fn in saved:
            setattr(cls, name, fn)
        gc.callbacks.remove(timings.on_gc)
        gc.unfreeze()
    return timings


def ms(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"{len(values)}, median {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms, "
        f"total {sum(values):.2f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    for arm in ("no-freeze", "freeze"):
        t = run(arm, args.trials, args.overrides)
        print(f"{arm}: full collections while Tune ran: {ms(t.pauses)}")
        for name, values in sorted(t.calls.items()):
            print(f"{arm}: {name}: {ms(values)}")


if __name__ == "__main__":
    main()
