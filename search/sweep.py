"""`deeplab sweep`: Ray Tune over Ray Train trials, Optuna TPE + ASHA, logged to MLflow.

Each trial is a Tune function trainable (a tiny CPU share) that runs a `TorchTrainer` with
the trial's resolved config; `TuneReportCallback` relays rank 0's metrics and checkpoint paths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search import placement, tracking
from deeplab_sweep.search.cluster import cluster_address, ray_session
from deeplab_sweep.search.compose import check_sweep, dump_yaml
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.mlflow_callback import TRAIN_DIR, MlflowTrialCallback
from deeplab_sweep.search.objectives import cost_metric, feasible, pareto_front, units_held
from deeplab_sweep.search.overrides import trial_epochs, trial_overrides
from deeplab_sweep.search.pareto import log_pareto
from deeplab_sweep.search.placement import Plan
from deeplab_sweep.search.prepare import prepare_job
from deeplab_sweep.search.progress import ProgressTable
from deeplab_sweep.search.space import build_searcher
from deeplab_sweep.search.sync import read_trials, sync_runs
from deeplab_sweep.search.trial import sweep_trial
from deeplab_sweep.search.warm_start import read_warm_start, seed_searcher
from deeplab_sweep.trainable.ray_train import runs_in_process, worker_resources
from deeplab_sweep.trainable.run_folder import best_report, stored_checkpoints
from deeplab_sweep.trainable.storage import Storage

STOP_REASON_TAG = "stop_reason"  # on a sweep's parent run: which criterion ended it
WARM_START_TAG = "warm_start"  # on a sweep's parent run: the sweeps that seeded its searcher
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def trial_driver_resources() -> tune.PlacementGroupFactory:
    """A trial's driver (Tune's actor; Ray Train's controller runs beside it): memory only, a
    slice of a CPU would keep an exact-fit node from taking a worker; on the node that runs
    this sweep (the head, under `ray job submit`), where workers never go and whose loss would
    end the sweep anyway. A worker node that dies takes only workers with it."""
    node = ray.get_runtime_context().get_node_id()
    return tune.PlacementGroupFactory(
        [{"memory": placement.TRIAL_DRIVER_MEMORY}], bundle_label_selector=[{"ray.io/node-id": node}]
    )


def trial_resources(job: JobConfig) -> tune.PlacementGroupFactory:
    """A one-worker trial trains in its own actor (Ray Train's local mode), which holds that
    worker's resources; a larger one is a driver beside its worker group."""
    if runs_in_process(job.train.num_workers):
        return tune.PlacementGroupFactory([worker_resources(job.train)])
    return trial_driver_resources()


def plan_before_ray(job: JobConfig) -> Plan | None:
    """The plan on the autoscaler's node types, when its config is known: a sweep that cannot
    fit even the largest cluster is refused here, naming the key to change."""
    path = placement.autoscaler_config(job.cluster)
    if path is None:
        return None
    plan = placement.make_plan(job.train, placement.node_types_from_config(path), str(path))
    if plan.at_once_most < 1:
        raise ConfigError(placement.why_not(plan, job.train))
    return plan


def trials_at_once(job: JobConfig, plan: Plan | None) -> int:
    """sweep.max_concurrent, else what the cluster can hold at its largest (the autoscaler's
    maximum where known, else the nodes up now). Never refused because nodes are not up yet:
    trials then wait for them."""
    if job.sweep.max_concurrent:
        return job.sweep.max_concurrent
    if plan is None:
        plan = placement.make_plan(job.train, placement.node_types_now(), "the nodes up now")
    if plan.at_once_most < 1:
        print(f"warning: {placement.why_not(plan, job.train)}; one trial at a time, waiting for nodes", file=sys.stderr)
    return max(1, plan.at_once_most)


def _git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def _dataset_fingerprint(job: JobConfig) -> str:
    """Cheap identity of the data: split sizes and the listed file names, hashed."""
    import hashlib

    h = hashlib.sha1()
    for split in ("train", "val"):
        ds = job.data.spec.build(job.data.root, split)
        h.update(f"{split}:{len(ds)}".encode())
        for img, mask in ds.samples:
            h.update(f"{img.name}|{mask.name}".encode())
    return h.hexdigest()[:16]


def _parent_run(c, exp_id: str, job: JobConfig, name: str, resume: bool) -> str:
    if resume:
        found = c.search_runs([exp_id], filter_string=tracking.sweep_filter(name, tracking.KIND_SWEEP))
        if found:
            c.update_run(found[0].info.run_id, "RUNNING")
            return found[0].info.run_id
    run_id = tracking.start_run(
        c,
        exp_id,
        name,
        job.to_dict(),
        tags={
            tracking.SWEEP_TAG: name,
            tracking.KIND_TAG: tracking.KIND_SWEEP,
            "git_commit": _git_commit(),
            "dataset_fingerprint": _dataset_fingerprint(job),
        },
    )
    c.log_text(run_id, json.dumps({k: v.model_dump() for k, v in job.space.items()}, indent=2), "search_space.json")
    c.log_text(run_id, dump_yaml(job), "sweep_config.yaml")
    return run_id


def run_sweep(job: JobConfig, address: str | None = None, resume: bool = False, verbose: bool = False) -> dict:
    check_sweep(job)
    plan = plan_before_ray(job)
    job = prepare_job(job)
    name = job.sweep.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Storage(f"{job.storage.path.rstrip('/')}/{name}")
    if resume and not storage.is_file(storage.join("tuner.pkl")):
        raise ConfigError(f"sweep.name = {name!r}: nothing to resume at {storage.uri(storage.root)}")
    if not resume and storage.is_dir(storage.root):
        raise ConfigError(
            f"sweep.name = {name!r}: {storage.uri(storage.root)} exists; add --resume to continue it, "
            "or pick another name"
        )
    searcher, param_space = build_searcher(job, name)  # errors in the space surface before Ray starts
    if searcher is not None and not resume and searcher.study_exists():
        raise ConfigError(
            f"sweep.name = {name!r}: {job.sweep.optuna_storage} already holds an Optuna study of "
            "that name; pick another name, or add --resume to continue that sweep"
        )
    cluster_address(job.cluster, address)  # an unreachable cluster is reported before any MLflow run
    _quiet_mlflow_retries()
    c = tracking.client(job.mlflow)
    exp_id = tracking.ensure_experiment(job.mlflow)
    # Read before the parent run exists: a sweep named wrongly is refused with nothing logged.
    warm = read_warm_start(c, exp_id, job) if job.sweep.warm_start and not resume else None
    parent = _parent_run(c, exp_id, job, name, resume)
    if warm is not None:
        seed_searcher(searcher, warm)
        _log_warm_start(c, parent, warm)
    try:
        with ray_session(job.cluster, address, verbose):
            tuner = _tuner(job, name, storage, searcher, param_space, exp_id, parent, resume, verbose, plan)
            results = tuner.fit()
        # The study Tune's (possibly restored) searcher wrote is in Optuna's storage: `searcher`
        # reads it from there.
        return _finish(results, c, exp_id, job, storage, parent, searcher)
    except BaseException as e:
        with contextlib.suppress(Exception):  # MLflow down must not hide the real error
            tracking.finish_run(c, parent, tracking.FAILED, f"{type(e).__name__}: {str(e)[:300]}")
        raise


def _log_warm_start(c, parent: str, warm) -> None:
    c.set_tag(parent, WARM_START_TAG, ",".join(warm.per_sweep))
    c.log_metric(parent, "warm_start/trials", len(warm.trials))
    c.log_metric(parent, "warm_start/skipped_outside_space", warm.outside_space)
    c.log_dict(
        parent,
        {"per_sweep": warm.per_sweep, "outside_space": warm.outside_space, "failed": warm.failed},
        "warm_start.json",
    )


def _quiet_mlflow_retries() -> None:
    """A tracking server that goes down mid-sweep must cost seconds per attempt, not MLflow's
    default minutes of retries; and each retry would print a urllib3 warning, where the
    callback says once that MLflow is down."""
    for var, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _tuner(
    job: JobConfig,
    name: str,
    storage: Storage,
    searcher,
    param_space: dict,
    exp_id: str,
    parent: str,
    resume: bool,
    verbose: bool,
    plan: Plan | None,
) -> tune.Tuner:
    base = job.run.to_dict()
    in_process = runs_in_process(job.train.num_workers)
    train_dir = storage.uri(storage.join(TRAIN_DIR))
    s = job.sweep
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, base=base, sweep_dir=train_dir, metric=s.metric, mode=s.mode),
        trial_resources(job),
    )
    if resume:
        # Tune restores its callbacks and searcher from the sweep folder, as they were pickled.
        return tune.Tuner.restore(
            storage.uri(storage.root), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    callback = MlflowTrialCallback(
        job.mlflow,
        exp_id,
        parent,
        name,
        base,
        s.metric,
        s.mode,
        job.train.epochs,
        sweep_uri=storage.uri(storage.root),
        also=s.also_best,
        cost=(cost_metric(job.train), units_held(job.train)),
    )
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=job.epoch_bounds()[1],
            grace_period=s.asha.grace_period,
            reduction_factor=s.asha.reduction_factor,
        )
        if s.asha.enabled
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=trials_at_once(job, plan),
            # An in-process trial's actor has torch imported and its data cached: the next
            # trial starts in it.
            reuse_actors=in_process,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=job.storage.path,
            callbacks=[
                callback,
                ProgressTable(s.metric, job.train.epochs, worker_resources(job.train), job.train.num_workers),
            ],
            verbose=1 if verbose else 0,
            # A worker group is retried by Ray Train; an in-process trial, by Tune (from the
            # checkpoints it stored).
            failure_config=tune.FailureConfig(max_failures=job.train.max_failures if in_process else 0),
        ),
    )


