"""`deeplab sweep`, top to bottom: prepare (every check, before Ray), open the MLflow parent
run, start or join Ray, run Tune over the trials (Optuna TPE + ASHA, each trial a Ray Train
run), then write what MLflow missed and the summary.

Each trial is a Tune function trainable (`trial.sweep_trial`); a one-worker trial trains in
its own actor, a larger one runs a `TorchTrainer` whose `TuneReportCallback` relays rank 0's
metrics and checkpoint paths.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from deeplab_sweep.search import tracking
from deeplab_sweep.search.cluster import RaySession
from deeplab_sweep.search.compose import dump_yaml
from deeplab_sweep.search.early_stopping import scheduler
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.mlflow_callback import MlflowTrialCallback
from deeplab_sweep.search.objectives import cost_metric, units_held
from deeplab_sweep.search.placement import TRIAL_DRIVER_MEMORY, trials_at_once
from deeplab_sweep.search.prepare import PreparedSweep, prepare_sweep
from deeplab_sweep.search.progress import ProgressTable, StatusLines
from deeplab_sweep.search.searcher import SearcherClock
from deeplab_sweep.search.standin import StandIn, standin_trial
from deeplab_sweep.search.summary import PreloadSummary, SweepSummary, log_summary, summarise
from deeplab_sweep.search.sync import read_trials, sync_runs
from deeplab_sweep.search.timing import Timeline
from deeplab_sweep.search.trial import sweep_trial
from deeplab_sweep.search.warm_start import log_warm_start, read_warm_start, seed_searcher
from deeplab_sweep.trainable.credentials import redacted_command
from deeplab_sweep.trainable.ray_train import runs_in_process, worker_resources
from deeplab_sweep.trainable.run_config import RUNS_DIR

# With this many trials at once or more, `sweep.progress: auto` prints status lines, not events.
STATUS_LINES_FROM = 5
EVENTS_LOG = "events.log"
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # MLflow's client prints two lines (and reads the run again) each time it ends a run on a
    # tracking server: two lines per trial on the sweep's console.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def run_sweep(
    job: JobConfig,
    address: str | None = None,
    resume: bool = False,
    verbose: bool = False,
    standin: StandIn | None = None,
) -> SweepSummary:
    """Run (or, with `resume`, continue) the sweep `job` describes; its summary once every trial
    has ended. Bad input is a ConfigError before Ray starts and before anything is logged.
    `standin`: trials that report a learning-curve table's rows instead of training (the
    driver's benchmark)."""
    timeline = Timeline(verbose)
    sweep = prepare_sweep(job, resume, address)
    timeline.mark("checks and preparation")
    ray_up = RaySession(job.cluster, sweep.address, verbose, dashboard=not runs_in_process(job.train.num_workers))
    with contextlib.closing(ray_up):
        job, searcher = sweep.job, sweep.searcher
        _quiet_mlflow_retries()
        c = tracking.client(job.mlflow)
        exp_id = tracking.ensure_experiment(job.mlflow)
        # Read before the parent run exists: a sweep named wrongly is refused with nothing logged.
        warm = read_warm_start(c, exp_id, job, sweep.fingerprint) if job.sweep.warm_start and not resume else None
        parent = _parent_run(c, exp_id, sweep)
        if warm is not None:
            seed_searcher(searcher, warm)
            log_warm_start(c, parent, warm)
        timeline.mark("MLflow's experiment and parent run")
        try:
            ray_up.start()  # and, from here, SIGTERM (`ray job stop`) is Ctrl-C
            timeline.mark("Ray")
            tuner, writer = _tuner(sweep, exp_id, parent, verbose, standin)
            # Ray's ASHA draws each trial's bracket from numpy's global generator: seeded, a
            # sweep's brackets are drawn again alike (and a replay of it draws the same).
            np.random.seed(job.sweep.seed)
            gc.freeze()  # what the driver made so far lives as long as it does (FreezeSurvivors)
            results = tuner.fit()
            timeline.mark("Tune's run")
            ray_up.release()  # shut down beside the summary
            summary = _finish(results, c, exp_id, sweep, parent, writer)
            timeline.mark("the summary")
        except KeyboardInterrupt:  # outside Tune's run, which stops gracefully on Ctrl-C itself
            with contextlib.suppress(Exception):
                tracking.finish_run(c, parent, tracking.INTERRUPTED, "while the sweep was starting or ending")
            raise
        except BaseException as e:
            with contextlib.suppress(Exception):  # MLflow down must not hide the real error
                tracking.finish_run(c, parent, tracking.FAILED, f"{type(e).__name__}: {str(e)[:300]}")
            raise
    timeline.mark("Ray's shutdown")
    return summary


