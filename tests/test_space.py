"""Issue 5: the search space from YAML, and pruned trials told to Optuna as PRUNED."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.configs import (
    COND_SEP,
    ConfigError,
    check_space,
    load_job,
    trial_overrides,
    validate,
)
from search.space import (
    OptunaSpace,
    PruneAwareOptunaSearch,
    build_searcher,
    grid_param_space,
)
from tests.conftest import CONF

DEMO = CONF / "sweep" / "demo.yaml"


def test_demo_space_loads_and_samples_within_bounds():
    job = load_job(DEMO)
    check_space(job)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        t = study.ask()
        OptunaSpace(job.space)(t)
        study.tell(t, 0.0)
        params = trial_overrides(t.params)
        assert 0.005 <= params["train.lr"] <= 0.2
        assert params["model.output_stride"] in (8, 16) and params["data.crop_size"] in (48, 64)
        # conditional: batch size drawn from the case of the backbone drawn
        allowed = {"mobilenet_v2": [8], "resnet50": [4, 8]}[params["model.backbone"]]
        assert params["data.batch_size"] in allowed
        assert f"data.batch_size{COND_SEP}{params['model.backbone']}" in t.params


@pytest.mark.parametrize("entry, message", [
    ({"train.lrr": {"type": "loguniform", "low": 0.001, "high": 0.1}}, "space.train.lrr: not a config key"),
    ({"model.output_stride": {"type": "choice", "values": [8, 12]}}, "value 12 is invalid: model.output_stride"),
    ({"data.crop_size": {"type": "choice", "values": [16, 64]}}, "value 16 is invalid"),
    ({"model.backbone": {"type": "choice", "values": ["vgg"]}}, "unknown backbone 'vgg'"),
    ({"train.lr": {"type": "loguniform", "low": 0, "high": 0.1}}, "loguniform needs low > 0"),
])
def test_bad_space_is_rejected_before_ray(entry, message):
    with pytest.raises(ConfigError, match=message):
        job = load_job(CONF / "train" / "demo.yaml")
        check_space(validate({**job.to_dict(), "space": entry}))


def test_grid_needs_fixed_choices():
    job = load_job(DEMO)
    with pytest.raises(ConfigError, match="space.train.lr: grid search needs `type: choice`"):
        grid_param_space(job.space)
    grid = grid_param_space({k: v for k, v in job.space.items() if k in ("model.output_stride", "data.crop_size")})
    assert grid["model.output_stride"] == {"grid_search": [8, 16]}


def _tell(searcher, trial_id: str, epochs_reached: int, value: float):
    cfg = searcher.suggest(trial_id)
    assert "train.lr" in cfg
    for epoch in range(1, epochs_reached + 1):
        searcher.on_trial_result(trial_id, {"val/mIoU": value, "epoch": epoch, "training_iteration": epoch})
    searcher.on_trial_complete(trial_id, {"val/mIoU": value, "epoch": epochs_reached, "config": cfg})


def test_asha_stopped_trial_is_pruned_for_optuna():
    job = load_job(DEMO, ["train.epochs=4"])
    searcher, _ = build_searcher(job)
    assert isinstance(searcher, PruneAwareOptunaSearch)
    _tell(searcher, "a", 4, 0.5)  # ran all 4 epochs
    _tell(searcher, "b", 1, 0.1)  # stopped by ASHA after 1
    states = [t.state for t in searcher.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
    # the pruned trial's intermediate value is kept for TPE
    assert searcher.study.trials[1].intermediate_values == {1: 0.1}
    assert searcher.study.best_trial.number == 0


def test_stock_optuna_search_would_count_it_complete():
    """Why PruneAwareOptunaSearch exists: Ray's own searcher tells COMPLETE here."""
    job = load_job(DEMO)
    stock = OptunaSearch(space=OptunaSpace(job.space), metric="val/mIoU", mode="max",
                         sampler=optuna.samplers.RandomSampler(seed=0))
    _tell(stock, "b", 1, 0.1)
    assert stock._ot_study.trials[0].state == TrialState.COMPLETE
