"""Search strategies judged at equal compute, on many seeds and on every learning-curve table
at once: each arm's sweep replayed through the product's own searcher, space, completion rules
and Ray Tune scheduler (`deeplab_sweep.search.replay`), with the same budget in epochs
(`sweep.budget.epochs`: what random search spends on 16 trials in full; `--budget-trials`),
2 trials at a time.

Tables (each with its own space, metric and epochs):
- `demo`: the demo space's own table (`learning_curves.py`: DeepLabv3+ on generated VOC data,
  12 epochs, val/mIoU), whose early epochs rank the final result poorly;
- `lcbench_<task>`: six OpenML tasks of LCBench (52 epochs, val/accuracy), trained by nobody
  here (`learning_curves/lcbench/README.md`: provenance, space, rank correlations).

    python benchmarks/search_replay.py                         # every table, every arm but SLOW's, 30 seeds
    python benchmarks/search_replay.py --seeds 5 --arms random-full tpe-asha --tables demo lcbench_3945
    python benchmarks/search_replay.py --first-seed 30 --budget-trials 8 --arms random-full random-asha

Prints per table, then pooled over the LCBench tables: per arm, the normalised regret of the
best final result found at 25 / 50 / 100 % of the budget (median [interquartile range] over
seeds), the share of paired seeds on which the arm's final regret is below random-full's, a
two-sided Wilcoxon signed-rank test of the paired final regrets against random-full's, and the
share of the budget at which the arm's median regret reaches random-full's median final
regret; and each table's own figures (how epoch k ranks the last epoch, noise between training
seeds where the table has two). Writes one anytime plot per table (median regret against the
budget, interquartile band) into one PNG, and every figure as JSON.

Regret: a trial's final result is its metric at the last epoch, and counts once it has trained
it; the arm's best at a budget is the best final result of its trials that ran in full within
it; normalised regret = (table's best - arm's best) / (table's best - table's mean), 0 for the
best configuration, 1 for an average one ((best - worst) / (best - mean) while none has run in
full).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CURVES = REPO / "benchmarks" / "learning_curves"
FULL_TRIALS = 16
FRACTIONS = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Task:
    """A table and the sweep that searches it: its space (config key -> YAML), metric, epochs."""

    name: str
    path: Path
    metric: str
    epochs: int
    space: tuple[tuple[str, str], ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.space)

    def overrides(self, full_trials: int) -> list[str]:
        return [
            "data.root=unused",
            f"train.epochs={self.epochs}",
            f"sweep.metric={self.metric}",
            "sweep.mode=max",
            "sweep.num_samples=100000",  # the budget ends every arm
            f"sweep.budget.epochs={full_trials * self.epochs}",
            "sweep.max_concurrent=2",
            # demo.yaml's own search off: each arm sets its own.
            "sweep.learn_from_rungs=false",
            "sweep.hand_over.at=null",
            *(f"space.{k}=null" for k in DEMO_KEYS if k not in self.keys),
            *(f"space.{k}={v}" for k, v in self.space),
        ]


DEMO_KEYS = ("train.lr", "model.output_stride", "data.crop_size", "model.backbone", "data.batch_size")
# The demo's space over what its table holds: lr on its log scale, looked up at the nearest of
# the table's 8 values; the batch size a free choice (the table has both for both backbones).
DEMO = Task(
    "demo",
    CURVES / "demo_space.csv",
    "val/mIoU",
    12,
    (
        ("train.lr", "{type: loguniform, low: 0.005, high: 0.2}"),
        ("model.output_stride", "{type: choice, values: [8, 16]}"),
        ("data.crop_size", "{type: choice, values: [48, 64]}"),
        ("model.backbone", "{type: choice, values: [mobilenet_v2, resnet50]}"),
        ("data.batch_size", "{type: choice, values: [4, 8]}"),
    ),
)
LCBENCH_SPACE = (
    ("train.lr", "{type: loguniform, low: 0.0001, high: 0.1}"),
    ("train.momentum", "{type: choice, values: [0.1, 0.4, 0.7, 0.95]}"),
    ("train.weight_decay", "{type: loguniform, low: 0.00001, high: 0.1}"),
    ("data.batch_size", "{type: choice, values: [16, 51, 161, 512]}"),
)
LCBENCH = [
    Task(f"lcbench_{task}", CURVES / "lcbench" / f"lcbench_{task}.csv.gz", "val/accuracy", 52, LCBENCH_SPACE)
    for task in (3945, 34539, 167168, 167190, 168868, 189866)
]
TASKS = {t.name: t for t in (DEMO, *LCBENCH)}

# Settings chosen once for every table (absolute epochs: the rungs sit at the same epochs).
ASHA = [
    "sweep.asha.enabled=true",
    "sweep.asha.grace_period=2",
    "sweep.asha.reduction_factor=3",
    "sweep.asha.min_rank_corr=null",
]
ASHA2 = [
    "sweep.asha.enabled=true",
    "sweep.asha.grace_period=2",
    "sweep.asha.reduction_factor=2",
    "sweep.asha.min_rank_corr=null",
]
HYPERBAND = [*ASHA, "sweep.asha.brackets=3"]  # brackets from epoch 2, 6 and 18; the last never stops below 52
OFF = ["sweep.asha.enabled=false"]
OLD_CHECK = ["sweep.asha.min_rank_corr=0.5", "sweep.asha.check_trials=4"]
CHECK = ["sweep.asha.min_rank_corr=0.5", "sweep.asha.check_trials=8", "sweep.asha.check_confidence=0.9"]
RUNGS = ["sweep.learn_from_rungs=true"]
ARMS = {
    "random-full": ["sweep.search=random", *OFF],
    "tpe-full": ["sweep.search=tpe", *OFF],
    "gp-full": ["sweep.search=gp", *OFF],
    "random-asha": ["sweep.search=random", *ASHA],
    "random-asha-rf2": ["sweep.search=random", *ASHA2],
    "tpe-asha": ["sweep.search=tpe", *ASHA],
    "gp-asha": ["sweep.search=gp", *ASHA],
    "random-hyperband": ["sweep.search=random", *HYPERBAND],
    "random-asha-check": ["sweep.search=random", *ASHA, *CHECK],
    "tpe-asha-check": ["sweep.search=tpe", *ASHA, *CHECK],
    "tpe-asha-rf2-check4": ["sweep.search=tpe", *ASHA2, *OLD_CHECK],  # the old default's settings
    "tpe-rungs-asha": ["sweep.search=tpe", *RUNGS, *ASHA],
    "tpe-rungs-asha-r50": ["sweep.search=tpe", *RUNGS, *ASHA, "sweep.tpe.random_share=0.5"],
    "tpe-rungs-hyperband": ["sweep.search=tpe", *RUNGS, *HYPERBAND],
    "gp-rungs-asha": ["sweep.search=gp", *RUNGS, *ASHA],
    # Random + ASHA, then a model's trials in full after a share of the budget (`sweep.hand_over`).
    "random-asha-gp25r": ["sweep.search=random", *ASHA, *RUNGS, "sweep.hand_over.at=0.25"],
    "random-asha-gp50r": ["sweep.search=random", *ASHA, *RUNGS, "sweep.hand_over.at=0.5"],
    "random-asha-gp50": ["sweep.search=random", *ASHA, "sweep.hand_over.at=0.5"],
    "random-asha-tpe50r": [
        "sweep.search=random",
        *ASHA,
        *RUNGS,
        "sweep.hand_over.at=0.5",
        "sweep.hand_over.search=tpe",
    ],
}
# Optuna's GP sampler on every trial ASHA starts takes about an hour of both cores at 30 seeds:
# left out unless named.
SLOW = ("gp-asha", "gp-rungs-asha")


@cache
def table(name: str, seed: int = 0):
    from deeplab_sweep.search.curves import Table

    task = TASKS[name]
    return Table.from_csv(task.path, task.keys, seed=seed)


def replay_one(args: tuple[str, str, int, tuple[str, ...]]) -> dict:
    """One arm's sweep on one table with one seed: its anytime curve and what it did."""
    import optuna

    from deeplab_sweep.search.compose import load_job
    from deeplab_sweep.search.replay import replay

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    task_name, arm, seed, extra, full_trials = args
    task, t = TASKS[task_name], time.perf_counter()
    job = load_job(
        REPO / "conf" / "sweep" / "demo.yaml", [*task.overrides(full_trials), *ARMS[arm], f"sweep.seed={seed}", *extra]
    )
    with contextlib.redirect_stderr(io.StringIO()):  # the self-check's decisions, counted below
        out = replay(job, table(task_name), seed=seed)
    final = table(task_name).final(task.epochs, task.metric)
    best, curve, full = None, [], []
    for r in out.reports[: full_trials * task.epochs]:
        if r["epoch"] == task.epochs:
            config = out.configs[r["trial_id"]]
            full.append(config)
            best = final[config] if best is None else max(best, final[config])
        curve.append(best)
    return {
        "task": task_name,
        "arm": arm,
        "seed": seed,
        "curve": curve,
        "trials": len(out.configs),
        "full": len(full),
        "full_repeats": len(full) - len(set(full)),
        "check": out.asha_check,
        "seconds": time.perf_counter() - t,
    }


