"""`deeplab best`: the best run of an experiment found through MLflow, its checkpoint
downloaded, loaded and described; optionally registered in the model registry."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search import tracking
from deeplab_sweep.search.tracking import check_server, resolve_tracking_uri
from deeplab_sweep.trainable.inference import load_model
from deeplab_sweep.trainable.run_config import DEFAULT_METRIC


def find_best_run(
    c: MlflowClient, experiment: str, metric: str = DEFAULT_METRIC, mode: str = "max", sweep: str | None = None
):
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise ConfigError(
            f"--experiment {experiment!r}: no such MLflow experiment; known: {', '.join(names) or 'none'}"
        )
    filters = [f"tags.`{tracking.KIND_TAG}` != '{tracking.KIND_SWEEP}'", "attributes.status != 'FAILED'"]
    if sweep:
        filters.append(f"tags.`{tracking.SWEEP_TAG}` = '{sweep}'")
    order = "DESC" if mode == "max" else "ASC"
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=" and ".join(filters),
        order_by=[f"metrics.`best/{metric}` {order}"],
        max_results=50,
    )
    runs = [r for r in runs if f"best/{metric}" in r.data.metrics]
    if not runs:
        raise ConfigError(
            f"--metric {metric!r}: no run in experiment {experiment!r} logged best/{metric} with a checkpoint"
        )
    return runs[0]


def fetch_best(
    tracking_uri: str,
    experiment: str,
    out: Path,
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
    sweep: str | None = None,
    register: str | None = None,
    alias: str = "best",
) -> dict:
    tracking_uri = tracking.credentials_to_env(tracking_uri)
    check_server(tracking_uri)
    c = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        run = find_best_run(c, experiment, metric, mode, sweep)
        dest = out / run.info.run_id
        dest.mkdir(parents=True, exist_ok=True)
        local = Path(c.download_artifacts(run.info.run_id, "checkpoint", str(dest)))
    except MlflowException as e:
        raise ConfigError(f"--tracking-uri {tracking_uri!r}: {str(e).splitlines()[0][:300]}") from None
    model, cfg, ckpt = load_model(local)  # proves the checkpoint loads, not only that it downloaded
    info = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiment,
        "metric": metric,
        "value": run.data.metrics[f"best/{metric}"],
        "checkpoint_epoch": ckpt["epoch"],
        "checkpoint_metric": ckpt["metrics"].get(metric),
        "local_path": str(local / "checkpoint.pt"),
        "artifact_uri": f"{run.info.artifact_uri}/checkpoint",
        "params": {
            k: v
            for k, v in sorted(run.data.params.items())
            if k.split(".")[0] in ("model", "train", "data") and not k.startswith("data.root")
        },
        "model": {
            "backbone": cfg.model.backbone,
            "output_stride": cfg.model.output_stride,
            "num_classes": cfg.data.num_classes,
            "dataset": cfg.data.name,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    }
    if register:
        info["registered"] = _register(c, run.info.run_id, register, alias)
    return info


def _register(c: MlflowClient, run_id: str, name: str, alias: str) -> dict:
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="DeepLabv3+ checkpoints registered by `deeplab best`")
    run = c.get_run(run_id)
    mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/checkpoint", run_id=run_id)
    c.set_registered_model_alias(name, alias, mv.version)
    return {"name": name, "version": mv.version, "alias": alias}