def _quiet_mlflow_retries() -> None:
    """A tracking server that goes down mid-sweep must cost seconds per attempt, not MLflow's
    default minutes of retries; and each retry would print a urllib3 warning, where the
    callback says once that MLflow is down. No run URLs printed."""
    for var, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _parent_run(c, exp_id: str, sweep: PreparedSweep) -> str:
    """The sweep's parent run: found again on resume, else created with the sweep's config,
    space, git commit and dataset fingerprint."""
    job, name = sweep.job, sweep.folder.name
    if sweep.resume:
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
            tracking.FINGERPRINT_TAG: sweep.fingerprint,
        },
    )
    c.log_text(run_id, json.dumps({k: v.model_dump() for k, v in job.space.items()}, indent=2), "search_space.json")
    c.log_text(run_id, dump_yaml(job), "sweep_config.yaml")
    return run_id


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


def trial_resources(job: JobConfig) -> tune.PlacementGroupFactory:
    """A one-worker trial trains in its own actor (Ray Train's local mode), which holds that
    worker's resources. A larger one is a driver beside its worker group (Tune's actor; Ray
    Train's controller runs beside it): memory only, a slice of a CPU would keep an exact-fit
    node from taking a worker; on the node that runs this sweep (the head, under `ray job
    submit`), where workers never go and whose loss would end the sweep anyway."""
    if runs_in_process(job.train.num_workers):
        return tune.PlacementGroupFactory([worker_resources(job.train)])
    node = ray.get_runtime_context().get_node_id()
    return tune.PlacementGroupFactory(
        [{"memory": TRIAL_DRIVER_MEMORY}], bundle_label_selector=[{"ray.io/node-id": node}]
    )


def _tuner(
    sweep: PreparedSweep, exp_id: str, parent: str, verbose: bool, standin: StandIn | None
) -> tuple[tune.Tuner, MlflowTrialCallback | None]:
    """Tune over the sweep's trials, and its MLflow callback; on resume, the Tuner (its searcher
    and callbacks as they were pickled) restored from the sweep's folder, and no callback here."""
    job, folder, s = sweep.job, sweep.folder, sweep.job.sweep
    in_process = runs_in_process(job.train.num_workers)
    at_once = trials_at_once(job, sweep.plan)
    fn, extra = (sweep_trial, {}) if standin is None else (standin_trial, {"standin": standin})
    trainable = tune.with_resources(
        tune.with_parameters(fn, base=job.run.to_dict(), sweep_uri=folder.uri, metric=s.metric, mode=s.mode, **extra),
        trial_resources(job),
    )
    if sweep.resume:
        return tune.Tuner.restore(folder.uri, trainable=trainable, resume_unfinished=True, resume_errored=True), None
    writer = MlflowTrialCallback(
        mlflow_cfg=job.mlflow,
        experiment_id=exp_id,
        parent_run_id=parent,
        folder=folder,
        base_config=job.run.to_dict(),
        metric=s.metric,
        mode=s.mode,
        max_epochs=job.train.epochs,
        also=s.also_best,
        cost=(cost_metric(job.train), units_held(job.train)),
    )
    callbacks = [
        writer,
        ProgressTable(
            s.metric,
            s.mode,
            job.train.epochs,
            worker_resources(job.train),
            job.train.num_workers,
            status_lines(job, folder, at_once),
        ),
        FreezeSurvivors(),
    ]
    # What it loads draws the Pareto front and, from the study of an Optuna search of two trials
    # or more, the importances.
    if s.objectives or (sweep.searcher is not None and s.num_samples >= 2):
        callbacks.append(PreloadSummary())
    if sweep.searcher is not None:
        callbacks.append(SearcherClock(sweep.searcher))
    callbacks += _tune_loggers()
    tuner = tune.Tuner(
        trainable,
        param_space=sweep.param_space,
        tune_config=tune_config(job, sweep.searcher, at_once, folder),
        run_config=tune.RunConfig(
            name=folder.name,
            storage_path=job.storage.path,
            callbacks=callbacks,
            verbose=1 if verbose else 0,
            # A worker group is retried by Ray Train; an in-process trial, by Tune (from the
            # checkpoints it stored).
            failure_config=tune.FailureConfig(max_failures=job.train.max_failures if in_process else 0),
        ),
    )
    return tuner, writer