def regret(best: float | None, ref: dict) -> float:
    found = ref["worst"] if best is None else best
    return (ref["best"] - found) / (ref["best"] - ref["mean"])


def at(curve: list, spent: int):
    return curve[min(spent, len(curve)) - 1] if curve else None


def quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], statistics.median(values), q[2]]


def references(task: Task) -> dict:
    final = table(task.name).final(task.epochs, task.metric)
    return {"best": max(final.values()), "mean": statistics.fmean(final.values()), "worst": min(final.values())}


def regrets(runs: list[dict], ref: dict, budget: int) -> list[list[float]]:
    """Per run, the regret after each epoch of the budget."""
    return [[regret(at(r["curve"], s), ref) for s in range(1, budget + 1)] for r in runs]


def judge(per_arm: dict[str, list[list[float]]], arms: list[str]) -> dict:
    """The figures of each arm over paired runs (the same seeds, tables in the same order):
    regret curves on a shared budget axis of 1000 steps (shares of each table's budget)."""
    from scipy.stats import wilcoxon

    rf = per_arm["random-full"]
    rf_final = statistics.median(c[-1] for c in rf)
    out = {}
    for arm in arms:
        curves = per_arm[arm]
        row = {f"regret_{f:.0%}": quartiles([c[int(f * len(c)) - 1] for c in curves]) for f in FRACTIONS}
        paired = [(a[-1], b[-1]) for a, b in zip(curves, rf, strict=True)]
        diffs = [a - b for a, b in paired if a != b]
        row["beats_random_full"] = sum(a < b for a, b in paired) / len(paired)
        row["wilcoxon_p"] = wilcoxon(diffs).pvalue if arm != "random-full" and len(diffs) >= 6 else None
        steps = len(curves[0])
        medians = [statistics.median(c[s] for c in curves) for s in range(steps)]
        row["reaches_random_full_median_at"] = next(
            ((s + 1) / steps for s, m in enumerate(medians) if m <= rf_final), None
        )
        out[arm] = row
    return out