def _finish(results, c, exp_id: str, job: JobConfig, storage: Storage, parent: str, searcher) -> dict:
    """What the trial callback could not write (MLflow down, or a previous driver's queue lost
    to a crash) is in Ray's results: written now; then the summary on the parent run."""
    records = read_trials(storage)
    try:
        sync_runs(c, exp_id, parent, job, storage, update_parent=False, records=records)
        mlflow_error = None
    except Exception as e:  # noqa: BLE001 - any client/transport error
        mlflow_error = tracking.one_line(e)
    summary = _summarise(results, None if mlflow_error else c, exp_id, job, storage, parent, records)
    summary["stop_reason"] = stop_reason(searcher, len(results))
    study = getattr(searcher, "study", None)
    if study is not None:  # what Optuna was told: ASHA-stopped trials must be PRUNED
        states = [t.state.name for t in study.trials]
        summary["optuna_states"] = {st: states.count(st) for st in sorted(set(states))}
    if mlflow_error is None:
        _log_parent_summary(c, parent, summary, searcher, job)
        tracking.finish_run(c, parent, tracking.COMPLETED)
    else:
        summary["mlflow_error"] = mlflow_error
        where = storage.uri(storage.root)
        print(
            f"MLflow did not answer at the end of the sweep ({mlflow_error}). Nothing is lost: every "
            f"trial's results are in {where}. Once the server answers, run:\n"
            f"  deeplab sync {where} --tracking-uri {job.mlflow.tracking_uri} "
            f"--experiment {job.mlflow.experiment}",
            file=sys.stderr,
        )
    return summary


