"""The one place that reaches into a private Ray internal, where no public API does the job.
tests/test_ray_internals.py fails loudly when a Ray upgrade moves it."""

from __future__ import annotations


def tune_relay_queue():
    """The queue that carries a Ray Train run's reports to its Tune trial (Ray's
    TuneReportCallback puts them there), or None outside a Tune trial."""
    from ray.train._internal.session import get_session

    session = get_session()
    return getattr(session, "_inter_actor_queue", None) if session else None
