"""`deeplab sync`: write into MLflow what the sweep's storage holds and MLflow does not,
whatever happened to the tracking server or the driver. Tune's folder says which trials there
are and how they ended; each trial's own folder (epochs, PNGs, checkpoints) is reconciled with
its run through `RunWriter`: a missing child run, missing epochs, the PNGs, the end status, the
best checkpoint. Idempotent. The sweep also calls it itself when it ends.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from deeplab_sweep.errors import ConfigError, StorageUnusable
from deeplab_sweep.search import tracking
from deeplab_sweep.search.compose import load_yaml_config
from deeplab_sweep.search.internals import tune_trial_states
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.layout import TUNER_FILE, SweepFolder
from deeplab_sweep.search.overrides import apply_overrides, trial_epochs, trial_overrides
from deeplab_sweep.search.run_writer import RunWriter, trial_run
from deeplab_sweep.trainable.credentials import credentials_to_env
from deeplab_sweep.trainable.run_folder import best_report, better, stored_checkpoints, stored_epochs
from deeplab_sweep.trainable.storage import Storage


@dataclass
class TrialRecord:
    trial_id: str
    config: dict
    rows: list[dict] = field(default_factory=list)
    error: str | None = None
    status: str | None = None  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED

    @property
    def finished(self) -> bool:
        return (
            self.error is not None
            or self.status in ("TERMINATED", "ERROR")
            or bool(self.rows and self.rows[-1].get("done"))
        )


# Tune names a trial's folder <trainable>_<trial id>_<index>_<params>_<time>; trial ids are
# 8 hex digits (a searcher's trials) or <5 hex>_<5 digits> (a grid's).
_TRIAL_ID_IN_NAME = re.compile(r"_([0-9a-f]{8}|[0-9a-f]{5}_\d{5})_\d+_")


def _tune_trials(storage: Storage) -> dict[str, tuple[str, str | None]]:
    """Trial folder name -> (trial id, Tune's status), from Tune's latest experiment state."""
    states = [
        f
        for f in storage.list(storage.root)
        if f.base_name.startswith("experiment_state-") and f.base_name.endswith(".json")
    ]
    if not states:
        return {}
    # Named by the session that wrote it (experiment_state-YYYY-MM-DD_HH-MM-SS.json): the latest
    # name is the latest driver's, as Tune itself picks it (a cloud store's mtimes may be coarse).
    latest = max(states, key=lambda f: f.base_name)
    return tune_trial_states(storage.read_text(latest.path))


def parse_results(text: str) -> list[dict]:
    """A trial's result.json: one JSON object per line."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a killed process: what follows it cannot be trusted
    return rows


def read_trials(folder: SweepFolder) -> list[TrialRecord]:
    """Tune's trial folders in the sweep folder (`train/` beside them holds the run folders)."""
    storage = folder.storage
    known = _tune_trials(storage)
    out = []
    for d in storage.list(storage.root):
        params = f"{d.path}/params.json"
        if d.type.name != "Directory" or not storage.is_file(params):
            continue
        rows = (
            parse_results(storage.read_text(f"{d.path}/result.json"))
            if storage.is_file(f"{d.path}/result.json")
            else []
        )
        match = _TRIAL_ID_IN_NAME.search(d.base_name)
        trial_id, status = known.get(d.base_name, (rows[0]["trial_id"] if rows else match and match.group(1), None))
        if trial_id is None:
            continue  # not a trial folder of ours
        error_file = f"{d.path}/error.txt"
        error = tracking.error_reason(storage.read_text(error_file)) if storage.is_file(error_file) else None
        out.append(TrialRecord(trial_id, json.loads(storage.read_text(params)), rows, error, status))
    return out


def _parent(c, exp_id: str, name: str):
    found = c.search_runs([exp_id], filter_string=tracking.sweep_filter(name, tracking.KIND_SWEEP))
    if not found:
        raise ConfigError(f"no sweep run named {name!r} in this MLflow experiment")
    return found[0]


def sync_sweep(sweep_uri: str, tracking_uri: str, experiment: str) -> dict:
    """`deeplab sync`: the sweep's parent run and config are found in MLflow by the folder's name."""
    folder = SweepFolder(credentials_to_env(sweep_uri))
    try:
        is_sweep = folder.has_tuner()
    except (OSError, ValueError) as e:  # pyarrow: unreachable endpoint, no such bucket, bad URI
        raise StorageUnusable(f"{folder.uri}: cannot be read ({' '.join(str(e).split())[:200]})") from None
    if not is_sweep:
        raise ConfigError(f"{folder.uri}: not a sweep folder (no {TUNER_FILE})")
    tracking.check_server(tracking_uri)
    c = tracking.client(tracking.resolved(tracking.MlflowConfig(tracking_uri=tracking_uri, experiment=experiment)))
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no such MLflow experiment: {experiment!r}")
    parent = _parent(c, exp.experiment_id, folder.name)
    with tempfile.TemporaryDirectory() as tmp:
        local = c.download_artifacts(parent.info.run_id, "sweep_config.yaml", tmp)
        job = load_yaml_config(Path(local).read_text())
    return sync_runs(c, exp.experiment_id, parent.info.run_id, job, folder)


def sync_runs(
    c,
    exp_id: str,
    parent_run_id: str,
    job: JobConfig,
    folder: SweepFolder,
    update_parent: bool = True,
    records: list[TrialRecord] | None = None,
) -> dict:
    """Reconcile each trial's MLflow run with its Ray results (`records`, read from the folder
    unless given); returns counts of what was written."""
    metric, mode, base = job.sweep.metric, job.sweep.mode, job.run.to_dict()
    storage = folder.storage
    stats = {"trials": 0, "runs_created": 0, "epochs_logged": 0, "runs_finished": 0}
    best_overall = None
    records = read_trials(folder) if records is None else records
    runs = _trial_runs(c, exp_id, folder.name) if records else {}  # the sweep's end has often none
    for rec in records:
        stats["trials"] += 1
        cfg = apply_overrides(base, trial_overrides(rec.config))
        run = runs.get(rec.trial_id)
        if run is None:
            run_id, created = trial_run(
                c, exp_id, folder.name, rec.trial_id, parent_run_id, cfg, reopen=False, new=True
            )
        else:
            run_id, created = run.info.run_id, False
        stats["runs_created"] += created
        run_dir = folder.trial_dir(rec.trial_id)
        writer = RunWriter(
            c, run_id, metric=metric, mode=mode, storage=storage, run_dir=run_dir, also=job.sweep.also_best, read=run
        )
        stats["epochs_logged"] += writer.reconcile()
        if rec.finished:
            last = max((e["epoch"] for e in stored_epochs(storage, run_dir)), default=0)
            status = tracking.end_status(rec.error, last, trial_epochs(rec.config, job.train.epochs))
            stats["runs_finished"] += writer.finish(status, rec.error, cfg, again=False)
        best = best_report(stored_checkpoints(storage, run_dir), metric, mode)
        if best and not rec.error and better(best[metric], best_overall[metric] if best_overall else None, mode):
            best_overall = {**best, "trial_id": rec.trial_id, "run_id": run_id}
    if update_parent:
        _update_parent(c, parent_run_id, metric, best_overall, stats["trials"] and all(r.finished for r in records))
    return stats


def _trial_runs(c, exp_id: str, sweep: str) -> dict:
    """Trial id -> its run: the sweep's trial runs in one search (one per trial was most of
    a sync's time)."""
    runs: dict = {}
    for run in tracking.all_runs(c, [exp_id], tracking.sweep_filter(sweep, tracking.KIND_TRIAL)):
        runs.setdefault(run.data.tags.get(tracking.TRIAL_TAG), run)  # the newest, as trial_run takes it
    return runs


def _update_parent(c, parent_run_id: str, metric: str, best: dict | None, all_finished: bool) -> None:
    parent = c.get_run(parent_run_id)
    if best and tracking.BEST_RUN_TAG not in parent.data.tags:
        c.set_tag(parent_run_id, tracking.BEST_TRIAL_TAG, best["trial_id"])
        c.set_tag(parent_run_id, tracking.BEST_RUN_TAG, best["run_id"])
        c.log_metric(parent_run_id, tracking.best_metric(metric), float(best[metric]))
    if parent.info.status == "RUNNING" and all_finished:
        # The sweep ended while MLflow was down and could not close its run.
        tracking.finish_run(c, parent_run_id, tracking.COMPLETED)
