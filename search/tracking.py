"""MLflow's vocabulary here (tag names, run kinds, end statuses) and the basic operations on it:
the experiment set up on the driver, params from the resolved config, metrics with step,
checkpoint + config artifacts, run status.

Only the driver or the Ray Train controller (one process per run) talks to MLflow, never a
DDP rank, so a run never appears once per worker.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from deeplab_sweep.errors import ServiceUnreachable
from deeplab_sweep.search.stores import ensure_sqlite
from deeplab_sweep.trainable.credentials import credentials_to_env, redacted
from deeplab_sweep.trainable.run_config import DEFAULT_ARTIFACTS, MlflowConfig, resolve_path

# Tags: what a run is, which sweep and trial it belongs to, how it ended, its best checkpoint.
KIND_TAG = "deeplab.kind"
SWEEP_TAG = "deeplab.sweep"
TRIAL_TAG = "deeplab.trial_id"
STATUS_TAG = "deeplab.status"
BEST_CHECKPOINT_TAG = "deeplab.best_checkpoint"
PARETO_TAG = "deeplab.pareto_front"  # "true" on the runs of a multi-objective sweep's front
BEST_TRIAL_TAG = "best_trial_id"  # on a sweep's parent run
BEST_RUN_TAG = "best_run_id"
STOP_REASON_TAG = "stop_reason"  # on a sweep's parent run: which criterion ended it
WARM_START_TAG = "warm_start"  # on a sweep's parent run: the sweeps that seeded its searcher
FINGERPRINT_TAG = "dataset_fingerprint"  # on a sweep's parent run: which data its trials saw

KIND_SWEEP, KIND_TRIAL, KIND_TRAIN = "sweep", "trial", "train"
COMPLETED, PRUNED, FAILED = "completed", "pruned", "failed"
INTERRUPTED = "interrupted"  # stopped by Ctrl-C or `ray job stop`: --resume continues it

# Param values beyond this are cut by MLflow servers; configs never get near it.
MAX_PARAM_LEN = 6000


def end_status(error: str | None, last_epoch: int, epochs: int) -> str:
    """How a trial ended: failed (an error), completed (every epoch), else pruned (stopped early
    by the scheduler, without an error)."""
    if error:
        return FAILED
    return COMPLETED if last_epoch >= epochs else PRUNED


def best_metric(metric: str) -> str:
    """The name a run logs `metric` under at its best checkpoint: how every trial is judged."""
    return f"best/{metric}"


def run_value(run, metric: str):
    """A run's value of `metric` at its best checkpoint, else its last logged one."""
    return run.data.metrics.get(best_metric(metric), run.data.metrics.get(metric))


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S")


def error_reason(text: str) -> str:
    """The innermost exception line of a traceback ("pkg.mod.Error: message"), for a failed
    run's status: Ray wraps worker errors, and the user wants the worker's own exception."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (found[-1] if found else lines[-1] if lines else "unknown error")[:500]


def all_runs(c: MlflowClient, experiment_ids: list[str], filter_string: str) -> list:
    """Every run the filter matches (a page of `search_runs` holds 1,000 at most)."""
    runs, token = [], None
    while True:
        page = c.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def runs_link(tracking_uri: str, experiment_id: str) -> str:
    """Where MLflow's UI lists an experiment's training runs (it opens on an empty GenAI page
    otherwise). A local store is served by `deeplab ui`."""
    page = f"#/experiments/{experiment_id}/runs"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after `deeplab ui`)"


def sweep_filter(sweep: str, kind: str) -> str:
    return f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KIND_TAG}` = '{kind}'"


def resolve_tracking_uri(uri: str, library: str = "mlflow") -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db (Ray actors run in other folders); a
    store of `library` ("mlflow" or "optuna") that does not exist yet is copied from its empty
    template (`stores.ensure_sqlite`) rather than migrated from nothing."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    file, query, options = uri[len(prefix) :].partition("?")  # sqlite:///x.db?timeout=30
    path = Path(file).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_sqlite(path, library)
    return prefix + str(path) + query + options


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send, for our own health check."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None and password is not None:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def resolved(cfg: MlflowConfig) -> MlflowConfig:
    """Absolute store and artifact locations, credentials out of the URI. An explicit artifact
    location is always passed: left to MLflow, artifacts of a local store land in whatever
    folder a Ray actor runs in."""
    cfg = cfg.model_copy(update={"tracking_uri": credentials_to_env(cfg.tracking_uri)})
    # An s3://KEY:SECRET@ location would be stored with the experiment, where every user reads it.
    loc = credentials_to_env(cfg.artifact_location) if cfg.artifact_location else None
    remote = cfg.tracking_uri.startswith(("http://", "https://", "databricks"))
    if loc is None and not remote:
        loc = DEFAULT_ARTIFACTS
    if loc is not None and "://" not in loc and not loc.startswith("mlflow-artifacts:"):
        loc = Path(resolve_path(loc)).as_uri()
    return cfg.model_copy(update={"tracking_uri": resolve_tracking_uri(cfg.tracking_uri), "artifact_location": loc})


def client(cfg: MlflowConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking_uri)


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server must answer before a run starts: MLflow's client would retry
    with back-off for minutes before failing."""
    if not uri.startswith(("http://", "https://")):
        return
    uri = credentials_to_env(uri)
    try:
        request = urllib.request.Request(f"{uri.rstrip('/')}/health", headers=_auth_headers())
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServiceUnreachable(f"mlflow.tracking_uri = {uri!r}: tracking server does not answer ({reason})") from None


