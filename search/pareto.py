"""A multi-objective sweep's Pareto front in MLflow: a table (one row per front trial: run,
objectives, params, checkpoint), a plot, and a tag on each front trial's run."""

from __future__ import annotations

from deeplab_sweep.search import tracking
from deeplab_sweep.search.objectives import finite

FRONT_TABLE = "pareto_front.json"
FRONT_PLOT = "pareto_front.png"


def front_table(front: list, objectives: list[tuple[str, str]]) -> dict[str, list]:
    """Columns of the front (`TrialRow`s), sorted by the first objective (best first)."""
    metric, mode = objectives[0]
    rows = sorted(front, key=lambda r: r.values[metric], reverse=mode == "max")
    params = sorted({k for r in rows for k in r.params})
    return {
        "run_id": [r.run_id for r in rows],
        "trial_id": [r.trial_id for r in rows],
        **{m: [r.values[m] for r in rows] for m, _ in objectives},
        **{p: [str(r.params.get(p, "")) for r in rows] for p in params},
        "checkpoint": [r.checkpoint for r in rows],
    }


def log_pareto(c, parent: str, summary, objectives: list[tuple[str, str]]) -> None:
    front = summary.pareto_front
    c.log_metric(parent, "pareto/front_size", len(front))
    if front:
        c.log_table(parent, data=front_table(front, objectives), artifact_file=FRONT_TABLE)
    for row in front:
        if row.run_id:
            c.set_tag(row.run_id, tracking.PARETO_TAG, "true")
    figure = front_figure(summary.trials, front, objectives)
    c.log_figure(parent, figure, FRONT_PLOT)
    import matplotlib.pyplot as plt

    plt.close(figure)


def front_figure(trials: list, front: list, objectives: list[tuple[str, str]]):
    """The first objective against the second: every trial that ran in full, the front joined
    in order, the trials stopped early or failing a constraint apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (y, y_mode), (x, x_mode) = objectives[0], objectives[1]
    on_front = {r.trial_id for r in front}
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)

    def points(rows):
        rows = [r.values for r in rows if finite(r.values.get(x)) and finite(r.values.get(y))]
        return [v[x] for v in rows], [v[y] for v in rows]

    full = [r for r in trials if r.status == tracking.COMPLETED and r.trial_id not in on_front]
    stopped = [r for r in trials if r.status == tracking.PRUNED]
    ax.scatter(*points(stopped), marker="x", color="0.6", label=f"stopped early ({len(stopped)})")
    ax.scatter(*points(full), color="tab:blue", alpha=0.6, label=f"ran in full, not on the front ({len(full)})")
    fx, fy = points(sorted(front, key=lambda r: r.values[x]))
    ax.plot(fx, fy, "o-", color="tab:red", drawstyle="steps-post", label=f"Pareto front ({len(front)})")
    for r in front:
        ax.annotate(r.trial_id, (r.values[x], r.values[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{x} ({'lower' if x_mode == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y} ({'lower' if y_mode == 'min' else 'higher'} is better)")
    others = [m for m, _ in objectives[2:]]
    ax.set_title("Pareto front" + (f" (projected; also {', '.join(others)})" if others else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
