"""The search space from YAML, and what Optuna is told of each trial (stopped ones as PRUNED, at
the value they were stopped at)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.compose import check_space, load_job, validate
from deeplab_sweep.search.overrides import COND_SEP, trial_overrides
from deeplab_sweep.search.space import OptunaSpace, build_searcher, grid_param_space
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


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"train.lrr": {"type": "loguniform", "low": 0.001, "high": 0.1}}, "space.train.lrr: not a config key"),
        ({"model.output_stride": {"type": "choice", "values": [8, 12]}}, "value 12 is invalid: model.output_stride"),
        ({"data.crop_size": {"type": "choice", "values": [16, 64]}}, "value 16 is invalid"),
        ({"model.backbone": {"type": "choice", "values": ["vgg"]}}, "unknown backbone 'vgg'"),
        ({"train.lr": {"type": "loguniform", "low": 0, "high": 0.1}}, "loguniform needs low > 0"),
    ],
)
def test_bad_space_is_rejected_before_ray(entry, message):
    job = load_job(CONF / "train" / "demo.yaml")
    with pytest.raises(ConfigError, match=message):
        check_space(validate({**job.to_dict(), "space": entry}))


def test_grid_needs_fixed_choices():
    job = load_job(DEMO)
    with pytest.raises(ConfigError, match="space.train.lr: grid search needs `type: choice`"):
        grid_param_space(job.space)
    grid = grid_param_space({k: v for k, v in job.space.items() if k in ("model.output_stride", "data.crop_size")})
    assert grid["model.output_stride"] == {"grid_search": [8, 16]}


def _like_tune(searcher, trial_id: str, values: list[float], stopped: bool) -> dict:
    """The calls Tune makes: every result to on_trial_result except a stopping one, which Ray
    hands only to on_trial_complete; results are flat (no "config" in them)."""
    cfg = searcher.suggest(trial_id)
    results = [{"val/mIoU": v, "epoch": e, "training_iteration": e} for e, v in enumerate(values, 1)]
    for r in results[:-1] if stopped else results:
        searcher.on_trial_result(trial_id, r)
    searcher.on_trial_complete(trial_id, results[-1])
    return cfg


def test_stopped_trial_is_pruned_with_its_last_value(tmp_path):
    job = load_job(DEMO, ["train.epochs=4", f"sweep.optuna_storage=sqlite:///{tmp_path}/o.db"])
    searcher, _ = build_searcher(job, "s")
    _like_tune(searcher, "a", [0.3, 0.4, 0.45, 0.5], stopped=False)  # ran all 4 epochs
    _like_tune(searcher, "b", [0.1], stopped=True)  # stopped by ASHA at its first report
    _like_tune(searcher, "c", [0.2, 0.25], stopped=True)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db")  # read back independently
    a, b, c = study.trials
    assert [a.state, b.state, c.state] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert a.value == 0.5 and a.intermediate_values == {1: 0.3, 2: 0.4, 3: 0.45, 4: 0.5}
    # The value each pruned trial was stopped at is what TPE sees of it, at its epoch.
    assert b.intermediate_values == {1: 0.1} and c.intermediate_values == {1: 0.2, 2: 0.25}
    assert study.best_trial.number == a.number


def test_searched_epochs_decide_completion(tmp_path):
    """A trial that ran all of its own (searched) train.epochs is complete, not pruned."""
    job = load_job(DEMO, ["train.epochs=4", f"sweep.optuna_storage=sqlite:///{tmp_path}/o.db"])
    space = {**job.to_dict()["space"], "train.epochs": {"type": "choice", "values": [2]}}
    searcher, _ = build_searcher(validate({**job.to_dict(), "space": space}), "s")
    _like_tune(searcher, "a", [0.3, 0.4], stopped=False)
    assert (
        optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db").trials[0].state == TrialState.COMPLETE
    )


def test_resumed_searcher_closes_orphans_and_counts_no_epoch_twice(tmp_path):
    job = load_job(DEMO, ["train.epochs=4", f"sweep.optuna_storage=sqlite:///{tmp_path}/o.db"])
    searcher, _ = build_searcher(job, "s")
    searcher.suggest("a")
    searcher.on_trial_result("a", {"val/mIoU": 0.3, "epoch": 1})
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("b")  # asked of Optuna, but the driver dies before the searcher is saved
    restored, _ = build_searcher(job, "s")
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {"val/mIoU": 0.9, "epoch": 1})  # the replayed epoch after a resume
    restored.on_trial_complete("a", {"val/mIoU": 0.5, "epoch": 2})
    a, b = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db").trials
    assert a.state == TrialState.PRUNED and a.intermediate_values == {1: 0.3, 2: 0.5}
    assert b.state == TrialState.FAIL
