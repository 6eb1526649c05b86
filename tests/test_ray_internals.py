"""The private Ray internal this project relies on (search/ray_internals.py) is still where it
was: when a Ray upgrade moves it, this fails here, by name, not as a hung sweep."""

from __future__ import annotations

import inspect

from ray.train._internal import session as train_session


def test_tune_relay_queue_is_where_tune_report_callback_puts_reports():
    from ray.tune.integration.ray_train import TuneReportCallback

    assert callable(train_session.get_session)
    # TuneReportCallback creates the queue through the session; our drain reads the attribute it sets.
    assert "_get_or_create_inter_actor_queue" in inspect.getsource(TuneReportCallback.__init__)
    creator = inspect.getsource(train_session._TrainSession._get_or_create_inter_actor_queue)
    assert "self._inter_actor_queue" in creator


def test_outside_a_trial_there_is_no_queue():
    from deeplab_sweep.search.ray_internals import tune_relay_queue

    assert tune_relay_queue() is None
