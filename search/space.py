"""The search space from YAML (`space:` of a sweep config) in the form each search takes:
Optuna's define-by-run calls (TPE, random), or Tune's grid."""

from __future__ import annotations

from typing import Any

import optuna
from ray import tune

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.job_config import SearchParam
from deeplab_sweep.search.overrides import COND_SEP


def _ordered(space: dict[str, SearchParam]) -> list[tuple[str, SearchParam]]:
    """Parents before the parameters that depend on them."""
    free = [(k, p) for k, p in space.items() if p.depends_on is None]
    cond = [(k, p) for k, p in space.items() if p.depends_on is not None]
    return free + cond


def param_name(key: str, p: SearchParam, chosen: dict) -> str:
    """The Optuna parameter a space key is drawn as: a conditional one per value of its parent,
    so that each Optuna distribution keeps one fixed set of choices."""
    return key if p.depends_on is None else f"{key}{COND_SEP}{chosen[p.depends_on]}"


def optuna_params(space: dict[str, SearchParam], values: dict[str, Any], where: str) -> dict[str, Any]:
    """A configuration ({space key: value}) as Optuna's params of this space (what
    `study.enqueue_trial` takes); every value one the space can draw, else a one-line error."""
    out, chosen = {}, {}
    for key, p in _ordered(space):
        if key not in values:
            continue
        v = values[key]
        if p.depends_on is not None and p.depends_on not in values:
            raise ConfigError(f"{where}.{key}: give {p.depends_on} too (its choices depend on it)")
        if p.depends_on is not None:
            allowed = p.cases.get(str(values[p.depends_on])) or []
            ok = v in allowed
        elif p.type in ("loguniform", "uniform", "randint"):
            high = p.high if p.type != "randint" else p.high - 1
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and p.low <= v <= high
            allowed = f"{p.low:g} to {high:g}"
        else:
            allowed, ok = p.values, v in p.values
        if not ok:
            raise ConfigError(f"{where}.{key} = {v!r}: not a value the space draws ({allowed})")
        chosen[key] = v
        out[param_name(key, p, chosen)] = v
    unknown = sorted(set(values) - set(space))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: not a key of the space ({', '.join(space)})")
    return out


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
                chosen[key] = trial.suggest_categorical(param_name(key, p, chosen), choices)
            elif p.type == "loguniform":
                chosen[key] = trial.suggest_float(key, p.low, p.high, log=True)
            elif p.type == "uniform":
                chosen[key] = trial.suggest_float(key, p.low, p.high)
            elif p.type == "randint":
                chosen[key] = trial.suggest_int(key, int(p.low), int(p.high) - 1)
            else:
                chosen[key] = trial.suggest_categorical(key, p.values)


def choice_grid(space: dict[str, SearchParam], limit: int = 100_000) -> list[dict] | None:
    """Every configuration of a space of choices only, as Optuna params (conditional ones under
    their parent's value); None where the space holds a range or more than `limit`."""
    configs: list[tuple[dict, dict]] = [({}, {})]  # (Optuna params, {space key: value})
    for key, p in _ordered(space):
        if p.depends_on is None and p.type not in ("choice", "grid"):
            return None
        grown = []
        for params, chosen in configs:
            values = p.values if p.depends_on is None else p.cases.get(str(chosen[p.depends_on])) or []
            for v in values:
                c = {**chosen, key: v}
                grown.append(({**params, param_name(key, p, c): v}, c))
        configs = grown
        if len(configs) > limit:
            return None
    return [params for params, _ in configs]


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