def _summarise(results, c, exp_id: str, job: JobConfig, storage: Storage, parent: str, records: list) -> dict:
    """Per-trial rows from Tune's results joined with the trials' MLflow runs: MLflow holds each
    trial's best metric and checkpoint, also for trials finished before a resume (the callback
    that logged them may have been a previous process's). Without MLflow (`c` None: it did not
    answer), the same comes from Ray's results in the sweep folder (`records`)."""
    s = job.sweep
    metric, name = s.metric, storage.root.rsplit("/", 1)[-1]
    runs = (
        {}
        if c is None
        else {
            r.data.tags.get(tracking.TRIAL_TAG): r
            for r in c.search_runs([exp_id], filter_string=tracking.sweep_filter(name, tracking.KIND_TRIAL))
        }
    )
    records = {rec.trial_id: rec for rec in records}
    rows = [_trial_row(r, runs, records, job, storage) for r in results]
    full = sum(trial_epochs(r.config or {}, job.train.epochs) for r in results)
    trained = sum(row["epochs"] or 0 for row in rows)
    # What early stopping saved: every trial run to its last epoch would have cost `full`.
    compute = {
        "epochs_trained": trained,
        "epochs_if_all_ran_in_full": full,
        "saved": 1 - trained / full if full else 0.0,
        cost_metric(job.train): sum(row["cost"] or 0.0 for row in rows),
    }
    constraints = s.constraint_list()
    # A failed trial keeps its checkpoints for inspection but is not a candidate for best, nor
    # is one that breaks a constraint.
    scored = [row for row in rows if row[metric] is not None and not row["error"] and feasible(row, constraints)]
    pick = max if s.mode == "max" else min
    best_row = pick(scored, key=lambda r: r[metric]) if scored else None
    front = (
        pareto_front([r for r in rows if r["status"] == tracking.COMPLETED], s.objective_list, constraints)
        if s.objectives
        else None
    )
    return {
        "sweep": name,
        "parent_run_id": parent,
        "trials": rows,
        "best": best_row,
        "pareto_front": front,
        "compute": compute,
        "experiment": job.mlflow.experiment,
        "tracking_uri": job.mlflow.tracking_uri,
        "sweep_path": storage.uri(storage.root),
    }