def on_shares(curves: list[list[float]], steps: int = 1000) -> list[list[float]]:
    """Each curve resampled at `steps` equal shares of its own budget (tables differ in epochs)."""
    return [[c[max(0, math.ceil((i + 1) * len(c) / steps) - 1)] for i in range(steps)] for c in curves]


def print_judged(title: str, judged: dict, runs_by_arm: dict[str, list[dict]]) -> None:
    print(f"\n{title}")
    head = "".join(f"{'regret @' + format(f, '.0%'):>21}" for f in FRACTIONS)
    print(f"{'arm':<22}{'trials':>7}{'full':>6}{'rep':>5}{head}{'beats rf':>10}{'p (2-sided)':>12}{'reaches rf':>11}")
    for arm, row in judged.items():
        runs = runs_by_arm[arm]
        trials, full, repeats = (statistics.median(r[k] for r in runs) for k in ("trials", "full", "full_repeats"))
        cells = "".join(f"{q[1]:>7.3f} [{q[0]:.2f},{q[2]:.2f}]" for q in (row[f"regret_{f:.0%}"] for f in FRACTIONS))
        p, reach = row["wilcoxon_p"], row["reaches_random_full_median_at"]
        print(
            f"{arm:<22}{trials:>7.0f}{full:>6.0f}{repeats:>5.0f}{cells}{row['beats_random_full']:>10.0%}"
            f"{(f'{p:.2g}' if p is not None else '-'):>12}"
            f"{(f'{reach:.0%}' if reach else 'never'):>11}"
        )


def check_figures(runs: list[dict]) -> dict | None:
    """What the rung check measured and decided, over the runs of one arm on one table."""
    checks = [r["check"] for r in runs if r["check"]]
    if not checks:
        return None
    off: dict[str, int] = {}
    for c in checks:
        for rung in c["rungs_off"]:
            off[rung] = off.get(rung, 0) + 1
    return {"runs": len(checks), "rung_off_in_runs": dict(sorted(off.items(), key=lambda x: int(x[0])))}


