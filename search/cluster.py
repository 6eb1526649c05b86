"""Starting or joining Ray, quietly, and shutting down only what we started."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading

import ray

from deeplab_sweep.errors import ServiceUnreachable
from deeplab_sweep.search.internals import connect_to_gcs, job_working_dir
from deeplab_sweep.search.job_config import ClusterConfig


def cluster_address(cluster: ClusterConfig, address: str | None = None) -> str | None:
    """The cluster to join (None: start a local one), checked to answer before Ray is asked:
    ray.init() on a dead address retries for minutes."""
    address = address or cluster.address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return address
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5) as conn:
            not_grpc = _answers_not_grpc(conn)
    except (OSError, ValueError) as e:
        raise ServiceUnreachable(
            f"cluster.address = {address!r}: no Ray cluster answers there ({e}); "
            "start one with `ray start --head` or leave the address unset for a local Ray"
        ) from None
    if not_grpc:
        raise _not_ray(address)
    _check_cluster_takes_this_driver(address)
    return address


# The opening of an HTTP/2 connection, as a gRPC client (Ray's GCS client) sends it: the
# preface, then an empty SETTINGS frame. A gRPC server's first frame in reply is SETTINGS too.
HTTP2_OPENING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _answers_not_grpc(conn: socket.socket) -> bool:
    """Whether what answers on `conn` says it is not a gRPC server such as Ray's GCS: a web
    server (a Ray dashboard, an MLflow UI) replies to an HTTP/2 opening with an error page in
    milliseconds, where Ray's GCS client tries for about 11 s before it gives up. A reply that
    opens with a SETTINGS frame, silence, or a cluster that speaks TLS (RAY_USE_TLS: this opening
    is plaintext) is left to the GCS client to judge."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return False
    got = b""
    try:
        conn.settimeout(2)
        conn.sendall(HTTP2_OPENING)
        while len(got) < 9 and (more := conn.recv(9 - len(got))):
            got += more
    except OSError:
        return False
    settings = len(got) == 9 and got[3] == 4 and got[5:] == bytes(4)
    return bool(got) and not settings


def _not_ray(address: str) -> ServiceUnreachable:
    return ServiceUnreachable(
        f"cluster.address = {address!r}: something answers there, but not a Ray cluster; give the "
        "head's GCS address (`ray start --head --port`, 6379 by default), not its dashboard's (8265, "
        "which `ray job submit` takes)"
    )


def _check_cluster_takes_this_driver(address: str) -> None:
    """What answers at `address` is a Ray cluster's GCS, and it takes this driver's token: known
    in milliseconds when it is, in about 11 s when something else (not a web server) answers
    there. `ray.init` would retry for minutes instead, a line of Ray's log each time, after the
    sweep's parent run was opened."""
    from ray.exceptions import AuthenticationError, RpcError

    try:
        connect_to_gcs(address)
    except AuthenticationError:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            how = "this driver's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is not the head's"
        else:
            how = "set RAY_AUTH_MODE=token with the head's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        raise ServiceUnreachable(
            f"cluster.address = {address!r}: the cluster refuses this driver, as Ray's token authentication "
            f"is on there (`ray start --head` turns it on): {how} (`ray get-auth-token` on the head prints "
            "it; on the head itself, --address auto finds it)"
        ) from None
    except RpcError:
        raise _not_ray(address) from None


class RaySession:
    """Ray for one command, started (or joined) at `start`, and shut down on a thread of its own
    while the command writes its summary (`release`). Quiet
    by default: the workers' logs stay in Ray's log folder (errors still surface with the failed
    run); `verbose` streams them to this terminal. No runtime env is given: under `ray job
    submit` the job's own (its `--working-dir` on every node) must stay the driver's; one given
    here would replace it. A local Ray starts its dashboard only when asked (`dashboard`): Ray
    Train frees a stopped worker group's placement group through it, and one-worker trials have
    none (it takes seconds to start). While it is up, SIGTERM is Ctrl-C. `address` is
    `cluster_address`'s answer, checked by the command's preflight already."""

    def __init__(self, cluster: ClusterConfig, address: str | None, verbose: bool = False, dashboard: bool = True):
        self.address = address
        self.kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": verbose}
        if self.address:
            self.kwargs["address"] = self.address
        else:
            self.kwargs.update(
                num_cpus=cluster.num_cpus,
                num_gpus=cluster.num_gpus,
                object_store_memory=cluster.object_store_memory,
                include_dashboard=dashboard,
            )
        self.started = False
        self._thread: threading.Thread | None = None
        self._stack = contextlib.ExitStack()

    def start(self) -> RaySession:
        """Start (or join) Ray, unless this process is connected already."""
        self._stack.enter_context(_out_of_the_job_folder())
        if not ray.is_initialized():
            self.started = True
            try:
                ray.init(**self.kwargs)
            except ConnectionError as e:
                raise ServiceUnreachable(
                    f"cluster.address = {self.address!r}: cannot reach a Ray cluster there ({e})"
                ) from None
        self._stack.enter_context(_sigterm_as_ctrl_c())
        return self

    def release(self) -> None:
        """Begin shutting Ray down, if this session started it: on a thread, while the command
        writes its summary."""
        if self.started and ray.is_initialized():
            self._thread = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
            self._thread.start()
        self.started = False

    def close(self) -> None:
        self.release()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stack.close()

    def __enter__(self) -> RaySession:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _out_of_the_job_folder():
    """Under `ray job submit --working-dir` the driver starts in the uploaded folder, and Ray
    unpacks it again (a new folder at the same path) as soon as the driver joins, on each node
    that shares this machine's temp folder (several `ray start` on one machine): the driver's
    working directory is then gone, and Tune, which needs one, fails at the end of the sweep.
    Every path the sweep uses is absolute by now: the driver works from a private temp folder
    meanwhile, and goes back by path."""
    folder = job_working_dir()
    if folder is None:
        yield
        return
    # A folder of this process's own: a relative entry on sys.path (PYTHONPATH=.) is looked up
    # in the working directory, which must not be one that other users can write.
    private = tempfile.mkdtemp(prefix="deeplab-driver-")
    os.chdir(private)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.chdir(folder)
        shutil.rmtree(private, ignore_errors=True)


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
