"""The searcher's cost on the sweep's driver: `suggest` (Optuna's ask, and the model's draw)
and `on_trial_complete` (tell) per trial, and `on_trial_result` per epoch, with the sweep's own
Optuna storage (sqlite), as the study grows to `--trials` trials. Each trial reports the epochs
of an LCBench curve up to where ASHA (grace 2, a third going on) would stop it, as a sweep does.

    python benchmarks/searcher_cost.py [--trials 220] [--at 100 200] [--arms random tpe tpe-rungs gp]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.curves import Table
from deeplab_sweep.search.searcher import build_searcher
from deeplab_sweep.search.tracking import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "benchmarks" / "learning_curves" / "lcbench" / "lcbench_3945.csv.gz"
SPACE = {
    "train.lr": "{type: loguniform, low: 0.0001, high: 0.1}",
    "train.momentum": "{type: choice, values: [0.1, 0.4, 0.7, 0.95]}",
    "train.weight_decay": "{type: loguniform, low: 0.00001, high: 0.1}",
    "data.batch_size": "{type: choice, values: [16, 51, 161, 512]}",
}
ARMS = {
    "random": ["sweep.search=random"],
    "tpe": ["sweep.search=tpe"],
    "tpe-rungs": ["sweep.search=tpe", "sweep.learn_from_rungs=true"],
    "gp": ["sweep.search=gp"],
    "gp-rungs": ["sweep.search=gp", "sweep.learn_from_rungs=true"],
}


def run(arm: str, trials: int, table: Table, folder: str) -> dict[str, list[float]]:
    from deeplab_sweep.search.overrides import trial_overrides

    overrides = [
        "data.root=unused",
        "train.epochs=52",
        "sweep.metric=val/accuracy",
        f"sweep.num_samples={trials}",
        f"sweep.optuna_storage={resolve_tracking_uri(f'sqlite:///{folder}/{arm}.db', 'optuna')}",
        "sweep.asha.grace_period=2",
        "sweep.asha.reduction_factor=3",
        # Each arm's own search, throughout (gp-rungs' draws are what the demo's hand-over draws).
        "sweep.budget.epochs=null",
        "sweep.hand_over.at=null",
        "sweep.learn_from_rungs=false",
        *(f"space.{k}=null" for k in ("model.output_stride", "data.crop_size", "model.backbone")),
        *(f"space.{k}={v}" for k, v in SPACE.items()),
        *ARMS[arm],
    ]
    job = load_job(REPO / "conf" / "sweep" / "demo.yaml", overrides)
    searcher, _ = build_searcher(job, arm)
    out: dict[str, list[float]] = {"suggest": [], "on_trial_result": [], "on_trial_complete": []}
    stop_at = [2] * 6 + [6] * 2 + [18] + [52]  # where ASHA stops 1 in 10 trials: 6 at 2, 2 at 6, ...
    for i in range(trials):
        trial_id = f"t{i:05d}"
        t = time.perf_counter()
        config = searcher.suggest(trial_id)
        out["suggest"].append(time.perf_counter() - t)
        _, curve = table.lookup(trial_overrides(config))
        for report in curve[: stop_at[i % len(stop_at)]]:
            t = time.perf_counter()
            searcher.on_trial_result(trial_id, report)
            out["on_trial_result"].append(time.perf_counter() - t)
        t = time.perf_counter()
        searcher.on_trial_complete(trial_id, report)
        out["on_trial_complete"].append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=220)
    p.add_argument("--at", type=int, nargs="+", default=[200], help="report ask + tell around these many trials")
    p.add_argument("--arms", nargs="+", default=["random", "tpe", "tpe-rungs", "gp"], choices=list(ARMS))
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    table = Table.from_csv(TABLE, tuple(SPACE))
    with tempfile.TemporaryDirectory() as folder:
        for arm in args.arms:
            with contextlib.redirect_stderr(io.StringIO()):
                times = run(arm, args.trials, table, folder)
            result = times["on_trial_result"][len(times["on_trial_result"]) // 2 :]
            for at in args.at:
                window = slice(max(0, at - 10), at + 10)
                asks, tells = times["suggest"][window], times["on_trial_complete"][window]
                ask_tell = [a + b for a, b in zip(asks, tells, strict=True)]
                print(
                    f"{arm}: ask + tell at n = {at - 10}-{at + 10}: median "
                    f"{statistics.median(ask_tell) * 1000:.1f} ms, max {max(ask_tell) * 1000:.1f} ms",
                    flush=True,
                )
            print(
                f"{arm}: on_trial_result (the later half): median "
                f"{statistics.median(result) * 1000:.2f} ms, max {max(result) * 1000:.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