def table_figures(task: Task) -> dict:
    from deeplab_sweep.search.early_stopping import spearman

    final = table(task.name).final(task.epochs, task.metric)
    configs = sorted(final)
    curves = table(task.name).curves
    ks = [k for k in (1, 2, 4, 6, 8, 16, 18, 32) if k < task.epochs]
    out = {
        "configurations": len(configs),
        "rank_corr_with_last": {
            k: spearman([curves[c][k - 1][task.metric] for c in configs], [final[c] for c in configs]) for k in ks
        },
    }
    try:
        other = table(task.name, seed=1).final(task.epochs, task.metric)
    except Exception:  # noqa: BLE001 - a table of one training seed
        return out
    both = [c for c in configs if c in other]
    diffs = [abs(final[c] - other[c]) for c in both]
    out["seeds"] = {
        "configurations": len(both),
        "rank_corr_seed0_seed1": spearman([final[c] for c in both], [other[c] for c in both]),
        "median_abs_diff": statistics.median(diffs),
    }
    return out


def plot(path: Path, panels: dict[str, dict[str, list[list[float]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), dpi=100, squeeze=False)
    for ax, (title, per_arm) in zip(axes.flat, panels.items(), strict=False):
        for arm, curves in per_arm.items():
            steps = len(curves[0])
            xs = [(s + 1) / steps for s in range(0, steps, max(1, steps // 200))]
            q = [quartiles([c[s] for c in curves]) for s in range(0, steps, max(1, steps // 200))]
            line = ax.plot(xs, [m for _, m, _ in q], label=arm, lw=1.8 if arm == "random-full" else 1.2)
            ax.fill_between(xs, [lo for lo, _, _ in q], [hi for _, _, hi in q], alpha=0.06, color=line[0].get_color())
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(0, 2.0)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("share of the budget (epochs)", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("normalised regret (median, IQR)", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    print(f"anytime plots: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=[a for a in ARMS if a not in SLOW], choices=list(ARMS))
    p.add_argument("--tables", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "search_replay.png")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "search_replay.json")
    p.add_argument("--override", nargs="*", default=[], help="key=value applied to every arm")
    p.add_argument("--budget-trials", type=int, default=FULL_TRIALS, help="the budget: epochs of this many full trials")
    args = p.parse_args()
    if "random-full" not in args.arms:
        p.error("--arms must include random-full: the other arms are judged against it")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    work = [(t, a, s, tuple(args.override), args.budget_trials) for t in args.tables for a in args.arms for s in seeds]
    start = time.perf_counter()
    results: dict = {
        "seeds": list(seeds),
        "budget_trials": args.budget_trials,
        "arms": {a: ARMS[a] for a in args.arms},
        "tables": {},
    }
    panels: dict[str, dict[str, list[list[float]]]] = {}
    pooled: dict[str, list[list[float]]] = {a: [] for a in args.arms}
    pooled_runs: dict[str, list[dict]] = {a: [] for a in args.arms}
    per_table = len(args.arms) * len(seeds)
    with ProcessPoolExecutor(args.workers) as pool:
        done = pool.map(replay_one, work, chunksize=2)
        for name in args.tables:  # each table's figures as soon as its replays are in
            runs = [next(done) for _ in range(per_table)]
            task = TASKS[name]
            ref, budget = references(task), args.budget_trials * task.epochs
            by_arm = {a: [r for r in runs if r["arm"] == a] for a in args.arms}
            per_arm = {a: regrets(by_arm[a], ref, budget) for a in args.arms}
            judged = judge(per_arm, args.arms)
            for a in args.arms:
                judged[a]["check"] = check_figures(by_arm[a])
                judged[a]["seconds_per_replay"] = statistics.fmean(r["seconds"] for r in by_arm[a])
            figures = table_figures(task)
            results["tables"][name] = {"references": ref, "table": figures, "arms": judged}
            corr = ", ".join(f"{k}: {v:+.2f}" for k, v in figures["rank_corr_with_last"].items() if v is not None)
            title = f"{name}: best {ref['best']:.4f}, mean {ref['mean']:.4f}; epoch k ~ last: {corr}"
            print_judged(title, judged, by_arm)
            print(f"  ({time.perf_counter() - start:.0f} s so far)", flush=True)
            panels[name] = per_arm
            if name.startswith("lcbench"):
                for a in args.arms:
                    pooled[a] += on_shares(per_arm[a])
                    pooled_runs[a] += by_arm[a]
    if any(pooled.values()):
        judged = judge(pooled, args.arms)
        results["pooled_lcbench"] = judged
        n = len([t for t in args.tables if t.startswith("lcbench")])
        print_judged(f"pooled over {n} LCBench tables x {len(seeds)} seeds", judged, pooled_runs)
        panels["pooled (LCBench)"] = pooled
    results["seconds"] = time.perf_counter() - start
    plot(args.plot, panels)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"figures: {args.json}")


if __name__ == "__main__":
    sys.exit(main())
