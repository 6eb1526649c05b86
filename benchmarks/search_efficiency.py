"""Search efficiency on generated data, in one run: how much compute (trained epochs) TPE + ASHA
spends before one of its trials reaches the best val mIoU that 16 random trials trained in full
found. Goal: under 40% of the random search's epochs.

    python benchmarks/search_efficiency.py [--trials 16] [--epochs 6] [--seed 0]

Both sweeps are real `run_sweep` calls (local Ray, sqlite MLflow in a temp folder) over the same
space; compute is counted from Ray's per-epoch results in time order, so epochs of trials
running side by side count as they happen.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.sweep import run_sweep
from deeplab_sweep.search.sync import read_trials
from deeplab_sweep.trainable.storage import Storage

CONF = Path(__file__).resolve().parents[1] / "conf"

SPACE = """\
defaults: [train/demo]
data: {max_train_images: 16, max_val_images: 8, crop_size: 64}
train: {epochs: %(epochs)d, cpus_per_worker: 0.95, visuals: 0, keep_checkpoints: 1}
sweep: {search: %(search)s, num_samples: %(trials)d, seed: %(seed)d, name: %(name)s,
        asha: {enabled: %(asha)s, grace_period: 1, reduction_factor: 2}}
space:
  train.lr: {type: loguniform, low: 0.001, high: 0.3}
  model.output_stride: {type: choice, values: [8, 16]}
  data.batch_size: {type: choice, values: [4, 8]}
"""


def sweep(tmp: Path, name: str, search: str, asha: bool, trials: int, epochs: int, seed: int) -> list[dict]:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(
        SPACE
        % {"epochs": epochs, "search": search, "trials": trials, "seed": seed, "name": name, "asha": str(asha).lower()}
    )
    job = load_job(
        cfg,
        [
            f"data.root={tmp / 'voc'}",
            "data.synthesize=true",
            f"storage.path={tmp / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        ],
        conf_root=CONF,
    )
    t = time.perf_counter()
    run_sweep(job)
    rows = [r for rec in read_trials(Storage(str(tmp / "ray" / name))) for r in rec.rows if not r.get("replayed")]
    print(f"{name}: {len(rows)} epochs in {time.perf_counter() - t:.0f} s", flush=True)
    return sorted(rows, key=lambda r: r["timestamp"])


def epochs_to_reach(rows: list[dict], target: float) -> int | None:
    for i, r in enumerate(rows, 1):
        if r["val/mIoU"] >= target:
            return i
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="search-eff-") as tmp:
        tmp = Path(tmp)
        rand = sweep(tmp, "random-full", "random", False, args.trials, args.epochs, args.seed)
        tpe = sweep(tmp, "tpe-asha", "tpe", True, args.trials, args.epochs, args.seed)
    budget = len(rand)
    best = max(r["val/mIoU"] for r in rand)
    print(f"random search, {args.trials} trials x {args.epochs} epochs: {budget} epochs, best val/mIoU {best:.4f}")
    print(
        f"TPE + ASHA, {args.trials} trials: {len(tpe)} epochs in all ({len(tpe) / budget:.0%}), "
        f"best val/mIoU {max(r['val/mIoU'] for r in tpe):.4f}"
    )
    out = {"random_epochs": budget, "random_best": best, "tpe_asha_epochs": len(tpe)}
    for frac in (1.0, 0.98, 0.95):
        n = epochs_to_reach(tpe, frac * best)
        out[f"epochs_to_{frac:.2f}"] = n
        shown = f"{n} epochs = {n / budget:.0%} of random's" if n else "not reached"
        print(f"  TPE + ASHA reaches {frac:.0%} of random's best ({frac * best:.4f}) after {shown}")
    print(json.dumps(out))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (driver)")


if __name__ == "__main__":
    main()
