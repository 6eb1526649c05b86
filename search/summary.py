"""The end of a sweep: one typed summary (a row per trial, the best, the front, the compute it
took, why it stopped), written on the parent run and printed as a table.

A trial is judged by its values at its best checkpoint (by `sweep.metric`), as its MLflow
run's `best/<metric>` holds them: what Optuna was told, what the front and `deeplab best` use.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from dataclasses import dataclass, field

from ray.tune import Callback

from deeplab_sweep.search import tracking
from deeplab_sweep.search.early_stopping import read_check
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.objectives import cost_metric, feasible, pareto_front
from deeplab_sweep.search.overrides import trial_epochs, trial_overrides
from deeplab_sweep.trainable.credentials import redacted
from deeplab_sweep.trainable.run_folder import best_report, stored_checkpoints


@dataclass(frozen=True)
class TrialRow:
    trial_id: str | None
    params: dict
    epochs: int | None  # the last epoch it trained
    values: dict[str, float | None]  # at its best checkpoint: sweep.metric, the other objectives, constrained metrics
    status: str  # completed | pruned | failed
    cost: float | None
    error: str | None
    run_id: str | None
    checkpoint: str | None


@dataclass(frozen=True)
class Compute:
    epochs_trained: int
    epochs_if_all_ran_in_full: int
    cost_metric: str  # cost/cpu_hours or cost/gpu_hours
    cost: float

    @property
    def saved(self) -> float:
        """What early stopping saved: every trial run to its last epoch would have cost the rest."""
        full = self.epochs_if_all_ran_in_full
        return 1 - self.epochs_trained / full if full else 0.0


@dataclass
class SweepSummary:
    sweep: str
    parent_run_id: str
    experiment: str
    tracking_uri: str
    sweep_path: str
    runs_link: str  # where MLflow's UI shows the sweep's runs
    trials: list[TrialRow]
    best: TrialRow | None
    pareto_front: list[TrialRow] | None  # a sweep of several objectives only
    compute: Compute
    stop_reason: str
    optuna_states: dict[str, int] | None = None  # what Optuna was told: ASHA-stopped trials are PRUNED
    mlflow_error: str | None = None  # MLflow did not answer at the end: `deeplab sync` writes the rest
    asha_check: dict | None = None  # what ASHA's self-check measured and decided (sweep.asha.min_rank_corr)
    interrupted: bool = False  # Ctrl-C or `ray job stop` ended it with trials unfinished: --resume continues
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "compute": {**dataclasses.asdict(self.compute), "saved": self.compute.saved},
        }


def summarise(
    results, c, exp_id: str, job: JobConfig, folder: SweepFolder, parent: str, records: list, stop_reason: str
) -> SweepSummary:
    """Per-trial rows from Tune's results joined with the trials' MLflow runs: MLflow holds each
    trial's best values and checkpoint, also for trials finished before a resume (the callback
    that logged them may have been a previous process's). Without MLflow (`c` None: it did not
    answer), the same comes from Ray's results in the sweep folder (`records`)."""
    s = job.sweep
    runs = (
        {}
        if c is None
        else {
            r.data.tags.get(tracking.TRIAL_TAG): r
            for r in tracking.all_runs(c, [exp_id], tracking.sweep_filter(folder.name, tracking.KIND_TRIAL))
        }
    )
    known = {rec.trial_id for rec in records}
    rows = [_trial_row(r, runs, known, job, folder) for r in results]
    compute = Compute(
        epochs_trained=sum(row.epochs or 0 for row in rows),
        epochs_if_all_ran_in_full=sum(trial_epochs(r.config or {}, job.train.epochs) for r in results),
        cost_metric=cost_metric(job.train),
        cost=sum(row.cost or 0.0 for row in rows),
    )
    constraints = s.constraint_list()
    # A failed trial keeps its checkpoints for inspection but is not a candidate for best, nor
    # is one that breaks a constraint.
    scored = [
        row
        for row in rows
        if row.values.get(s.metric) is not None and not row.error and feasible(row.values, constraints)
    ]
    sign = 1 if s.mode == "max" else -1
    front = None
    if s.objectives:
        completed = [r for r in rows if r.status == tracking.COMPLETED]
        on_front = {id(v) for v in pareto_front([r.values for r in completed], s.objective_list, constraints)}
        front = [r for r in completed if id(r.values) in on_front]
    return SweepSummary(
        sweep=folder.name,
        parent_run_id=parent,
        experiment=job.mlflow.experiment,
        tracking_uri=redacted(job.mlflow.tracking_uri),
        sweep_path=folder.uri,
        runs_link=tracking.runs_link(redacted(job.mlflow.tracking_uri), exp_id),
        trials=rows,
        best=max(scored, key=lambda r: sign * r.values[s.metric]) if scored else None,
        pareto_front=front,
        compute=compute,
        stop_reason=stop_reason,
        asha_check=read_check(folder),
    )