def _trial_row(r, runs: dict, records: dict, job: JobConfig, storage: Storage) -> dict:
    """One trial: its params, epochs, end, cost and its best checkpoint's metric values (from
    its MLflow run, else from its stored checkpoints)."""
    s = job.sweep
    trial_id = (r.metrics or {}).get("trial_id")
    run = runs.get(trial_id)
    names = (s.metric, *s.also_best)
    values = {m: run.data.metrics.get(f"best/{m}") for m in names} if run else dict.fromkeys(names)
    checkpoint = run.data.tags.get(tracking.BEST_CHECKPOINT_TAG) if run else None
    if run is None and trial_id in records:
        kept = stored_checkpoints(storage, storage.join(TRAIN_DIR, trial_id))
        best = best_report(kept, s.metric, s.mode)
        if best:
            values, checkpoint = {m: best.get(m) for m in names}, best["checkpoint_path"]
    epochs = (r.metrics or {}).get("epoch")
    error = str(r.error).splitlines()[0][:200] if r.error else None
    cost = run.data.metrics.get(cost_metric(job.train)) if run else None
    return {
        "trial_id": trial_id,
        "params": trial_overrides(r.config or {}),
        "epochs": epochs,
        **values,
        "status": tracking.end_status(error, epochs or 0, trial_epochs(r.config or {}, job.train.epochs)),
        "cost": cost,
        "error": error,
        "run_id": run.info.run_id if run else None,
        "checkpoint": checkpoint,
    }


def stop_reason(searcher, trials: int) -> str:
    """Which criterion ended the sweep: a budget, no improvement, or every trial asked for ran."""
    completion = getattr(searcher, "completion", None)
    reason = completion.reason if completion is not None else None
    return reason or f"num_samples: all {trials} trials ran"


