"""The search space from YAML, and what Optuna is told of each trial (stopped ones as PRUNED, at
the value they were stopped at)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.checks import check_space
from deeplab_sweep.search.compose import load_job, validate
from deeplab_sweep.search.overrides import COND_SEP, trial_overrides
from deeplab_sweep.search.searcher import build_searcher
from deeplab_sweep.search.space import OptunaSpace, grid_param_space
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


def _multi_objective(tmp_path, *overrides: str):
    objectives = "sweep.objectives={val/mIoU: max, model/latency_ms: min}"
    return load_job(
        DEMO,
        [
            "train.epochs=4",
            "sweep.metric=val/mIoU",
            objectives,
            f"sweep.optuna_storage=sqlite:///{tmp_path}/o.db",
            *overrides,
        ],
    )


def test_multi_objective_trial_stopped_early_is_pruned_and_off_the_front(tmp_path):
    """ASHA stops by the first objective; Optuna then hears the trial as PRUNED (no values, no
    intermediate values: it prunes by one), so it is never on the front."""
    searcher, _ = build_searcher(_multi_objective(tmp_path), "s")
    for trial_id, values, latency, stopped in (("a", [0.3, 0.5], 20.0, False), ("b", [0.9], 1.0, True)):
        searcher.suggest(trial_id)
        epochs = [{"val/mIoU": v, "model/latency_ms": latency, "epoch": e} for e, v in enumerate(values, 1)]
        epochs[-1]["epoch"] = 4 if not stopped else 1
        for r in epochs[:-1]:
            searcher.on_trial_result(trial_id, r)
        searcher.on_trial_complete(trial_id, epochs[-1])
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db")
    a, b = study.trials
    assert a.state == TrialState.COMPLETE and a.values == [0.5, 20.0] and a.intermediate_values == {}
    assert b.state == TrialState.PRUNED and b.values is None
    assert [t.number for t in study.best_trials] == [a.number]


def test_no_new_trial_after_n_trials_without_improvement(tmp_path):
    job = load_job(
        DEMO,
        [
            "train.epochs=2",
            "sweep.stop_when.no_improvement_trials=2",
            f"sweep.optuna_storage=sqlite:///{tmp_path}/o.db",
        ],
    )
    searcher, _ = build_searcher(job, "s")
    for trial_id, value in (("a", 0.5), ("b", 0.6), ("c", 0.4)):
        _like_tune(searcher, trial_id, [value / 2, value], stopped=False)
    assert searcher.suggest("d") != Searcher.FINISHED  # one trial without improvement
    _like_tune(searcher, "d", [0.1, 0.6], stopped=False)  # equal is no improvement
    assert searcher.suggest("e") == Searcher.FINISHED
    assert searcher.completion.reason == "stop_when.no_improvement_trials: 2 trials without improvement"


def test_front_and_improvement_with_two_objectives():
    """Against Optuna's own Pareto front of the same points."""
    import random

    from deeplab_sweep.search.completion import Completion
    from deeplab_sweep.search.objectives import pareto_front

    objectives = [("val/mIoU", "max"), ("model/latency_ms", "min")]
    rng = random.Random(0)
    points = [{"val/mIoU": rng.random(), "model/latency_ms": rng.choice([1.0, 2.0, 3.0, 4.0])} for _ in range(40)]
    study = optuna.create_study(directions=["maximize", "minimize"])
    for p in points:
        study.add_trial(optuna.trial.create_trial(values=[p["val/mIoU"], p["model/latency_ms"]]))
    expected = {(t.values[0], t.values[1]) for t in study.best_trials}
    assert {(p["val/mIoU"], p["model/latency_ms"]) for p in pareto_front(points, objectives, [])} == expected

    completion = Completion(
        objectives=objectives, constraints=[], units_per_trial=1.0, cost_metric="cost/cpu_hours", patience=2
    )
    completion.seed(points)
    best = max(points, key=lambda p: p["val/mIoU"])
    completion.on_finished({"val/mIoU": best["val/mIoU"], "model/latency_ms": 9.0}, ran_in_full=True)  # dominated
    completion.on_finished({"val/mIoU": 2.0, "model/latency_ms": 9.0}, ran_in_full=False)  # stopped early
    assert completion.check() == "stop_when.no_improvement_trials: 2 trials without improvement"
    completion.without_improvement, completion.reason = 0, None
    completion.on_finished({"val/mIoU": 0.0, "model/latency_ms": 0.5}, ran_in_full=True)  # fastest: joins
    assert completion.without_improvement == 0


