"""Pictures that explain a sweep's search, logged on its MLflow parent run, so a user can see
whether early stopping was right: every trial's learning curve, marked where ASHA stopped it
(`search_curves.png`); the best result so far against the epochs spent (`search_progress.png`);
what the rung check measured (`asha_check.png`); and the parameters of every trial against its
result (`parallel_coordinates.png`: one axis per space key, a conditional one included, its
labels readable)."""

from __future__ import annotations

import math

from deeplab_sweep.search import tracking

STOPPED, COMPLETED = "stopped by ASHA", "ran in full"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(records, summary, metric: str):
    """Each trial's metric by epoch; an x where ASHA stopped it, a dot where it ran in full."""
    plt = _plt()
    status = {r.trial_id: r.status for r in summary.trials}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for rec in records:
        points = sorted((r["epoch"], r[metric]) for r in rec.rows if r.get(metric) is not None and r.get("epoch"))
        if not points:
            continue
        line = ax.plot([e for e, _ in points], [v for _, v in points], lw=1, alpha=0.7)
        stopped = status.get(rec.trial_id) == tracking.PRUNED
        ax.plot(*points[-1], "x" if stopped else "o", color=line[0].get_color(), ms=8 if stopped else 5)
    ax.plot([], [], "kx", label=STOPPED)
    ax.plot([], [], "ko", ms=5, label=COMPLETED)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{len(records)} trials: each one's {metric} by epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def progress(records, metric: str, mode: str):
    """The best result reported so far against the epochs trained so far, in the order the
    trials reported (Tune's timestamps)."""
    plt = _plt()
    reports = sorted(
        (r.get("timestamp", 0), r.get("time_total_s", 0), r[metric])
        for rec in records
        for r in rec.rows
        if r.get(metric) is not None and not r.get("replayed")
    )
    best, xs, ys = None, [], []
    for spent, (_, _, value) in enumerate(reports, 1):
        best = value if best is None or (value > best if mode == "max" else value < best) else best
        xs.append(spent)
        ys.append(best)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.step(xs, ys, where="post")
    ax.set_xlabel("epochs evaluated so far, all trials")
    ax.set_ylabel(f"best {metric} so far")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def check(report: dict):
    """Each rung's rank correlation with the last epoch over the check's sample, the upper
    bound it was judged by, the threshold, and which rungs were turned off."""
    plt = _plt()
    rungs = sorted(report["rank_corr"], key=int)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs = range(len(rungs))
    rho = [report["rank_corr"][r] if report["rank_corr"][r] is not None else math.nan for r in rungs]
    upper = [(report.get("upper_bound") or {}).get(r) for r in rungs]
    colors = ["tab:red" if r in report["rungs_off"] else "tab:blue" for r in rungs]
    ax.bar(xs, rho, color=colors)
    ax.scatter(xs, [u if u is not None else math.nan for u in upper], marker="_", s=400, color="k", label="upper bound")
    ax.axhline(report["min_rank_corr"], color="gray", ls="--", label=f"min_rank_corr {report['min_rank_corr']:g}")
    ax.set_xticks(list(xs), [f"epoch {r}" + (" (off)" if r in report["rungs_off"] else "") for r in rungs])
    ax.set_ylim(-1, 1)
    ax.set_ylabel("Spearman with the last epoch")
    ax.set_title(f"ASHA's rungs over {report['trials_in_full']} trials run in full", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def parallel_coordinates(summary, space: dict, metric: str, mode: str):
    """One vertical axis per space key (a conditional key is one axis: its value, whichever
    branch drew it; a trial without it sits below the axis), the metric last; each trial a line
    coloured by its result, the best on top. Numbers on a log axis where the space is log."""
    plt = _plt()
    rows = [r for r in summary.trials if r.values.get(metric) is not None]
    keys = list(space)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * (len(keys) + 1)), 5), dpi=100)
    if not rows:
        return fig
    scaled: dict[str, list[float]] = {}
    ticks: dict[str, tuple[list[float], list[str]]] = {}
    for key in keys:
        values = [r.params.get(key) for r in rows]
        scaled[key], ticks[key] = _axis(values, space[key])
    results = [r.values[metric] for r in rows]
    lo, hi = min(results), max(results)
    scaled[metric] = [(v - lo) / ((hi - lo) or 1) for v in results]
    ticks[metric] = ([0, 1], [f"{lo:.4g}", f"{hi:.4g}"])
    axes = [*keys, metric]
    cmap = plt.get_cmap("viridis")
    order = sorted(range(len(rows)), key=lambda i: results[i] if mode == "max" else -results[i])
    for i in order:  # the best drawn last, on top
        quality = scaled[metric][i] if mode == "max" else 1 - scaled[metric][i]
        ax.plot(range(len(axes)), [scaled[a][i] for a in axes], color=cmap(quality), alpha=0.8, lw=1.4)
    for x, a in enumerate(axes):
        ax.axvline(x, color="k", lw=0.8)
        for y, label in zip(*ticks[a], strict=True):
            ax.text(x + 0.03, y, label, fontsize=7, va="center")
    ax.set_xticks(range(len(axes)), axes, rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.05)
    ax.set_xlim(-0.2, len(axes) - 0.5)
    ax.set_title(f"{len(rows)} trials: parameters against {metric} (colour: better is yellow)", fontsize=10)
    fig.tight_layout()
    return fig


def _axis(values: list, param) -> tuple[list[float], tuple[list[float], list[str]]]:
    """Positions in [0, 1] (missing: -0.08) and tick labels of one parameter's values."""
    present = [v for v in values if v is not None]
    numeric = present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    if param.type in ("loguniform", "uniform", "randint") or (numeric and len(set(present)) > 6):
        log = param.type == "loguniform"
        f = (lambda v: math.log(v)) if log else (lambda v: float(v))
        lo, hi = (
            f(param.low if param.low is not None else min(present)),
            f(param.high if param.high is not None else max(present)),
        )
        pos = [(f(v) - lo) / ((hi - lo) or 1) if v is not None else -0.08 for v in values]
        return pos, ([0, 1], [f"{param.low:g}", f"{param.high:g}"] if param.low is not None else ["", ""])
    choices = param.values or sorted({v for vs in (param.cases or {}).values() for v in vs}, key=str)
    place = {c: (i / (len(choices) - 1) if len(choices) > 1 else 0.5) for i, c in enumerate(choices)}
    return [place.get(v, -0.08) for v in values], (list(place.values()), [str(c) for c in choices])


def log_all(c, parent: str, records, summary, job) -> None:
    """The pictures on the parent run (each one skipped where the sweep has nothing to draw)."""
    plt = _plt()
    s = job.sweep
    figures = {
        "search_curves.png": curves(records, summary, s.metric),
        "search_progress.png": progress(records, s.metric, s.mode),
        "parallel_coordinates.png": parallel_coordinates(summary, job.space, s.metric, s.mode),
    }
    if summary.asha_check and summary.asha_check.get("rank_corr"):
        figures["asha_check.png"] = check(summary.asha_check)
    for name, fig in figures.items():
        c.log_figure(parent, fig, name)
        plt.close(fig)
