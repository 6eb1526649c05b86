"""MLflow wiring: experiment set-up on the driver, params from the resolved config, per-epoch
metrics with step, checkpoint + config artifacts, and run status tags.

Only the driver or the Ray Train controller (one process per run) talks to MLflow, never a
DDP rank, so a run never appears once per worker.
"""
from __future__ import annotations

import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.train.v2.api.callback import UserCallback

from trainable.config import MlflowConfig, redacted, resolve_path

# Param values beyond this are cut by MLflow servers; configs never get near it.
MAX_PARAM_LEN = 6000
STATUS_TAG = "deeplab.status"


def resolve_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: Ray actors run in other folders."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def resolved(cfg: MlflowConfig) -> MlflowConfig:
    """Absolute store and artifact locations. An explicit artifact location is always passed:
    left to MLflow, artifacts of a local store land in whatever folder a Ray actor runs in."""
    loc = cfg.artifact_location
    remote = cfg.tracking_uri.startswith(("http://", "https://", "databricks"))
    if loc is None and not remote:
        loc = "runs/mlartifacts"
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
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as e:
        from search.configs import ConfigError

        reason = getattr(e, "reason", e)
        raise ConfigError(f"mlflow.tracking_uri = {uri!r}: tracking server does not answer ({reason})") from None


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
    out = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k in ("epoch", "training_iteration"):
            continue
        out.append(Metric(k, float(v), timestamp_ms, step))
    return out


def log_metrics(c: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    entities = metric_entities(metrics, step, int(time.time() * 1000))
    for i in range(0, len(entities), 900):  # MLflow caps a batch at 1000 metrics
        c.log_batch(run_id, metrics=entities[i:i + 900])


def start_run(c: MlflowClient, experiment_id: str, name: str, cfg_dict: dict, tags: dict | None = None,
              parent_run_id: str | None = None) -> str:
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


def log_visuals(c: MlflowClient, run_id: str, folder: str | Path, skip: set[str] = frozenset()) -> int:
    """The eval PNGs (image grid, confusion matrix; rank 0 writes them next to the checkpoint)
    in `folder`, under visuals/ in the run; those named in `skip` (already there) are not."""
    from trainable.engine import VISUALS_DIR

    logged = 0
    for f in sorted(Path(folder).glob("*.png")) if Path(folder).is_dir() else []:
        if f"{VISUALS_DIR}/{f.name}" not in skip:
            c.log_artifact(run_id, str(f), artifact_path=VISUALS_DIR)
            logged += 1
    return logged


def logged_visuals(c: MlflowClient, run_id: str) -> set[str]:
    from trainable.engine import VISUALS_DIR

    return {a.path for a in c.list_artifacts(run_id, VISUALS_DIR)}


def one_line(e: BaseException) -> str:
    """An exception as one short line (MLflow's and urllib3's span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def finish_run(c: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """status: completed | pruned | failed; MLflow's own status follows (FAILED for failed)."""
    c.set_tag(run_id, STATUS_TAG, status if reason is None else f"{status}: {reason}"[:5000])
    c.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")


class MlflowReportCallback(UserCallback):
    """Ray Train controller callback: rank 0's metrics of each report into one MLflow run.
    MLflow down does not stop training: reports are queued and written at the next report
    that reaches it (what is still queued when the run ends is only in Ray's checkpoints)."""

    def __init__(self, tracking_uri: str, run_id: str, visuals_dir: str, metric: str = "val/mIoU"):
        self.tracking_uri, self.run_id, self.metric = tracking_uri, run_id, metric
        self.visuals_dir = visuals_dir  # where the workers persist the eval PNGs (ray_train.run_visuals)
        self._last_step: int | None = None
        self._pending: list[dict] = []
        self._down = False

    def after_report(self, run_context, metrics, checkpoint):
        self._pending.append(dict(metrics[0]))
        try:
            self._flush(MlflowClient(self.tracking_uri))
        except Exception as e:  # noqa: BLE001 - any client/transport error: keep them queued
            if not self._down:
                print(f"MLflow is not answering; training goes on and the metrics are queued: {one_line(e)}",
                      file=sys.stderr)
            self._down = True
            return
        self._down = False

    def _flush(self, c: MlflowClient) -> None:
        if self._last_step is None:  # a restored run replays its checkpoint's epoch first
            self._last_step = max((h.step for h in c.get_metric_history(self.run_id, self.metric)), default=0)
        while self._pending:
            m = self._pending[0]
            step = int(m.get("epoch", 0))
            if step > self._last_step:
                log_metrics(c, self.run_id, m, step=step)
                self._last_step = step
            self._pending.pop(0)
        log_visuals(c, self.run_id, self.visuals_dir, skip=logged_visuals(c, self.run_id))