def test_budget_counts_every_attempt_and_the_wall_time_of_earlier_drivers():
    """Cost is the wall time of every attempt (one that died before it reported too), x the
    units held; the bounds are what the test's own sleeps and stopwatch allow."""
    import pickle
    import time

    from deeplab_sweep.search.completion import Completion

    start = time.monotonic()
    completion = Completion(
        objectives=[("val/mIoU", "max")],
        constraints=[],
        units_per_trial=2.0,
        cost_metric="cost/cpu_hours",
        budget_hours=1.0,
        wall_time_s=3600,
    )
    cost = completion.cost
    for _ in range(2):  # an attempt that dies before any report, and its retry
        cost.started("a")
        time.sleep(0.2)
        cost.ended("a")
    cost.started("b")  # running
    time.sleep(0.1)
    assert 0.5 * 2 / 3600 <= completion.hours() <= (time.monotonic() - start) * 2 / 3600
    assert completion.check() is None
    completion.budget_hours = completion.hours()
    assert completion.check().startswith("budget.cpu_hours spent: ")

    later = Completion(
        objectives=[("val/mIoU", "max")], constraints=[], units_per_trial=1.0, cost_metric="cost/cpu_hours"
    )
    later.cost.started("c")
    time.sleep(0.3)
    resumed = pickle.loads(pickle.dumps(later))  # a resumed sweep's searcher
    # The running attempt counts up to the save, and the earlier driver's wall time carries over.
    assert resumed.cost.seconds("c") >= 0.3 and resumed.wall_s() >= 0.3 and resumed.check() is None
    resumed.wall_time_s = 0.3
    assert resumed.check().startswith("budget.wall_time_s passed")


def test_epoch_budget_counts_each_epoch_once():
    from deeplab_sweep.search.completion import Completion

    completion = Completion(
        objectives=[("val/mIoU", "max")],
        constraints=[],
        units_per_trial=1.0,
        cost_metric="cost/cpu_hours",
        budget_epochs=5,
    )
    for epoch in (1, 2, 3):
        completion.on_result("a", {"epoch": epoch})
    completion.on_result("a", {"epoch": 2, "replayed": True})  # after a restart: not trained again
    completion.on_result("b", {"epoch": 1})
    assert completion.epochs_trained() == 4 and completion.check() is None
    completion.on_result("b", {"epoch": 2})
    assert completion.check() == "budget.epochs spent: 5 of 5"


def test_trials_are_judged_at_their_best_epoch(tmp_path):
    """Optuna is told the values of the trial's best epoch by the first objective (its best
    checkpoint), not its last; the no-improvement rule judges that point too."""
    job = _multi_objective(
        tmp_path, "sweep.constraints={model/peak_mem_mb: '<= 100'}", "sweep.stop_when.no_improvement_trials=5"
    )
    searcher, _ = build_searcher(job, "s")
    searcher.suggest("a")
    epochs = [(0.6, 10.0, 90.0), (0.4, 12.0, 150.0), (0.5, 11.0, 160.0), (0.3, 9.0, 170.0)]
    for e, (miou, latency, mem) in enumerate(epochs, 1):
        r = {"val/mIoU": miou, "model/latency_ms": latency, "model/peak_mem_mb": mem, "epoch": e}
        (searcher.on_trial_result if e < 4 else searcher.on_trial_complete)("a", r)
    (a,) = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db").trials
    assert a.state == TrialState.COMPLETE and a.values == [0.6, 10.0]
    # The constraint is met at the best epoch, broken at the last: judged at the best.
    assert a.constraints == {"model/peak_mem_mb <= 100": -10.0}
    assert searcher.completion.points == [{"val/mIoU": 0.6, "model/latency_ms": 10.0, "model/peak_mem_mb": 90.0}]


def test_a_stopped_trial_never_joins_a_front_of_several_objectives():
    from deeplab_sweep.search.completion import Completion

    completion = Completion(
        objectives=[("val/mIoU", "max"), ("model/latency_ms", "min")],
        constraints=[],
        units_per_trial=1.0,
        cost_metric="cost/cpu_hours",
    )
    completion.on_finished({"val/mIoU": 0.9, "model/latency_ms": 1.0}, ran_in_full=False)
    assert completion.points == [] and completion.without_improvement == 1
    completion.on_finished({"val/mIoU": 0.5, "model/latency_ms": 5.0}, ran_in_full=True)
    assert completion.points == [{"val/mIoU": 0.5, "model/latency_ms": 5.0}] and completion.without_improvement == 0
