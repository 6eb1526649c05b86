"""Starting or joining Ray, quietly, and shutting down only what we started."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import ray

from deeplab_sweep.errors import ServiceUnreachable
from deeplab_sweep.search.job_config import ClusterConfig

# Ray Train polls worker health every 2 s by default, and a report waits for the next poll:
# with short epochs that is most of a trial's overhead. Polling at 0.2 s costs nothing visible.
RUNTIME_ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def runtime_env() -> dict:
    return {"env_vars": {k: os.environ.get(k, v) for k, v in RUNTIME_ENV_VARS.items()}}


def cluster_address(cluster: ClusterConfig, address: str | None = None) -> str | None:
    """The cluster to join (None: start a local one), checked to answer before Ray is asked:
    ray.init() on a dead address retries for minutes."""
    address = address or cluster.address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return address
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise ServiceUnreachable(
            f"cluster.address = {address!r}: no Ray cluster answers there ({e}); "
            "start one with `ray start --head` or leave the address unset for a local Ray"
        ) from None
    return address


@contextlib.contextmanager
def ray_session(cluster: ClusterConfig, address: str | None = None, verbose: bool = False):
    """Quiet by default: the workers' logs stay in Ray's log folder (errors still surface
    with the failed run); `verbose` streams them to this terminal."""
    address = cluster_address(cluster, address)
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": verbose, "runtime_env": runtime_env()}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
            object_store_memory=cluster.object_store_memory,
            # The dashboard process frees a stopped trial's placement group; keep it.
            include_dashboard=True,
        )
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(**kwargs)
        except ConnectionError as e:
            raise ServiceUnreachable(f"cluster.address = {address!r}: cannot reach a Ray cluster there ({e})") from None
    try:
        yield
    finally:
        if started:
            ray.shutdown()
