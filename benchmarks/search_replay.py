"""Search strategies judged at equal compute, on many seeds: each arm's sweep replayed on the
learning-curve table (`learning_curves.py`) through the product's own searcher, space,
completion rules and Ray Tune scheduler (`deeplab_sweep.search.replay`), every arm with the same
budget in epochs (`sweep.budget.epochs`: what random search spends on 16 trials in full).

    python benchmarks/search_replay.py                    # every arm, 30 seeds
    python benchmarks/search_replay.py --seeds 5 --arms random-full tpe-asha

Prints, per arm: the normalised regret of the best final mIoU found at 25 / 50 / 100 % of the
budget (median and interquartile range over seeds), the share of paired seeds on which it beats
random-full and a paired Wilcoxon signed-rank test against it (two-sided: whether the arm's
final regret differs from random-full's on the same seeds; "beats rf" gives the direction), and
the share of the budget at which its median run reaches random-full's median final best; then
the table's own figures: the rank correlation of epoch k with the last epoch, and the noise
between training seeds. Writes the anytime plot (median regret against budget, interquartile
band) as a PNG.

Regret: a trial's final mIoU is its mIoU at the last epoch, and counts once it has trained it;
the arm's best at a budget is the best final mIoU of its trials that ran in full within it;
normalised regret = (table's best - arm's best) / (table's best - table's mean), 0 for the best
configuration, 1 for an average one (and (best - worst) / (best - mean) while none has run in
full).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.early_stopping import spearman
from deeplab_sweep.search.replay import Table, replay

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "benchmarks" / "learning_curves" / "demo_space.csv"
METRIC, EPOCHS, FULL_TRIALS = "val/mIoU", 12, 16
FRACTIONS = (0.25, 0.5, 1.0)

# The demo's space over what the table holds: lr drawn on its log scale and looked up at the
# nearest of the table's 8 values; the batch size a free choice (the table has both for both).
BASE = [
    "data.root=unused",
    f"train.epochs={EPOCHS}",
    "sweep.num_samples=100000",  # the budget ends every arm
    f"sweep.budget.epochs={FULL_TRIALS * EPOCHS}",
    "sweep.max_concurrent=2",  # as the demo runs on 2 cores
    "space.data.batch_size={type: choice, values: [4, 8]}",
]
# ASHA as the demo sets it, without its self-check (the arm tpe-asha-check adds it).
ASHA = [
    "sweep.asha.enabled=true",
    "sweep.asha.grace_period=2",
    "sweep.asha.reduction_factor=2",
    "sweep.asha.min_rank_corr=null",
]
HYPERBAND = [  # brackets from epoch 1, 3 and 9, and one that never stops a trial
    "sweep.asha.enabled=true",
    "sweep.asha.grace_period=1",
    "sweep.asha.reduction_factor=3",
    "sweep.asha.brackets=4",
    "sweep.asha.min_rank_corr=null",
]
OFF = ["sweep.asha.enabled=false"]
PUBLISHED = (  # the reference implementation's defaults, in this space's terms
    "sweep.start_with=[{train.lr: 0.01, model.output_stride: 16, model.backbone: mobilenet_v2, "
    "data.crop_size: 64, data.batch_size: 8}]"
)
ARMS = {
    "random-full": ["sweep.search=random", *OFF],
    "tpe-full-s4": ["sweep.search=tpe", "sweep.tpe.startup_trials=4", *OFF],
    "tpe-full-s10": ["sweep.search=tpe", "sweep.tpe.startup_trials=10", *OFF],
    "gp-full": ["sweep.search=gp", "sweep.tpe.startup_trials=4", *OFF],
    "random-asha": ["sweep.search=random", *ASHA],
    "tpe-asha": ["sweep.search=tpe", "sweep.tpe.startup_trials=4", *ASHA],
    "random-hyperband": ["sweep.search=random", *HYPERBAND],
    "tpe-hyperband": ["sweep.search=tpe", "sweep.tpe.startup_trials=4", *HYPERBAND],
    "tpe-asha-published": ["sweep.search=tpe", "sweep.tpe.startup_trials=4", *ASHA, PUBLISHED],
    "tpe-asha-check": [
        "sweep.search=tpe",
        "sweep.tpe.startup_trials=4",
        *ASHA,
        "sweep.asha.min_rank_corr=0.5",
        "sweep.asha.check_trials=6",
    ],
}


def job_for(arm: str, seed: int, extra: list[str]):
    return load_job(REPO / "conf" / "sweep" / "demo.yaml", [*BASE, *ARMS[arm], f"sweep.seed={seed}", *extra])


def anytime(replayed, final: dict, budget: int) -> list[tuple[int, float | None]]:
    """(epochs spent, best final mIoU so far) after each epoch, in the order the sweep trained them."""
    best, out = None, []
    for spent, r in enumerate(replayed.reports[:budget], 1):
        if r["epoch"] == EPOCHS:
            value = final[replayed.configs[r["trial_id"]]]
            best = value if best is None else max(best, value)
        out.append((spent, best))
    return out


def regret(best: float | None, table_best: float, table_mean: float, table_worst: float) -> float:
    found = table_worst if best is None else best
    return (table_best - found) / (table_best - table_mean)


def table_figures(table: Table, seed1: Table | None) -> dict:
    final = table.final(EPOCHS, METRIC)
    configs = sorted(final)
    corr = {
        k: spearman([table.curves[c][k - 1][METRIC] for c in configs], [final[c] for c in configs])
        for k in range(1, EPOCHS)
    }
    out = {"configurations": len(configs), "rank_corr_with_last": corr}
    if seed1 is not None:
        other = seed1.final(EPOCHS, METRIC)
        both = [c for c in configs if c in other]
        if len(both) >= 3:
            diffs = [abs(final[c] - other[c]) for c in both]
            out["seeds"] = {
                "configurations": len(both),
                "rank_corr_seed0_seed1": spearman([final[c] for c in both], [other[c] for c in both]),
                "median_abs_diff": statistics.median(diffs),
                "mean_abs_diff": statistics.fmean(diffs),
            }
    return out


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--seeds", type=int, default=30)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "search_replay.png")
    p.add_argument("--override", nargs="*", default=[], help="key=value applied to every arm")
    args = p.parse_args()
    if "random-full" not in args.arms:
        p.error("--arms must include random-full: the other arms are judged against it")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    table = Table.from_csv(args.table)
    final = table.final(EPOCHS, METRIC)
    missing = grid_size(table) - len(final)
    if missing:  # a trial drawn there would have no curve: the replay needs the whole grid
        print(
            f"error: {args.table}: {missing} of {grid_size(table)} configurations are not trained for {EPOCHS} "
            "epochs yet; run benchmarks/learning_curves.py to finish the table (it resumes)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        seed1 = Table.from_csv(args.table, seed=1)
    except (IndexError, KeyError):
        seed1 = None
    best, mean, worst = max(final.values()), statistics.fmean(final.values()), min(final.values())
    budget = FULL_TRIALS * EPOCHS
    print(
        f"table {args.table.name}: {len(final)} configurations x {EPOCHS} epochs; final mIoU best {best:.4f}, "
        f"mean {mean:.4f}, worst {worst:.4f}; budget {budget} epochs per arm; {args.seeds} seeds",
        flush=True,
    )
    curves: dict[str, list[list[tuple[int, float | None]]]] = {a: [] for a in args.arms}
    trials: dict[str, list[int]] = {a: [] for a in args.arms}
    checks: dict[str, list] = {}
    start = time.perf_counter()
    for arm in args.arms:
        t = time.perf_counter()
        for seed in range(args.seeds):
            out = replay(job_for(arm, seed, args.override), table, seed=seed)
            curves[arm].append(anytime(out, final, budget))
            trials[arm].append(len(out.configs))
            if out.asha_check:
                checks.setdefault(arm, []).append(out.asha_check)
        print(f"  {arm}: {args.seeds} seeds in {time.perf_counter() - t:.1f} s", flush=True)
    results = report(args, curves, trials, checks, best, mean, worst, budget)
    results["table"] = table_figures(table, seed1)
    results["seconds"] = time.perf_counter() - start
    print_table(results["table"])
    plot(args.plot, curves, best, mean, worst, budget)
    print(json.dumps(results))


def grid_size(table: Table) -> int:
    """How many configurations the grid of the table's values holds."""
    return math.prod(len(table.values(k)) for k in table.keys)


