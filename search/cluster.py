"""Starting or joining Ray, quietly, and shutting down only what we started."""
from __future__ import annotations

import contextlib
import logging
import os

import ray

from search.configs import ClusterConfig, ConfigError


@contextlib.contextmanager
def ray_session(cluster: ClusterConfig, address: str | None = None):
    address = address or cluster.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                      object_store_memory=cluster.object_store_memory,
                      # The dashboard process frees a stopped trial's placement group; keep it.
                      include_dashboard=True)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(**kwargs)
        except ConnectionError as e:
            raise ConfigError(f"cluster.address = {address!r}: cannot reach a Ray cluster there ({e})") from None
    try:
        yield
    finally:
        if started:
            ray.shutdown()
