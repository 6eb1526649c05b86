"""Search efficiency on generated data: four arms over the same space and seeds, each a real
`run_sweep` (local Ray, sqlite MLflow in a temp folder):

    random-full   random search, every trial trained to the last epoch (the reference)
    tpe-full      TPE, every trial trained in full
    random-asha   random search + ASHA
    tpe-asha      TPE + ASHA (the product's default)
    tpe-mv-asha   TPE with Optuna's advice for a conditional space searched in parallel
                  (multivariate + group, constant_liar) + ASHA

For each arm and seed: epochs trained, best val mIoU, and epochs until a trial first reached
95 / 98 / 100 % of random-full's best (counted from Ray's per-epoch results in time order, so
epochs of trials running side by side count as they happen); then the median over seeds. And,
over random-full's trials, the Spearman rank correlation between the val mIoU at epoch 1 / 2 and
at the last epoch: if early epochs do not predict the last one, no early stopping can work, and
the benchmark cannot judge it.

    python benchmarks/search_efficiency.py --seeds 0 1 2 3 4     # the figures (long)
    python benchmarks/search_efficiency.py --quick               # a smoke run, minutes
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.early_stopping import spearman
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.sweep import run_sweep
from deeplab_sweep.search.sync import read_trials

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_TPE = "{}"
PARALLEL_TPE = "{multivariate: true, constant_liar: true}"
ARMS = {  # search, ASHA, sweep.tpe
    "random-full": ("random", False, DEFAULT_TPE),
    "tpe-full": ("tpe", False, DEFAULT_TPE),
    "random-asha": ("random", True, DEFAULT_TPE),
    "tpe-asha": ("tpe", True, DEFAULT_TPE),
    "tpe-mv-asha": ("tpe", True, PARALLEL_TPE),
}
FRACTIONS = (0.95, 0.98, 1.0)

SPACE = """\
defaults: [train/demo]
data: {max_train_images: %(train_images)d, max_val_images: %(val_images)d, crop_size: 64}
train: {epochs: %(epochs)d, cpus_per_worker: 1, visuals: 0, keep_checkpoints: 1}
sweep: {search: %(search)s, num_samples: %(trials)d, seed: %(seed)d, name: %(name)s,
        asha: {enabled: %(asha)s, grace_period: %(grace)d, reduction_factor: %(factor)d},
        tpe: %(tpe)s}
space:
  train.lr: {type: loguniform, low: 0.001, high: 0.3}
  model.output_stride: {type: choice, values: [8, 16]}
  data.batch_size: {type: choice, values: [4, 8]}
