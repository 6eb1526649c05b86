"""The search space from YAML (`space:` of a sweep config) for each search algorithm."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from ray import tune

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.completion import Completion
from deeplab_sweep.search.job_config import JobConfig, SearchParam
from deeplab_sweep.search.objectives import cost_metric, units_held
from deeplab_sweep.search.overrides import COND_SEP
from deeplab_sweep.search.searcher import OptunaSearcher


def _ordered(space: dict[str, SearchParam]) -> list[tuple[str, SearchParam]]:
    """Parents before the parameters that depend on them."""
    free = [(k, p) for k, p in space.items() if p.depends_on is None]
    cond = [(k, p) for k, p in space.items() if p.depends_on is not None]
    return free + cond


class OptunaSpace:
    """Define-by-run search space (a class, not a closure: Tune pickles the searcher to resume)."""

    def __init__(self, space: dict[str, SearchParam]):
        self.items = _ordered(space)

    def __call__(self, trial: optuna.Trial) -> None:
        chosen: dict[str, Any] = {}
        for key, p in self.items:
            if p.depends_on is not None:
                parent = chosen[p.depends_on]
                choices = p.cases.get(str(parent))
                if choices is None:
                    raise ConfigError(f"space.{key}.cases has no entry for {p.depends_on} = {parent!r}")
                chosen[key] = trial.suggest_categorical(f"{key}{COND_SEP}{parent}", choices)
            elif p.type == "loguniform":
                chosen[key] = trial.suggest_float(key, p.low, p.high, log=True)
            elif p.type == "uniform":
                chosen[key] = trial.suggest_float(key, p.low, p.high)
            elif p.type == "randint":
                chosen[key] = trial.suggest_int(key, int(p.low), int(p.high) - 1)
            else:
                chosen[key] = trial.suggest_categorical(key, p.values)


def grid_param_space(space: dict[str, SearchParam]) -> dict[str, Any]:
    out = {}
    for key, p in space.items():
        if p.type not in ("choice", "grid") or p.depends_on is not None:
            raise ConfigError(
                f"space.{key}: grid search needs `type: choice` (or grid) with fixed values; "
                f"got {p.type}{' with depends_on' if p.depends_on else ''}"
            )
        out[key] = tune.grid_search(p.values)
    return out


def tpe_sampler(job: JobConfig) -> optuna.samplers.TPESampler:
    s, t = job.sweep, job.sweep.tpe
    with warnings.catch_warnings():  # chosen knowingly: not a warning for the user
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=s.seed,
            n_startup_trials=t.startup_trials or min(4, s.num_samples),
            multivariate=t.multivariate,
            group=t.multivariate,  # the conditional space's branches get their own densities
            constant_liar=t.constant_liar,
        )


def completion(job: JobConfig) -> Completion:
    s = job.sweep
    return Completion(
        s.objective_list,
        s.constraint_list(),
        units_held(job.train),
        cost_metric(job.train),
        budget_hours=s.budget.gpu_hours if job.train.use_gpu else s.budget.cpu_hours,
        wall_time_s=s.budget.wall_time_s,
        patience=s.stop_when.no_improvement_trials,
    )


def build_searcher(job: JobConfig, study_name: str):
    """(search_alg or None, param_space) for the sweep's `search` setting; Optuna's study is
    `study_name` in `sweep.optuna_storage`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = job.sweep
    if not job.space:
        raise ConfigError("space: the sweep has no search space (add `space:` entries, e.g. train.lr)")
    if s.search == "grid":
        return None, grid_param_space(job.space)
    sampler = tpe_sampler(job) if s.search == "tpe" else optuna.samplers.RandomSampler(seed=s.seed)
    searcher = OptunaSearcher(
        OptunaSpace(job.space),
        s.objective_list,
        s.constraint_list(),
        sampler,
        s.optuna_storage,
        study_name,
        job.train.epochs,
        completion(job),
    )
    return searcher, {}
