"""Cost-aware search on a real local Ray, a real sqlite MLflow store and Optuna's real RDB
storage: a multi-objective sweep with a constraint and a CPU-hour budget, what each trial
measured and cost, the Pareto front in MLflow and through `deeplab best`, and a second sweep
warm-started from the first."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.space import OptunaSpace
from deeplab_sweep.search.sweep import run_sweep
from tests.conftest import CONF

pytestmark = pytest.mark.slow

# 7.2 CPU-seconds: crossed when the first two trials (seeded draws: one of each side of the
# constraint) end, whatever this machine's speed; a third may start before that is known.
BUDGET_CPU_HOURS = 0.002
MAX_PARAMS = 3_000_000  # met by the separable MobileNetV2 head only

PARETO_SWEEP = """\
defaults: [train/demo]
data: {max_train_images: 8, max_val_images: 4, crop_size: 48, val_crop: 48}
train: {epochs: 2, cpus_per_worker: 1, visuals: 0}
mlflow: {system_metrics_interval_s: 0.5}
sweep:
  name: %(name)s
  num_samples: %(n)d
  seed: 3
  tpe: {startup_trials: %(startup)d}
  objectives: {val/mIoU: max, model/latency_ms: min}
  constraints: {model/params: "<= %(max_params)d"}
  asha: {enabled: false}
  %(extra)s
space:
  train.lr: {type: loguniform, low: %(low)s, high: 0.2}
  model.separable: {type: choice, values: [false, true]}
  model.output_stride: {type: choice, values: [8, 16]}
