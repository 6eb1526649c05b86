"""Starting or joining Ray, quietly, and shutting down only what we started."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading

import ray

from deeplab_sweep.errors import ServiceUnreachable
from deeplab_sweep.search.internals import job_working_dir
from deeplab_sweep.search.job_config import ClusterConfig


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
    with the failed run); `verbose` streams them to this terminal. No runtime env is given:
    under `ray job submit` the job's own (its `--working-dir` on every node) must stay the
    driver's; one given here would replace it."""
    address = cluster_address(cluster, address)
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": verbose}
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
    with _out_of_the_job_folder():
        if started:
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                raise ServiceUnreachable(
                    f"cluster.address = {address!r}: cannot reach a Ray cluster there ({e})"
                ) from None
        with _sigterm_as_ctrl_c():
            try:
                yield
            finally:
                if started:
                    ray.shutdown()


@contextlib.contextmanager
def _out_of_the_job_folder():
    """Under `ray job submit --working-dir` the driver starts in the uploaded folder, and Ray
    unpacks it again (a new folder at the same path) as soon as the driver joins, on each node
    that shares this machine's temp folder (several `ray start` on one machine): the driver's
    working directory is then gone, and Tune, which needs one, fails at the end of the sweep.
    Every path the sweep uses is absolute by now: the driver works from the temp folder
    meanwhile, and goes back by path."""
    folder = job_working_dir()
    if folder is None:
        yield
        return
    os.chdir(tempfile.gettempdir())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.chdir(folder)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (what `ray job stop` and most schedulers send) stops the command as Ctrl-C does: a
    sweep ends gracefully through Tune's own handler, its state kept for --resume. Installed
    after ray.init(), which sets a handler of its own that aborts the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
