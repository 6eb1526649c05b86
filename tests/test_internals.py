"""The private internals of Ray, Tune and MLflow this project reads (search/internals.py) are
still where, and what, they were: when an upgrade moves one, this fails here, by name, not as a
hung sweep, a silent `deeplab sync` or a trial without system metrics."""

from __future__ import annotations

import inspect
import json

import pytest
from ray.train._internal import session as train_session

from deeplab_sweep.search.internals import InternalsChanged, mlflow_monitors, tune_relay_queue, tune_trial_states


def test_tune_relay_queue_is_where_tune_report_callback_puts_reports():
    from ray.tune.integration.ray_train import TuneReportCallback

    assert callable(train_session.get_session)
    # TuneReportCallback creates the queue through the session; our drain reads the attribute it sets.
    assert "_get_or_create_inter_actor_queue" in inspect.getsource(TuneReportCallback.__init__)
    creator = inspect.getsource(train_session._TrainSession._get_or_create_inter_actor_queue)
    assert "self._inter_actor_queue" in creator


def test_outside_a_trial_there_is_no_queue():
    assert tune_relay_queue() is None


def test_tune_experiment_state_is_read_as_tune_writes_it():
    """A trial as Tune itself serialises it into experiment_state-*.json (its `trial_data`)."""
    from ray.tune.experiment import Trial

    trial = Trial("sweep_trial", trial_id="0123abcd", stub=True)
    trial.relative_logdir = "sweep_trial_0123abcd_1_lr=0.01_2026"
    trial.status = Trial.TERMINATED
    state = json.dumps({"trial_data": [list(trial.get_json_state())]})
    assert tune_trial_states(state) == {"sweep_trial_0123abcd_1_lr=0.01_2026": ("0123abcd", "TERMINATED")}
    with pytest.raises(InternalsChanged, match="Tune's experiment state is not in the form"):
        tune_trial_states(json.dumps({"trials": []}))


def test_mlflow_system_metric_collectors_import_and_collect():
    monitors = mlflow_monitors()
    for m in monitors:
        m.collect_metrics()
    values = {k: v for m in monitors for k, v in m.aggregate_metrics().items()}
    assert "cpu_utilization_percentage" in values and "system_memory_usage_megabytes" in values


def test_a_job_drivers_working_dir_is_read_from_the_job_config_ray_hands_it(monkeypatch, tmp_path):
    """What Ray's job supervisor sets for its driver (`_get_driver_env_vars`): the variable and
    the shape of its JSON."""
    import inspect

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.dashboard.modules.job.job_supervisor import JobSupervisor

    from deeplab_sweep.search.internals import job_working_dir

    assert "RAY_JOB_CONFIG_JSON_ENV_VAR" in inspect.getsource(JobSupervisor._get_driver_env_vars)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert job_working_dir() is None
    monkeypatch.setenv(
        RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})
    )
    assert job_working_dir() == tmp_path.resolve()
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {}, "metadata": {}}))
    assert job_working_dir() is None
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, "[]")
    with pytest.raises(InternalsChanged, match="Ray's job config"):
        job_working_dir()


def test_the_gcs_client_that_checks_a_clusters_address_takes_what_it_is_given():
    """`connect_to_gcs` calls it as (address, cluster id, timeout in ms); what it does with a
    cluster that refuses the driver, or with an address that is not Ray's, is tested on a real
    cluster (tests/test_cluster.py)."""
    from ray._raylet import InnerGcsClient

    assert "standalone(unicode gcs_address: str, cluster_id: Optional[str], int timeout_ms: int)" in (
        InnerGcsClient.standalone.__doc__
    )