def ensure_experiment(cfg: MlflowConfig) -> str:
    """Created here, on the driver, before any trial starts (parallel creation races)."""
    check_server(cfg.tracking_uri)
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location)


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_params(cfg_dict: dict) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flatten(redacted(cfg_dict)).items())]


def metric_entities(metrics: dict, step: int, timestamp_ms: int) -> list[Metric]:
    """The numeric metrics of a report ("section/name" keys: train/loss, val/mIoU, ...)."""
    out = []
    for k, v in metrics.items():
        if "/" not in k or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out.append(Metric(k, float(v), timestamp_ms, step))
    return out


BATCH_METRICS = 900  # MLflow caps a `log_batch` at 1,000 metrics


def metric_batches(reports: list[tuple[int, dict]], timestamp_ms: int) -> list[tuple[list[int], list[Metric]]]:
    """Reports (step, metrics) grouped into as few `log_batch` requests as MLflow takes, each
    report whole in one of them (a report over the cap alone, in pieces): (steps, metrics)."""
    batches: list[tuple[list[int], list[Metric]]] = []
    for step, metrics in reports:
        entities = metric_entities(metrics, step, timestamp_ms)
        if batches and len(batches[-1][1]) + len(entities) <= BATCH_METRICS:
            batches[-1][0].append(step)
            batches[-1][1].extend(entities)
        else:
            batches.append(([step], entities))
    return batches


def log_metrics(c: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for i in range(0, len(metrics), BATCH_METRICS):
        c.log_batch(run_id, metrics=metrics[i : i + BATCH_METRICS])


def start_run(
    c: MlflowClient,
    experiment_id: str,
    name: str,
    cfg_dict: dict,
    tags: dict | None = None,
    parent_run_id: str | None = None,
) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id, run_name=name, tags=all_tags)
    c.log_batch(run.info.run_id, params=config_params(cfg_dict))
    return run.info.run_id


def log_checkpoint(c: MlflowClient, run_id: str, checkpoint_dir: str | Path, cfg_dict: dict) -> None:
    c.log_artifacts(run_id, str(checkpoint_dir), artifact_path="checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "config.yaml"
        p.write_text(yaml.safe_dump(redacted(cfg_dict), sort_keys=False))
        c.log_artifact(run_id, str(p))


def one_line(e: BaseException) -> str:
    """An exception as one short line (MLflow's and urllib3's span several)."""
    return f"{type(e).__name__}: {redacted(' '.join(str(e).split()))[:200]}"


def finish_run(c: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """status: completed | pruned | failed | interrupted; MLflow's own status follows."""
    c.set_tag(run_id, STATUS_TAG, status_text(status, reason))
    c.set_terminated(run_id, mlflow_status(status))


def status_text(status: str, reason: str | None) -> str:
    """The run's deeplab.status tag."""
    return status if reason is None else f"{status}: {reason}"[:5000]


def mlflow_status(status: str) -> str:
    """MLflow's run status for ours: FAILED, KILLED for an interrupted run, else FINISHED."""
    return {FAILED: "FAILED", INTERRUPTED: "KILLED"}.get(status, "FINISHED")