def _trial_row(r, runs: dict, known: set, job: JobConfig, folder: SweepFolder) -> TrialRow:
    """One trial: its params, epochs, end, cost and its best checkpoint's values (from its
    MLflow run, else from its stored checkpoints)."""
    s = job.sweep
    trial_id = (r.metrics or {}).get("trial_id")
    run = runs.get(trial_id)
    names = (s.metric, *s.also_best)
    values = {m: run.data.metrics.get(tracking.best_metric(m)) for m in names} if run else dict.fromkeys(names)
    checkpoint = run.data.tags.get(tracking.BEST_CHECKPOINT_TAG) if run else None
    if run is None and trial_id in known:
        best = best_report(stored_checkpoints(folder.storage, folder.trial_dir(trial_id)), s.metric, s.mode)
        if best:
            values, checkpoint = {m: best.get(m) for m in names}, best["checkpoint_path"]
    epochs = (r.metrics or {}).get("epoch")
    error = str(r.error).splitlines()[0][:200] if r.error else None
    return TrialRow(
        trial_id=trial_id,
        params=trial_overrides(r.config or {}),
        epochs=epochs,
        values=values,
        status=tracking.end_status(error, epochs or 0, trial_epochs(r.config or {}, job.train.epochs)),
        cost=run.data.metrics.get(cost_metric(job.train)) if run else None,
        error=error,
        run_id=run.info.run_id if run else None,
        checkpoint=checkpoint,
    )


class PreloadSummary(Callback):
    """What the summary imports, loaded on a thread of its own once the first trial has reported:
    the end of a sweep then does not wait for it (optuna.importance alone imports scikit-learn,
    1.3 s here), and the first trial's actor, importing torch on a 2-core machine, does not share
    the CPU with it."""

    def __init__(self):
        self.started = False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.started:
            self.started = True
            threading.Thread(target=_preload, name="preload", daemon=True).start()


def _preload() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import optuna.importance  # noqa: F401


def log_summary(c, summary: SweepSummary, job: JobConfig, study, records=()) -> None:
    """The summary on the parent run: summary.json, the stop reason, the compute, the best, the
    front, the pictures of the search (`pictures.py`, from the trials' `records`), and (from
    Optuna's study) parameter importances."""
    from deeplab_sweep.search import pictures
    from deeplab_sweep.search.pareto import log_pareto

    parent, metric = summary.parent_run_id, job.sweep.metric
    c.log_dict(parent, summary.to_dict(), "summary.json")
    c.set_tag(parent, tracking.STOP_REASON_TAG, summary.stop_reason)
    compute = summary.compute
    c.log_metric(parent, "compute/epochs_trained", compute.epochs_trained)
    c.log_metric(parent, "compute/epochs_if_all_ran_in_full", compute.epochs_if_all_ran_in_full)
    c.log_metric(parent, "compute/saved_by_early_stopping", compute.saved)
    c.log_metric(parent, f"compute/{compute.cost_metric.split('/', 1)[1]}", compute.cost)
    if summary.best:
        c.log_metric(parent, tracking.best_metric(metric), float(summary.best.values[metric]))
        c.set_tag(parent, tracking.BEST_TRIAL_TAG, summary.best.trial_id)
        c.set_tag(parent, tracking.BEST_RUN_TAG, summary.best.run_id or "")
    if summary.pareto_front is not None:
        log_pareto(c, parent, summary, job.sweep.objective_list)
    for rung, rho in ((summary.asha_check or {}).get("rank_corr") or {}).items():
        if rho is not None:
            c.log_metric(parent, f"asha/rank_corr/epoch_{rung}", rho)
    pictures.log_all(c, parent, records, summary, job)
    if study is not None and sum(t.state.name == "COMPLETE" for t in study.trials) >= 2:
        with warnings.catch_warnings():
            # Optuna warns about small samples: expected in small sweeps.
            warnings.simplefilter("ignore")
            _log_importances(c, parent, study)


def _log_importances(c, parent: str, study) -> None:
    import optuna

    # With several objectives: importances for the first (the sweep's metric).
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=target
        )
        c.log_dict(parent, importances, "param_importances.json")
        for k, v in importances.items():
            c.log_metric(parent, f"importance/{k.replace('|', '_')}", float(v))
    except (ValueError, RuntimeError):
        pass  # too few distinct trials for an importance estimate


def summary_table(summary: SweepSummary, metric: str) -> str:
    lines = [f"{'trial':<14} {'epochs':>6} {metric:>10}  params"]
    for r in summary.trials:
        v = r.values.get(metric)
        lines.append(
            f"{r.trial_id or '?':<14} {r.epochs or 0:>6} {f'{v:.4f}' if v is not None else '-':>10}  "
            + " ".join(f"{k}={v}" for k, v in sorted(r.params.items()))
            + (f"  FAILED: {r.error}" if r.error else "")
        )
    compute = summary.compute
    lines.append(
        f"compute: {compute.epochs_trained} of {compute.epochs_if_all_ran_in_full} epochs "
        f"({compute.saved:.0%} saved by early stopping), {compute.cost:.4g} {compute.cost_metric.split('/', 1)[1]}"
    )
    if summary.pareto_front is not None:
        lines.append(f"Pareto front: {', '.join(r.trial_id for r in summary.pareto_front) or 'empty'}")
    check = summary.asha_check
    if check:
        measured = ", ".join(f"epoch {r} {rho:+.2f}" for r, rho in check["rank_corr"].items() if rho is not None)
        off = ", ".join(check["rungs_off"]) or "none"
        lines.append(
            f"asha self-check over {check['trials_in_full']} trials run in full: rank correlation with the last "
            f"epoch {measured or '-'}; rungs that stopped pruning: {off}"
        )
    lines.append(f"stopped by {summary.stop_reason}")
    return "\n".join(lines)
