"""`deeplab best`: the best run of an experiment found through MLflow, its checkpoint
downloaded, loaded and described; optionally registered in the model registry."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search import tracking
from deeplab_sweep.search.objectives import Constraint, feasible, parse_constraint
from deeplab_sweep.search.tracking import check_server, resolve_tracking_uri
from deeplab_sweep.trainable.credentials import credentials_to_env
from deeplab_sweep.trainable.inference import load_model
from deeplab_sweep.trainable.run_config import DEFAULT_METRIC


def find_best_run(
    c: MlflowClient, experiment: str, metric: str = DEFAULT_METRIC, mode: str = "max", sweep: str | None = None
):
    exp_id = _experiment_id(c, experiment)
    filters = [f"tags.`{tracking.KIND_TAG}` != '{tracking.KIND_SWEEP}'", "attributes.status != 'FAILED'"]
    if sweep:
        filters.append(f"tags.`{tracking.SWEEP_TAG}` = '{sweep}'")
    order = "DESC" if mode == "max" else "ASC"
    runs = c.search_runs(
        [exp_id],
        filter_string=" and ".join(filters),
        order_by=[f"metrics.`{tracking.best_metric(metric)}` {order}"],
        max_results=50,
    )
    runs = [r for r in runs if tracking.best_metric(metric) in r.data.metrics]
    if not runs:
        raise ConfigError(
            f"--metric {metric!r}: no run in experiment {experiment!r} logged {tracking.best_metric(metric)} "
            "with a checkpoint"
        )
    return runs[0]


def _experiment_id(c: MlflowClient, experiment: str) -> str:
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise ConfigError(
            f"--experiment {experiment!r}: no such MLflow experiment; known: {', '.join(names) or 'none'}"
        )
    return exp.experiment_id


def pareto_sweep(c: MlflowClient, experiment: str, sweep: str | None):
    """The parent run of `sweep`, else of the latest sweep with a Pareto front."""
    filters = [f"tags.`{tracking.KIND_TAG}` = '{tracking.KIND_SWEEP}'", "metrics.`pareto/front_size` >= 0"]
    if sweep:
        filters.append(f"tags.`{tracking.SWEEP_TAG}` = '{sweep}'")
    runs = c.search_runs(
        [_experiment_id(c, experiment)],
        filter_string=" and ".join(filters),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        which = f"sweep {sweep!r}" if sweep else f"experiment {experiment!r}"
        raise ConfigError(f"--pareto: {which} has no multi-objective sweep with a Pareto front (sweep.objectives)")
    return runs[0]


def objectives_of(parent) -> dict[str, str]:
    """The sweep's objectives in its order (MLflow keeps params sorted: sweep.metric is first)."""
    prefix = "sweep.objectives."
    found = {k[len(prefix) :]: v for k, v in parent.data.params.items() if k.startswith(prefix)}
    first = parent.data.params.get("sweep.metric")
    return {first: found[first], **found} if first in found else found


def read_front(c: MlflowClient, experiment: str, sweep: str | None) -> tuple[object, dict, list]:
    """(parent run, objectives, the front's runs) of a multi-objective sweep."""
    parent = pareto_sweep(c, experiment, sweep)
    name = parent.data.tags[tracking.SWEEP_TAG]
    runs = c.search_runs(
        [parent.info.experiment_id],
        filter_string=f"{tracking.sweep_filter(name, tracking.KIND_TRIAL)} and tags.`{tracking.PARETO_TAG}` = 'true'",
    )
    return parent, objectives_of(parent), runs


def pick_from_front(c: MlflowClient, experiment: str, sweep: str | None, objective: str, constraints: list[Constraint]):
    """The front trial best in `objective` among those that meet `constraints`."""
    parent, objectives, runs = read_front(c, experiment, sweep)
    if objective not in objectives:
        raise ConfigError(
            f"--objective {objective!r}: not an objective of sweep {parent.data.tags[tracking.SWEEP_TAG]!r} "
            f"(its objectives: {', '.join(objectives)})"
        )
    ok = [
        r
        for r in runs
        if tracking.run_value(r, objective) is not None and feasible(_values(r, constraints), constraints)
    ]
    if not ok:
        shown = " and ".join(map(str, constraints)) or "(none)"
        raise ConfigError(f"--constraint {shown}: no trial of the Pareto front meets it ({len(runs)} on the front)")
    sign = 1 if objectives[objective] == "max" else -1
    return max(ok, key=lambda r: sign * tracking.run_value(r, objective)), objectives[objective]