"""


def _sweep(workdir: Path, data_root: Path, **values):
    cfg = workdir / f"{values['name']}.yaml"
    cfg.write_text(PARETO_SWEEP % {"max_params": MAX_PARAMS, **values})
    with contextlib.chdir(workdir):
        start = time.monotonic()
        summary = run_sweep(load_job(cfg, [f"data.root={data_root}"], conf_root=CONF))
        return summary, time.monotonic() - start


def _runs(c: MlflowClient, sweep: str, kind: str):
    exp = c.get_experiment_by_name("deeplab")
    return c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`deeplab.sweep` = '{sweep}' and tags.`deeplab.kind` = '{kind}'"
    )


@pytest.fixture(scope="module")
def swept(ray_cluster, synth_voc_root, tmp_path_factory):
    """A budgeted two-objective sweep, then one warm-started from it."""
    workdir = tmp_path_factory.mktemp("pareto")
    (first, first_wall_s) = _sweep(
        workdir,
        synth_voc_root,
        name="p1",
        n=8,
        startup=8,  # every trial a seeded random draw
        low=0.01,
        extra=f"budget: {{cpu_hours: {BUDGET_CPU_HOURS}}}",
    )
    second, _ = _sweep(workdir, synth_voc_root, name="p2", n=2, startup=2, low=0.02, extra="warm_start: [p1]")
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    return SimpleNamespace(
        workdir=workdir,
        data_root=synth_voc_root,
        first=first,
        first_wall_s=first_wall_s,
        second=second,
        c=c,
        storage=f"sqlite:///{workdir}/runs/optuna.db",
    )


def _value(run, metric: str) -> float:
    return run.data.metrics[f"best/{metric}"]


def test_budget_stops_new_trials_and_running_ones_finish(swept):
    c = swept.c
    (parent,) = _runs(c, "p1", "sweep")
    trials = _runs(c, "p1", "trial")
    assert 2 <= len(trials) < 8
    assert parent.data.tags["stop_reason"].startswith("budget.cpu_hours spent")
    assert swept.first.stop_reason == parent.data.tags["stop_reason"]
    assert all(t.data.tags["deeplab.status"] == "completed" for t in trials), "running trials finish"
    spent = sum(t.data.metrics["cost/cpu_hours"] for t in trials)
    assert parent.data.metrics["compute/cpu_hours"] == pytest.approx(spent)
    assert spent >= BUDGET_CPU_HOURS


def test_each_trial_logs_its_cost_model_and_system_metrics(swept):
    for run in _runs(swept.c, "p1", "trial"):
        m = run.data.metrics
        # 1 CPU held for the trial's attempt: at least the epochs it trained and evaluated (their
        # own stopwatches), at most the whole sweep's wall time.
        history = {k: swept.c.get_metric_history(run.info.run_id, k) for k in ("train/epoch_time_s", "val/time_s")}
        epochs_s = sum(x.value for h in history.values() for x in h)
        assert epochs_s <= m["cost/cpu_hours"] * 3600 <= swept.first_wall_s, (m["cost/cpu_hours"] * 3600, epochs_s)
        assert m["model/params"] > 1e6 and m["model/gflops"] > 0 and m["model/latency_ms"] > 0
        assert 100 < m["model/peak_mem_mb"] < 8192
        system = [k for k in m if k.startswith("system/node-")]
        assert any(k.endswith("/cpu_utilization_percentage") for k in system), sorted(m)
        assert any(k.endswith("/system_memory_usage_megabytes") for k in system)


def test_pareto_front_is_the_feasible_non_dominated_trials(swept):
    c = swept.c
    (parent,) = _runs(c, "p1", "sweep")
    trials = _runs(c, "p1", "trial")
    # The expected front, by brute force over what MLflow holds for each trial.
    feasible = [t for t in trials if _value(t, "model/params") <= MAX_PARAMS]
    assert feasible and len(feasible) < len(trials), "the seeded draws give both sides of the constraint"

    def dominated(a):
        return any(
            _value(b, "val/mIoU") >= _value(a, "val/mIoU")
            and _value(b, "model/latency_ms") <= _value(a, "model/latency_ms")
            and (
                _value(b, "val/mIoU") > _value(a, "val/mIoU")
                or _value(b, "model/latency_ms") < _value(a, "model/latency_ms")
            )
            for b in feasible
        )

    expected = {t.info.run_id for t in feasible if not dominated(t)}
    tagged = {t.info.run_id for t in trials if t.data.tags.get("deeplab.pareto_front") == "true"}
    assert tagged == expected
    assert parent.data.metrics["pareto/front_size"] == len(expected)
    with contextlib.chdir(swept.workdir):
        table = json.loads(Path(c.download_artifacts(parent.info.run_id, "pareto_front.json")).read_text())
        png = Path(c.download_artifacts(parent.info.run_id, "pareto_front.png")).read_bytes()
    assert {row[table["columns"].index("run_id")] for row in table["data"]} == expected
    assert {"val/mIoU", "model/latency_ms", "model.separable", "train.lr", "checkpoint"} <= set(table["columns"])
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_optuna_holds_both_objectives_and_the_constraint(swept):
    study = optuna.load_study(study_name="p1", storage=swept.storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    runs = {r.data.tags["deeplab.trial_id"]: r for r in _runs(swept.c, "p1", "trial")}
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == len(runs)
    front = {r.trial_id for r in swept.first.pareto_front}
    for t in done:
        # One rule: every trial is judged at its best checkpoint, the values MLflow's best/<m> hold.
        run = next(r for r in runs.values() if float(r.data.params["train.lr"]) == pytest.approx(t.params["train.lr"]))
        assert t.values == pytest.approx([_value(run, "val/mIoU"), _value(run, "model/latency_ms")])
        assert t.constraints == {
            f"model/params <= {MAX_PARAMS:g}": pytest.approx(_value(run, "model/params") - MAX_PARAMS)
        }
        row = next(r for r in swept.first.trials if r.run_id == run.info.run_id)
        assert row.values == pytest.approx({m: _value(run, m) for m in row.values})
    # ... and the summary's front is Optuna's own front (feasible trials only) of what it was told.
    number = {
        tid: t.number
        for t in done
        for tid, r in runs.items()
        if float(r.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])
    }
    assert {number[tid] for tid in front} == {t.number for t in study.best_trials}


def test_best_lists_the_front_and_picks_from_it(swept, capsys):
    from deeplab_sweep.cli import main

    uri = f"sqlite:///{swept.workdir}/runs/mlflow.db"
    trials = _runs(swept.c, "p1", "trial")
    front = [t for t in trials if t.data.tags.get("deeplab.pareto_front") == "true"]
    with contextlib.chdir(swept.workdir):
        assert main(["best", "--pareto", "--sweep", "p1", "--tracking-uri", uri, "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert {r["run_id"] for r in listed["front"]} == {t.info.run_id for t in front}
        assert [r["val/mIoU"] for r in listed["front"]] == sorted((_value(t, "val/mIoU") for t in front), reverse=True)

        floor = min(_value(t, "val/mIoU") for t in front)
        fastest = min(front, key=lambda t: _value(t, "model/latency_ms"))
        argv = ["best", "--sweep", "p1", "--objective", "model/latency_ms", "--tracking-uri", uri, "--json"]
        assert main([*argv, "--constraint", f"val/mIoU>={floor}"]) == 0
        picked = json.loads(capsys.readouterr().out)
        assert picked["run_id"] == fastest.info.run_id and picked["metric"] == "model/latency_ms"
        assert main([*argv, "--constraint", "val/mIoU>=1.01"]) == 2
        assert "no trial of the Pareto front meets it" in capsys.readouterr().err


def test_warm_start_seeds_the_next_sweep_without_running_its_trials_again(swept):
    c = swept.c
    (parent,) = _runs(c, "p2", "sweep")
    first = _runs(c, "p1", "trial")
    inside = [t for t in first if float(t.data.params["train.lr"]) >= 0.02]  # p2's space starts at 0.02
    assert parent.data.tags["warm_start"] == "p1"
    assert parent.data.metrics["warm_start/trials"] == len(inside)
    assert parent.data.metrics["warm_start/skipped_outside_space"] == len(first) - len(inside)
    assert len(_runs(c, "p2", "trial")) == 2, "the warm-started trials are not run again"

    study = optuna.load_study(study_name="p2", storage=swept.storage)
    warm = [t for t in study.trials if "warm_start_run" in t.user_attrs]
    assert {t.user_attrs["warm_start_run"] for t in warm} == {t.info.run_id for t in inside}
    new = [t for t in study.trials if "warm_start_run" not in t.user_attrs]
    assert len(new) == 2 and min(t.number for t in new) == len(warm)

    # Informed: a cold study with the same sampler settings draws its first trial at random;
    # the warm-started one does not draw that.
    assert len(warm) >= 2, "more warm trials than TPE's 2 start-up trials"
    with contextlib.chdir(swept.workdir):
        job = load_job(swept.workdir / "p2.yaml", [], conf_root=CONF)
    from deeplab_sweep.search.searcher import sampler_factory

    cold = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler_factory(job)(job.sweep.seed))
    first_cold = cold.ask()
    OptunaSpace(job.space)(first_cold)
    first_new = min(new, key=lambda t: t.number)
    assert not math.isclose(first_new.params["train.lr"], first_cold.params["train.lr"])


def test_warm_start_refuses_other_data_and_skips_trials_of_other_epochs(swept, tmp_path, capsys):
    """Issue 24.6: a 2-epoch sweep cannot seed one trained on other data (one line, exit 2,
    nothing logged), and its trials do not seed a sweep of other epochs (skipped and counted)."""
    from deeplab_sweep.cli import main
    from deeplab_sweep.datasets.synth import synth_voc
    from deeplab_sweep.search.prepare import dataset_fingerprint
    from deeplab_sweep.search.warm_start import read_warm_start

    c = swept.c
    exp_id = c.get_experiment_by_name("deeplab").experiment_id
    runs_before = len(c.search_runs([exp_id]))
    other = synth_voc(tmp_path / "other", n_train=6, n_val=2, seed=1)
    with contextlib.chdir(swept.workdir):
        rc = main(["sweep", str(swept.workdir / "p2.yaml"), f"data.root={other}", "sweep.name=p3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: sweep.warm_start: sweep 'p1' trained on other data"), err[-3:]
    assert len(c.search_runs([exp_id])) == runs_before, "a refused warm start logs nothing"

    with contextlib.chdir(swept.workdir):
        job = load_job(swept.workdir / "p2.yaml", [f"data.root={swept.data_root}", "train.epochs=3"], conf_root=CONF)
    warm = read_warm_start(c, exp_id, job, dataset_fingerprint(job))
    completed = [t for t in _runs(c, "p1", "trial") if float(t.data.params["train.lr"]) >= 0.02]
    assert warm.trials == [] and warm.other_settings == len(completed) > 0
