"""The search space from YAML (`space:` of a sweep config) for each search algorithm, and the
Optuna searcher that tells ASHA-stopped trials to Optuna as pruned."""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from search.configs import COND_SEP, ConfigError, JobConfig, SearchParam, ran_all_epochs


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
            raise ConfigError(f"space.{key}: grid search needs `type: choice` (or grid) with fixed values; "
                              f"got {p.type}{' with depends_on' if p.depends_on else ''}")
        out[key] = tune.grid_search(p.values)
    return out


class PruneAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch tells Optuna COMPLETE whenever the last result holds the metric, so a
    trial that ASHA stopped after 1 of 30 epochs would count as a finished trial with a
    half-trained score. Here a trial that ended before its last epoch is told as PRUNED: TPE
    then treats its (reported) intermediate values as those of a stopped trial."""

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials or error or not result:
            return super().on_trial_complete(trial_id, result, error)
        if not ran_all_epochs(result.get("config", {}), result, self.max_epochs):
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


def build_searcher(job: JobConfig):
    """(search_alg or None, param_space) for the sweep's `search` setting."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = job.sweep
    if not job.space:
        raise ConfigError("space: the sweep has no search space (add `space:` entries, e.g. train.lr)")
    if s.search == "grid":
        return None, grid_param_space(job.space)
    sampler = (optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=min(4, s.num_samples))
               if s.search == "tpe" else optuna.samplers.RandomSampler(seed=s.seed))
    searcher = PruneAwareOptunaSearch(space=OptunaSpace(job.space), metric=s.metric, mode=s.mode,
                                      sampler=sampler, max_epochs=job.train.epochs)
    return searcher, {}