"""


def sweep(tmp: Path, name: str, arm: str, seed: int, args) -> list[dict]:
    """Every epoch a sweep trained (replays of a restored checkpoint left out), in time order."""
    search, asha, tpe = ARMS[arm]
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(
        SPACE
        % {
            "epochs": args.epochs,
            "search": search,
            "trials": args.trials,
            "seed": seed,
            "name": name,
            "asha": str(asha).lower(),
            "tpe": tpe,
            "grace": args.grace,
            "factor": args.factor,
            "train_images": args.train_images,
            "val_images": args.val_images,
        }
    )
    job = load_job(
        cfg,
        [
            f"data.root={tmp / 'voc'}",
            "data.synthesize=true",
            f"storage.path={tmp / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"sweep.optuna_storage=sqlite:///{tmp}/optuna.db",
        ],
        conf_root=CONF,
    )
    t = time.perf_counter()
    run_sweep(job)
    rows = [
        {**r, "trial_id": rec.trial_id}
        for rec in read_trials(SweepFolder(str(tmp / "ray" / name)))
        for r in rec.rows
        if not r.get("replayed")
    ]
    print(f"{name}: {len(rows)} epochs in {time.perf_counter() - t:.0f} s", flush=True)
    return sorted(rows, key=lambda r: r["timestamp"])


def epochs_to_reach(rows: list[dict], target: float) -> int | None:
    for i, r in enumerate(rows, 1):
        if r["val/mIoU"] >= target:
            return i
    return None


def early_predicts_final(rows: list[dict], epochs: int) -> dict[str, float | None]:
    """Spearman correlation, over trials trained in full, of epoch e's val mIoU with the last's."""
    by_trial: dict[str, dict[int, float]] = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], {})[r["epoch"]] = r["val/mIoU"]
    full = [h for h in by_trial.values() if epochs in h]
    return {
        f"epoch{e}_vs_last": spearman([h[e] for h in full], [h[epochs] for h in full])
        for e in (1, 2)
        if e < epochs and all(e in h for h in full)
    }


def one_seed(seed: int, args) -> dict:
    out: dict = {"seed": seed}
    with tempfile.TemporaryDirectory(prefix="search-eff-") as tmp:
        runs = {arm: sweep(Path(tmp), f"{arm}-s{seed}", arm, seed, args) for arm in args.arms}
    reference = runs["random-full"]
    best = max(r["val/mIoU"] for r in reference)
    out["random_full_best"] = best
    out["correlation"] = early_predicts_final(reference, args.epochs)
    for arm, rows in runs.items():
        out[arm] = {
            "epochs": len(rows),
            "best": max(r["val/mIoU"] for r in rows),
            **{f"to_{f:.0%}": epochs_to_reach(rows, f * best) for f in FRACTIONS},
        }
    return out


def report(results: list[dict], args) -> None:
    budget = args.trials * args.epochs
    print(
        f"\n{args.trials} trials x {args.epochs} epochs per arm ({budget} epochs in full); ASHA grace "
        f"{args.grace}, factor {args.factor}; {args.train_images} train / {args.val_images} val images"
    )
    head = "".join(f"{'to ' + format(f, '.0%'):>9}" for f in FRACTIONS)
    print(f"{'seed':>4} {'arm':<13} {'epochs':>7} {'share':>6} {'best':>7}{head}")
    for res in results:
        for arm in args.arms:
            a = res[arm]
            reach = "".join(f"{a[f'to_{f:.0%}'] if a[f'to_{f:.0%}'] else 'never':>9}" for f in FRACTIONS)
            print(f"{res['seed']:>4} {arm:<13} {a['epochs']:>7} {a['epochs'] / budget:>6.0%} {a['best']:>7.4f}{reach}")
        corr = ", ".join(f"{k} {v:+.2f}" if v is not None else f"{k} -" for k, v in res["correlation"].items())
        print(f"{'':>4} random-full rank correlation: {corr}")
    print("median over seeds:")
    for arm in args.arms:
        share = statistics.median(r[arm]["epochs"] / budget for r in results)
        best = statistics.median(r[arm]["best"] for r in results)
        hits = {f: sum(1 for r in results if r[arm][f"to_{f:.0%}"]) for f in FRACTIONS}
        reach = ", ".join(f"{f:.0%} reached in {n}/{len(results)}" for f, n in hits.items())
        print(f"  {arm:<13} epochs {share:.0%} of full, best {best:.4f}; {reach}")
    print("goal (reach 98% of random-full's best within 50% of its epochs; median share <= 40%):")
    for arm in (a for a in args.arms if ARMS[a][1]):
        hits = sum(1 for r in results if (r[arm]["to_98%"] or budget + 1) <= 0.5 * budget)
        share = statistics.median(r[arm]["epochs"] / budget for r in results)
        print(f"  {arm:<13} {hits}/{len(results)} seeds, median share {share:.0%}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--grace", type=int, default=2)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--train-images", type=int, default=16)
    p.add_argument("--val-images", type=int, default=16)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--quick", action="store_true", help="a smoke run: one seed, 4 trials x 2 epochs")
    args = p.parse_args()
    if "random-full" not in args.arms:
        p.error("--arms must include random-full: the other arms are judged against it")
    if args.quick:
        args.seeds, args.trials, args.epochs = args.seeds[:1], 4, 2
    results = []
    for seed in args.seeds:
        results.append(one_seed(seed, args))
        print(json.dumps(results[-1]), flush=True)  # kept if a later seed dies
    report(results, args)
    print(json.dumps(results))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (driver)")


if __name__ == "__main__":
    main()