def _tune_loggers() -> list[tune.Callback]:
    """Tune's own result files in each trial's folder (result.json, which `deeplab sync` reads,
    and progress.csv), without its TensorBoard files: their writer fsyncs each result on Tune's
    loop, a quarter of that loop's time at 64 trials at once (driver_scale.py); the runs are in
    MLflow. `TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0` in the environment brings them back."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    return [CSVLoggerCallback(), JsonLoggerCallback()]


def status_lines(job: JobConfig, folder: SweepFolder, at_once: int) -> StatusLines | None:
    """The console's status lines (`sweep.progress`), or None for a line per event; the events
    then go to events.log in the sweep's folder (under runs/ when that is not local)."""
    s = job.sweep
    if s.progress == "events" or (s.progress == "auto" and at_once < STATUS_LINES_FROM):
        return None
    where = Path(folder.uri) if folder.storage.local else Path(RUNS_DIR) / folder.name
    where.mkdir(parents=True, exist_ok=True)
    return StatusLines(s.status_every_s, str((where / EVENTS_LOG).absolute()), s.budget.epochs, s.budget.wall_time_s)


class FreezeSurvivors(tune.Callback):
    """Python's full collections, on Tune's loop, traverse every object the driver holds: 0.1-0.3 s
    each on the idle build machine once torch, Ray, MLflow and Optuna are imported (about
    700,000 objects), and growing; more on a busy machine, where Tune warned that
    `search_alg.on_trial_result` took 0.54 s. What survives a full collection is moved out of
    the collector's sight (`gc.freeze`) at the next step of Tune's loop, so each full collection
    sees only what was made since the last. Reference counting still frees those objects; a
    cycle among them that later becomes garbage stays (the driver holds what Tune keeps of every
    trial anyway)."""

    def __init__(self):
        self._full = gc.get_stats()[2]["collections"]

    def on_step_end(self, iteration, trials, **info):
        full = gc.get_stats()[2]["collections"]
        if full != self._full:
            self._full = full
            gc.freeze()


def tune_config(job: JobConfig, searcher, at_once: int, folder: SweepFolder) -> tune.TuneConfig:
    """How Tune runs the sweep's trials: the searcher, the early-stopping scheduler, how many
    and how many at once."""
    s = job.sweep
    return tune.TuneConfig(
        metric=s.metric,
        mode=s.mode,
        search_alg=searcher,
        scheduler=scheduler(job, folder, searcher),
        num_samples=s.num_samples,
        max_concurrent_trials=at_once,
        # An in-process trial's actor has torch imported and its data cached: the next trial
        # starts in it.
        reuse_actors=runs_in_process(job.train.num_workers),
    )


def _finish(results, c, exp_id: str, sweep: PreparedSweep, parent: str, writer) -> SweepSummary:
    """What the trial callback could not write (MLflow down, or a previous driver's queue lost
    to a crash) is in Ray's results: written now; then the summary on the parent run. A trial
    that ended in a sweep whose callback wrote all it was given is in MLflow already (its end
    reconciled its run with its folder): one request or more a trial saved."""
    job, folder, searcher = sweep.job, sweep.folder, sweep.searcher
    records = read_trials(folder)
    written = writer is not None and writer.drained
    try:
        unsynced = [r for r in records if not (written and r.finished)]
        sync_runs(c, exp_id, parent, job, folder, update_parent=False, records=unsynced)
        mlflow_error = None
    except Exception as e:  # noqa: BLE001 - any client/transport error
        mlflow_error = tracking.one_line(e)
    # Tune returns once interrupted (Ctrl-C; SIGTERM, which `ray job stop` sends, is made one):
    # trials it had not finished are still running in its saved state, for --resume.
    unfinished = [r.trial_id for r in records if not r.finished]
    if unfinished:
        reason = f"{tracking.INTERRUPTED}: {len(unfinished)} trial(s) unfinished; continue with --resume"
    else:
        # Why it stopped, as the searcher that decided it recorded it in the study (on resume,
        # the one Tune restored, not `searcher`, which only reads the study).
        reason = (searcher.stop_reason() if searcher else None) or f"num_samples: all {len(results)} trials ran"
    summary = summarise(results, None if mlflow_error else c, exp_id, job, folder, parent, records, reason)
    summary.interrupted = bool(unfinished)
    if searcher is not None:
        states = [t.state.name for t in searcher.study.trials]
        summary.optuna_states = {st: states.count(st) for st in sorted(set(states))}
    if mlflow_error is None:
        log_summary(c, summary, job, searcher.study if searcher is not None else None, records)
        for row in summary.trials:
            if row.trial_id in unfinished and row.run_id:
                tracking.finish_run(c, row.run_id, tracking.INTERRUPTED)
        tracking.finish_run(c, parent, tracking.INTERRUPTED if unfinished else tracking.COMPLETED)
    else:
        summary.mlflow_error = mlflow_error
        print(
            f"MLflow did not answer at the end of the sweep ({mlflow_error}). Nothing is lost: every "
            f"trial's results are in {folder.uri}. Once the server answers, run:\n"
            f"  {redacted_command(['deeplab', 'sync', folder.uri, '--tracking-uri', job.mlflow.tracking_uri])} "
            f"--experiment {job.mlflow.experiment}",
            file=sys.stderr,
        )
    return summary
