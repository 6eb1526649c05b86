"""`sweep.warm_start`: earlier sweeps' trials, read from MLflow, seed a new sweep's Optuna study
(`add_trials`), so TPE's first suggestions already model them and they are not run again.

A trial is taken when every searched key of the new space has a value it allows and it trained
for this sweep's epochs; otherwise it is skipped and counted. A sweep of other data or judged
on another metric is refused. Completed trials bring their objective values; trials ASHA stopped
come as PRUNED with their last value (what a stopped trial of this sweep is told); failed ones
are left out."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search import tracking
from deeplab_sweep.search.job_config import JobConfig, SearchParam
from deeplab_sweep.search.objectives import finite
from deeplab_sweep.search.space import param_name


@dataclass
class WarmStart:
    trials: list[FrozenTrial] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)  # for the sweep's completion criteria
    per_sweep: dict[str, int] = field(default_factory=dict)
    outside_space: int = 0
    other_settings: int = 0  # trials of another train.epochs than this sweep's
    failed: int = 0

    def line(self) -> str:
        seeded = ", ".join(f"{n} from {s}" for s, n in self.per_sweep.items())
        return (
            f"warm start: {len(self.trials)} trials ({seeded}); {self.outside_space} skipped outside this space, "
            f"{self.other_settings} skipped trained for other epochs, {self.failed} failed left out"
        )


def read_warm_start(c, exp_id: str, job: JobConfig, fingerprint: str) -> WarmStart:
    """The named sweeps' trials as Optuna trials of this sweep's study. A sweep judged on
    another metric, or trained on other data (its dataset fingerprint), is refused: its values
    say nothing of this sweep's; a trial trained for other epochs is skipped and counted."""
    s = job.sweep
    out = WarmStart()
    metrics = [m for m, _ in s.objective_list]
    constraints = s.constraint_list()
    for name in s.warm_start:
        parents = c.search_runs([exp_id], filter_string=tracking.sweep_filter(name, tracking.KIND_SWEEP), max_results=1)
        if not parents:
            raise ConfigError(
                f"sweep.warm_start: no sweep named {name!r} in MLflow experiment {job.mlflow.experiment!r}"
            )
        _check_same_task(parents[0], name, job, fingerprint)
        runs = tracking.all_runs(c, [exp_id], tracking.sweep_filter(name, tracking.KIND_TRIAL))
        out.per_sweep[name] = 0
        for run in runs:
            trial = _trial(c, run, job, metrics, constraints, out)
            if trial is not None:
                out.trials.append(trial)
                out.per_sweep[name] += 1
    return out


def _check_same_task(parent, name: str, job: JobConfig, fingerprint: str) -> None:
    params, s = parent.data.params, job.sweep
    theirs = parent.data.tags.get(tracking.FINGERPRINT_TAG)
    if theirs != fingerprint:
        raise ConfigError(
            f"sweep.warm_start: sweep {name!r} trained on other data (dataset fingerprint {theirs} against "
            f"this sweep's {fingerprint}: data.root = {params.get('data.root')!r}); warm-start only from sweeps "
            "of this data"
        )
    for key, ours in (("sweep.metric", s.metric), ("sweep.mode", s.mode)):
        if params.get(key) != ours:
            raise ConfigError(
                f"sweep.warm_start: sweep {name!r} has {key} = {params.get(key)!r}, this sweep {ours!r}: "
                "its trials' values do not compare"
            )


def log_warm_start(c, parent: str, warm: WarmStart) -> None:
    c.set_tag(parent, tracking.WARM_START_TAG, ",".join(warm.per_sweep))
    c.log_metric(parent, "warm_start/trials", len(warm.trials))
    c.log_metric(parent, "warm_start/skipped_outside_space", warm.outside_space)
    c.log_metric(parent, "warm_start/skipped_other_settings", warm.other_settings)
    c.log_dict(
        parent,
        {
            "per_sweep": warm.per_sweep,
            "outside_space": warm.outside_space,
            "other_settings": warm.other_settings,
            "failed": warm.failed,
        },
        "warm_start.json",
    )


def _trial(c, run, job: JobConfig, metrics: list[str], constraints, out: WarmStart) -> FrozenTrial | None:
    status = run.data.tags.get(tracking.STATUS_TAG, "")
    if status not in (tracking.COMPLETED, tracking.PRUNED):
        out.failed += 1
        return None
    drawn = _params(run.data.params, job.space)
    if drawn is None:
        out.outside_space += 1
        return None
    if "train.epochs" not in job.space and run.data.params.get("train.epochs") != str(job.train.epochs):
        out.other_settings += 1  # a 2-epoch trial's values are not a 30-epoch trial's
        return None
    params, distributions = drawn
    values = [tracking.run_value(run, m) for m in metrics]
    common = {
        "params": params,
        "distributions": distributions,
        "user_attrs": {"warm_start_run": run.info.run_id},
        "constraints": {str(c): c.violation(tracking.run_value(run, c.metric)) for c in constraints},
    }
    if status == tracking.COMPLETED and all(finite(v) for v in values):
        out.points.append(
            {
                **dict(zip(metrics, values, strict=True)),
                **{c.metric: tracking.run_value(run, c.metric) for c in constraints},
            }
        )
        return optuna.trial.create_trial(values=values, **common)
    last = _last_epoch(c, run, metrics[0])
    if len(metrics) > 1 or last is None:  # Optuna prunes by one value
        return optuna.trial.create_trial(state=TrialState.PRUNED, **common)
    return optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={last[0]: last[1]}, **common)


def _last_epoch(c, run, metric: str) -> tuple[int, float] | None:
    """(epoch, value) of the metric's last report: what a stopped trial is told as."""
    history = [m for m in c.get_metric_history(run.info.run_id, metric) if finite(m.value)]
    if not history:
        return None
    last = max(history, key=lambda m: m.step)
    return last.step, last.value


def _params(logged: dict[str, str], space: dict[str, SearchParam]) -> tuple[dict, dict] | None:
    """The run's values as Optuna params of this space (conditional keys named as the space
    names them), or None when one is missing or outside it."""
    params: dict = {}
    distributions: dict[str, BaseDistribution] = {}
    chosen: dict[str, object] = {}
    for key, p in sorted(space.items(), key=lambda kv: kv[1].depends_on is not None):
        if key not in logged:
            return None
        name = param_name(key, p, chosen)
        if p.depends_on is not None:
            dist = CategoricalDistribution(p.cases.get(str(chosen[p.depends_on])) or [None])
        else:
            dist = _distribution(p)
        value = _parse(logged[key], dist)
        if value is None:
            return None
        params[name], distributions[name], chosen[key] = value, dist, value
    return params, distributions


def _distribution(p: SearchParam) -> BaseDistribution:
    if p.type in ("loguniform", "uniform"):
        return FloatDistribution(p.low, p.high, log=p.type == "loguniform")
    if p.type == "randint":
        return IntDistribution(int(p.low), int(p.high) - 1)
    return CategoricalDistribution(p.values)


def _parse(text: str, dist: BaseDistribution):
    """The logged string as a value the distribution allows, else None."""
    try:
        if isinstance(dist, CategoricalDistribution):
            return next((c for c in dist.choices if c is not None and str(c) == text), None)
        value = int(text) if isinstance(dist, IntDistribution) else float(text)
    except ValueError:
        return None
    return value if dist.low <= value <= dist.high else None


def seed_searcher(searcher, warm: WarmStart) -> None:
    searcher.study.add_trials(warm.trials)
    searcher.completion.seed(warm.points)
    print(warm.line(), file=sys.stderr)