def _values(run, constraints: list[Constraint]) -> dict:
    return {c.metric: tracking.run_value(run, c.metric) for c in constraints}


def fetch_best(
    tracking_uri: str,
    experiment: str,
    out: Path,
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
    sweep: str | None = None,
    register: str | None = None,
    alias: str = "best",
    objective: str | None = None,
    constraints: tuple[str, ...] = (),
    model_factory: str | None = None,
    log_model: bool = False,
) -> dict:
    """The best run by `metric`; or, with `objective`, the best on it of a multi-objective
    sweep's Pareto front that meets `constraints` (METRIC<=N / METRIC>=N). `model_factory`:
    the user's own model the checkpoint may name (`inference.load_model`). `log_model` (and
    `register`, which implies it): the checkpoint as an MLflow Model, an output of its run."""
    parsed = [parse_constraint(text, "--constraint") for text in constraints]
    tracking_uri = credentials_to_env(tracking_uri)
    check_server(tracking_uri)
    resolved = resolve_tracking_uri(tracking_uri)
    c = MlflowClient(resolved)
    try:
        if objective is not None:
            run, mode = pick_from_front(c, experiment, sweep, objective, parsed)
            metric = objective
        else:
            run = find_best_run(c, experiment, metric, mode, sweep)
        dest = out / run.info.run_id
        dest.mkdir(parents=True, exist_ok=True)
        local = Path(c.download_artifacts(run.info.run_id, "checkpoint", str(dest)))
    except MlflowException as e:
        raise ConfigError(f"--tracking-uri {tracking_uri!r}: {str(e).splitlines()[0][:300]}") from None
    # Proves the checkpoint loads, not only that it downloaded (its own model code only if named).
    model, cfg, ckpt = load_model(local, model_factory=model_factory)
    info = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiment,
        "metric": metric,
        "value": tracking.run_value(run, metric),
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
    if log_model or register:
        from deeplab_sweep.search import mlflow_model  # MLflow's model machinery: only when asked

        logged = mlflow_model.log_model(c, resolved, run, local / "checkpoint.pt", cfg, ckpt, model_factory)
        info["logged_model"] = {"model_id": logged.model_id, "uri": f"models:/{logged.model_id}"}
        if register:
            info["registered"] = mlflow_model.register(c, resolved, logged, register, alias)
    return info


def list_front(tracking_uri: str, experiment: str, sweep: str | None) -> dict:
    """`deeplab best --pareto`: the front of a multi-objective sweep, best first on its first
    objective, each trial with its objectives, run, params and checkpoint."""
    tracking_uri = credentials_to_env(tracking_uri)
    check_server(tracking_uri)
    c = MlflowClient(resolve_tracking_uri(tracking_uri))
    parent, objectives, runs = read_front(c, experiment, sweep)
    first, mode = next(iter(objectives.items()))
    searched = _searched(c, parent)
    rows = [
        {
            "run_id": r.info.run_id,
            "trial_id": r.data.tags.get(tracking.TRIAL_TAG),
            **{m: tracking.run_value(r, m) for m in objectives},
            "params": {k: v for k, v in sorted(r.data.params.items()) if k in searched},
            "checkpoint": r.data.tags.get(tracking.BEST_CHECKPOINT_TAG),
        }
        for r in runs
    ]
    rows.sort(key=lambda row: row[first], reverse=mode == "max")
    return {"sweep": parent.data.tags[tracking.SWEEP_TAG], "objectives": objectives, "front": rows}


def _searched(c: MlflowClient, parent) -> set[str]:
    """The keys the sweep searched: its parent run's search_space.json."""
    with tempfile.TemporaryDirectory() as tmp:
        return set(json.loads(Path(c.download_artifacts(parent.info.run_id, "search_space.json", tmp)).read_text()))