def _log_parent_summary(c, parent: str, summary: dict, searcher, job: JobConfig) -> None:
    metric = job.sweep.metric
    c.log_dict(parent, summary, "summary.json")
    c.set_tag(parent, STOP_REASON_TAG, summary["stop_reason"])
    compute = summary["compute"]
    c.log_metric(parent, "compute/epochs_trained", compute["epochs_trained"])
    c.log_metric(parent, "compute/epochs_if_all_ran_in_full", compute["epochs_if_all_ran_in_full"])
    c.log_metric(parent, "compute/saved_by_early_stopping", compute["saved"])
    unit = cost_metric(job.train)
    c.log_metric(parent, f"compute/{unit.split('/', 1)[1]}", compute[unit])
    best = summary["best"]
    if best:
        c.log_metric(parent, f"best/{metric}", float(best[metric]))
        c.set_tag(parent, tracking.BEST_TRIAL_TAG, best["trial_id"])
        c.set_tag(parent, tracking.BEST_RUN_TAG, best["run_id"] or "")
    if summary["pareto_front"] is not None:
        log_pareto(c, parent, summary, job.sweep.objective_list)
    study = getattr(searcher, "study", None)
    if study is None:
        return
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(done) >= 2:
        with warnings.catch_warnings():
            # Optuna warns about small samples and experimental plots: expected in small sweeps.
            warnings.simplefilter("ignore")
            _log_importances(c, parent, study)


def _log_importances(c, parent: str, study) -> None:
    import matplotlib
    import optuna

    # With several objectives: importances for the first (the sweep's metric).
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=target
        )
        c.log_dict(parent, importances, "param_importances.json")
        for k, v in importances.items():
            c.log_metric(parent, f"importance/{k.replace('|', '_')}", float(v))
    except (ValueError, RuntimeError):
        pass  # too few distinct trials for an importance estimate
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    try:
        ax = plot_parallel_coordinate(study, target=target)
    except (ValueError, RuntimeError):
        return
    c.log_figure(parent, ax.figure, "parallel_coordinates.png")
    plt.close(ax.figure)


def summary_table(summary: dict, metric: str) -> str:
    lines = [f"{'trial':<14} {'epochs':>6} {metric:>10}  params"]
    for r in summary["trials"]:
        v = r[metric]
        lines.append(
            f"{r['trial_id'] or '?':<14} {r['epochs'] or 0:>6} {f'{v:.4f}' if v is not None else '-':>10}  "
            + " ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
            + (f"  FAILED: {r['error']}" if r["error"] else "")
        )
    compute = summary["compute"]
    cost = next((f"{v:.4g} {k.split('/', 1)[1]}" for k, v in compute.items() if k.startswith("cost/")), "")
    lines.append(
        f"compute: {compute['epochs_trained']} of {compute['epochs_if_all_ran_in_full']} epochs "
        f"({compute['saved']:.0%} saved by early stopping), {cost}"
    )
    if summary.get("pareto_front") is not None:
        lines.append(f"Pareto front: {', '.join(r['trial_id'] for r in summary['pareto_front']) or 'empty'}")
    lines.append(f"stopped by {summary['stop_reason']}")
    return "\n".join(lines)


def plan_text(job: JobConfig, address: str | None = None) -> str:
    """`deeplab sweep --plan`: per-trial resources, placement, trials at once now and at the
    largest, expected GPU-hours; no trial starts. Raises ConfigError when it cannot fit."""
    check_sweep(job)
    plan = plan_before_ray(job)
    if plan is None:
        plan = _plan_on_nodes_up(job, address)
        if plan.at_once_most < 1:
            raise ConfigError(placement.why_not(plan, job.train))
    return "\n".join([*placement.describe(plan), *placement.cost_lines(job)])


def _plan_on_nodes_up(job: JobConfig, address: str | None) -> Plan:
    """Without an autoscaler config: the cluster being joined as it is now, or this machine."""
    if cluster_address(job.cluster, address):
        with ray_session(job.cluster, address):
            return placement.make_plan(job.train, placement.node_types_now(), "the nodes up now")
    import os

    import torch

    res = {
        "CPU": float(job.cluster.num_cpus or os.cpu_count() or 1),
        "GPU": float(job.cluster.num_gpus if job.cluster.num_gpus is not None else torch.cuda.device_count()),
    }
    node = placement.NodeType("this machine", {k: v for k, v in res.items() if v}, 1, 1)
    return placement.make_plan(job.train, [node], "a local Ray on this machine")
