"""The private internals of Ray, Tune and MLflow this project reaches into, in one place, where
no public API does the job. tests/test_internals.py fails loudly, by name, when an upgrade moves
one; each reader here raises `InternalsChanged` rather than guessing."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


class InternalsChanged(RuntimeError):
    """A private format or module this project reads is not where, or what, it was."""


def tune_relay_queue():
    """The queue that carries a Ray Train run's reports to its Tune trial (Ray's
    TuneReportCallback puts them there), or None outside a Tune trial."""
    from ray.train._internal.session import get_session

    session = get_session()
    return getattr(session, "_inter_actor_queue", None) if session else None


def tune_trial_states(experiment_state: str) -> dict[str, tuple[str, str | None]]:
    """Trial folder name -> (trial id, Tune's status) from the text of Tune's
    `experiment_state-*.json` (a trial's own `done` flag in result.json is not written for
    every trial that finished)."""
    try:
        trials = [json.loads(t[0]) for t in json.loads(experiment_state)["trial_data"]]
        return {t["relative_logdir"]: (t["trial_id"], t.get("status")) for t in trials}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise InternalsChanged(
            f"Tune's experiment state is not in the form this Ray had ({type(e).__name__}: {e})"
        ) from None


def in_ray_job() -> bool:
    """Whether this process is a `ray job submit` entrypoint (Ray's job supervisor hands its
    driver the job's config in the environment)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return bool(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR))


def job_entrypoint_words() -> list[str]:
    """The words of this job's entrypoint as far as this process can see them: its own command
    line, and the shell's `-c` command where Ray's supervisor started it through one (an
    entrypoint of several commands, or with `VAR=value` before the command)."""
    import shlex

    import psutil

    words = list(sys.argv)
    with contextlib.suppress(psutil.Error, ValueError):
        parent = psutil.Process().parent()
        cmd = parent.cmdline() if parent is not None else []
        if len(cmd) >= 3 and Path(cmd[0]).name in ("sh", "bash", "dash") and cmd[1] == "-c":
            words += shlex.split(cmd[2])
    return words


def job_working_dir() -> Path | None:
    """The folder a `ray job submit --working-dir` driver runs in (Ray unpacks the upload there
    and deletes it when the job ends), or None outside such a job. Read from the job config Ray's
    job supervisor hands its driver."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    text = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not text:
        return None
    try:
        working_dir = json.loads(text)["runtime_env"].get("working_dir")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InternalsChanged(f"Ray's job config is not in the form this Ray had ({type(e).__name__}: {e})") from None
    return Path.cwd().resolve() if working_dir else None


def mlflow_monitors() -> list:
    """The collectors MLflow's SystemMetricsMonitor runs: CPU and memory, disk, network, and the
    GPUs when nvidia-ml-py finds any. (The monitor itself is not used: its constructor opens a
    default mlflow.db in the working folder.)"""
    try:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    except ImportError as e:
        raise InternalsChanged(f"MLflow's system-metric collectors moved: {e}") from None
    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        monitors.append(GPUMonitor())
    except Exception:  # noqa: BLE001 - no NVIDIA driver or GPU here: what MLflow does too
        pass
    return monitors


def connect_to_gcs(address: str, timeout_ms: int = 1000) -> None:
    """Connect to the cluster's GCS at `address` as `ray.init` would (the same token settings,
    read from this process's environment) and let go, with nothing of Ray started. Raises Ray's
    `AuthenticationError` when the cluster refuses this process's token (in milliseconds), and its
    `RpcError` when what answers there does not speak Ray's protocol (after Ray's own connect
    retries, about 11 s), where `ray.init` would retry for minutes, logging each attempt. Ray's
    client logs those attempts to the process's stderr: silenced here, the caller says what
    happened."""
    try:
        from ray._raylet import InnerGcsClient

        connect = InnerGcsClient.standalone
    except (ImportError, AttributeError) as e:
        raise InternalsChanged(f"Ray's GCS client moved: {e}") from None
    with _native_stderr_to_devnull():
        try:
            connect(address, None, timeout_ms)
        except TypeError as e:
            raise InternalsChanged(f"Ray's GCS client takes other arguments now: {e}") from None


@contextlib.contextmanager
def _native_stderr_to_devnull():
    """File descriptor 2 to /dev/null for a block: what native code writes there (Ray's C++
    logging), which Python's sys.stderr does not see."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