def at(curve: list[tuple[int, float | None]], spent: int) -> float | None:
    return curve[min(spent, len(curve)) - 1][1]


def report(args, curves, trials, checks, best, mean, worst, budget) -> dict:
    from scipy.stats import wilcoxon

    reg = {
        arm: {f: [regret(at(c, int(f * budget)), best, mean, worst) for c in cs] for f in FRACTIONS}
        for arm, cs in curves.items()
    }
    reference_final = statistics.median(at(c, budget) or worst for c in curves["random-full"])
    out: dict = {"arms": {}}
    head = "".join(f"{'regret @' + format(f, '.0%'):>22}" for f in FRACTIONS)
    print(f"\n{'arm':<20}{'trials':>7}{head}{'beats rf':>10}{'Wilcoxon p2':>12}{'reaches rf':>12}")
    for arm in args.arms:
        row = {f"regret_{f:.0%}": quartiles(reg[arm][f]) for f in FRACTIONS}
        paired = [(a, b) for a, b in zip(reg[arm][1.0], reg["random-full"][1.0], strict=True)]
        wins = sum(a < b for a, b in paired)
        diffs = [a - b for a, b in paired if a != b]
        p = wilcoxon(diffs).pvalue if arm != "random-full" and len(diffs) >= 6 else None
        # The budget at which this arm's median best reaches random-full's median final best.
        medians = [statistics.median(at(c, s) or worst for c in curves[arm]) for s in range(1, budget + 1)]
        reach = next((s / budget for s, m in enumerate(medians, 1) if m >= reference_final), None)
        row.update(
            trials=statistics.median(trials[arm]),
            beats_random_full=wins / len(paired),
            wilcoxon_p=p,
            reaches_random_full_median_at=reach,
        )
        out["arms"][arm] = row
        cells = "".join(f"{q[1]:>8.3f} [{q[0]:.2f},{q[2]:.2f}]" for q in (row[f"regret_{f:.0%}"] for f in FRACTIONS))
        print(
            f"{arm:<20}{row['trials']:>7.0f}{cells}{row['beats_random_full']:>10.0%}"
            f"{(f'{p:.3g}' if p is not None else '-'):>12}{(f'{reach:.0%}' if reach else 'never'):>12}"
        )
    for arm, reports in checks.items():
        off = [len(r["rungs_off"]) for r in reports]
        corr = {}
        for r in reports:
            for rung, rho in r["rank_corr"].items():
                if rho is not None:
                    corr.setdefault(rung, []).append(rho)
        shown = ", ".join(
            f"epoch {k} {statistics.median(v):+.2f}" for k, v in sorted(corr.items(), key=lambda x: int(x[0]))
        )
        print(f"{arm}: rungs turned off per seed (median) {statistics.median(off)}; in-sweep rank correlation {shown}")
        out["arms"][arm]["self_check"] = {
            "rungs_off_median": statistics.median(off),
            "rank_corr_median": {k: statistics.median(v) for k, v in corr.items()},
        }
    return out


def print_table(fig: dict) -> None:
    corr = ", ".join(f"{k}: {v:+.2f}" for k, v in fig["rank_corr_with_last"].items() if v is not None)
    print(
        f"\ntable: rank correlation of epoch k with epoch {EPOCHS} over {fig['configurations']} configurations: {corr}"
    )
    if "seeds" in fig:
        s = fig["seeds"]
        print(
            f"table: training seed 0 against 1 over {s['configurations']} configurations: final mIoU rank correlation "
            f"{s['rank_corr_seed0_seed1']:+.2f}, |difference| median {s['median_abs_diff']:.3f}, "
            f"mean {s['mean_abs_diff']:.3f}"
        )


def plot(path: Path, curves, best, mean, worst, budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    xs = list(range(1, budget + 1))
    for arm, cs in curves.items():
        per_step = [[regret(at(c, s), best, mean, worst) for c in cs] for s in xs]
        q = [quartiles(v) for v in per_step]
        line = ax.plot([x / budget for x in xs], [m for _, m, _ in q], label=arm, lw=1.6 if "full" in arm else 1.2)
        ax.fill_between(
            [x / budget for x in xs],
            [lo for lo, _, _ in q],
            [hi for _, _, hi in q],
            alpha=0.08,
            color=line[0].get_color(),
        )
    ax.set_xlabel("share of the budget spent (epochs; 100% = 16 trials x 12 epochs)")
    ax.set_ylabel("normalised regret of the best final mIoU found")
    # Symmetric log: the arms differ by hundredths near 0, and start from regrets above 1.
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylim(0, 2.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(
        "median over seeds, interquartile band; 0 = the table's best, 1 = an average configuration", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    print(f"anytime plot: {path}")


if __name__ == "__main__":
    main()
