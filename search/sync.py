"""`deeplab sync`: write into MLflow what Ray's results hold and MLflow does not. Ray Tune keeps
every trial's reported results in its folder (`result.json`, one line per report) whatever
happened to the tracking server; this reconciles the sweep's MLflow runs with them: missing
epochs (by step), a missing child run, the end status, the best checkpoint. Idempotent: a run
that is complete is left as it is. The sweep also calls it itself when it ends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from search import tracking
from search.configs import (
    ConfigError,
    JobConfig,
    apply_overrides,
    load_yaml_config,
    trial_overrides,
)
from search.mlflow_callback import (
    SWEEP_TAG,
    better,
    error_reason,
    find_or_create_trial_run,
    finish_trial_run,
)
from trainable.ray_train import run_visuals

TRAIN_DIR = "train"  # under the sweep folder: the trials' Ray Train runs, named by trial id


@dataclass
class TrialRecord:
    trial_id: str
    config: dict
    rows: list[dict] = field(default_factory=list)
    error: str | None = None
    status: str | None = None  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED

    @property
    def finished(self) -> bool:
        return self.error is not None or self.status in ("TERMINATED", "ERROR") or bool(
            self.rows and self.rows[-1].get("done"))


def _tune_statuses(sweep_path: Path) -> dict[str, str]:
    """Trial statuses from Tune's latest experiment state (JSON; a trial's own `done` flag in
    result.json is not written for every trial that finished)."""
    states = sorted(sweep_path.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
        trials = [json.loads(t[0]) for t in data.get("trial_data", [])]
        return {t["trial_id"]: t.get("status") for t in trials if "trial_id" in t}
    except (ValueError, KeyError, TypeError, IndexError):
        return {}  # unreadable: fall back on the results themselves


def read_trials(sweep_path: Path) -> list[TrialRecord]:
    """Tune's trial folders under the sweep folder (`train/` holds the Train runs)."""
    statuses = _tune_statuses(Path(sweep_path))
    out = []
    for d in sorted(p for p in Path(sweep_path).iterdir() if p.is_dir() and (p / "params.json").is_file()):
        rows = []
        if (d / "result.json").is_file():
            for line in (d / "result.json").read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a killed process: what follows it cannot be trusted
        trial_id = rows[0]["trial_id"] if rows else d.name.split("_")[2]
        error = (d / "error.txt").read_text(errors="replace") if (d / "error.txt").is_file() else None
        out.append(TrialRecord(trial_id, json.loads((d / "params.json").read_text()), rows,
                               error_reason(error) if error is not None else None, statuses.get(trial_id)))
    return out


def best_result(rec: TrialRecord, metric: str, mode: str) -> dict | None:
    """The trial's best report whose checkpoint is still in storage (Ray keeps the best ones)."""
    best = None
    for row in rec.rows:
        ckpt = row.get("checkpoint_path")
        if ckpt and Path(ckpt).is_dir() and better(row.get(metric), best[metric] if best else None, mode):
            best = {metric: row[metric], "checkpoint_path": ckpt, "epoch": int(row.get("epoch", 0))}
    return best


def _parent(c, exp_id: str, name: str):
    found = c.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`deeplab.kind` = 'sweep'")
    if not found:
        raise ConfigError(f"no sweep run named {name!r} in this MLflow experiment")
    return found[0]


def _sweep_job(c, parent_run_id: str, tmp: Path) -> JobConfig:
    local = c.download_artifacts(parent_run_id, "sweep_config.yaml", str(tmp))
    return load_yaml_config(Path(local).read_text())


def sync_sweep(sweep_path: str | Path, tracking_uri: str, experiment: str) -> dict:
    """`deeplab sync`: the sweep's parent run and config are found in MLflow by the folder's name."""
    import tempfile

    sweep_path = Path(sweep_path)
    if not (sweep_path / "tuner.pkl").is_file():
        raise ConfigError(f"{sweep_path}: not a sweep folder (no tuner.pkl)")
    tracking.check_server(tracking_uri)
    c = tracking.client(tracking.resolved(tracking.MlflowConfig(tracking_uri=tracking_uri, experiment=experiment)))
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no such MLflow experiment: {experiment!r}")
    parent = _parent(c, exp.experiment_id, sweep_path.name)
    with tempfile.TemporaryDirectory() as tmp:
        job = _sweep_job(c, parent.info.run_id, Path(tmp))
    return sync_runs(c, exp.experiment_id, parent.info.run_id, job, sweep_path)


def sync_runs(c, exp_id: str, parent_run_id: str, job: JobConfig, sweep_path: Path, update_parent: bool = True,
              records: list[TrialRecord] | None = None) -> dict:
    """Reconcile each trial's MLflow run with its Ray results (`records`, read from
    `sweep_path` unless given); returns counts of what was written."""
    metric, mode, base = job.sweep.metric, job.sweep.mode, job.run.to_dict()
    stats = {"trials": 0, "runs_created": 0, "epochs_logged": 0, "runs_finished": 0}
    best_overall = None
    records = read_trials(sweep_path) if records is None else records
    all_finished = all(rec.finished for rec in records)
    for rec in records:
        stats["trials"] += 1
        cfg = apply_overrides(base, trial_overrides(rec.config))
        run_id, _, created = find_or_create_trial_run(c, exp_id, sweep_path.name, rec.trial_id, parent_run_id, cfg,
                                                       metric, reopen=False)
        stats["runs_created"] += created
        logged = {m.step for m in c.get_metric_history(run_id, metric)}
        for row in rec.rows:
            step = int(row.get("epoch", 0))
            if step and step not in logged:
                tracking.log_metrics(c, run_id, {k: v for k, v in row.items() if "/" in k}, step=step)
                logged.add(step)
                stats["epochs_logged"] += 1
        visuals = run_visuals(sweep_path / TRAIN_DIR, rec.trial_id)
        tracking.log_visuals(c, run_id, visuals, skip=tracking.logged_visuals(c, run_id))
        best = best_result(rec, metric, mode)
        run = c.get_run(run_id)
        if rec.finished and tracking.STATUS_TAG not in run.data.tags:
            epochs = trial_overrides(rec.config).get("train.epochs", job.train.epochs)
            done = bool(rec.rows) and rec.rows[-1].get("epoch", 0) >= epochs
            status = "failed" if rec.error else "completed" if done else "pruned"
            finish_trial_run(c, run_id, best, cfg, metric, status, rec.error)
            stats["runs_finished"] += 1
        elif rec.finished and run.info.status == "RUNNING":
            # Finished before, reopened by a resume whose driver then died: close it again.
            c.set_terminated(run_id, "FAILED" if rec.error else "FINISHED")
        if best and not rec.error and better(best[metric], best_overall[metric] if best_overall else None, mode):
            best_overall = {**best, "trial_id": rec.trial_id, "run_id": run_id}
    if not update_parent:
        return stats
    parent = c.get_run(parent_run_id)
    if best_overall and "best_run_id" not in parent.data.tags:
        c.set_tag(parent_run_id, "best_trial_id", best_overall["trial_id"])
        c.set_tag(parent_run_id, "best_run_id", best_overall["run_id"])
        c.log_metric(parent_run_id, f"best/{metric}", float(best_overall[metric]))
    if parent.info.status == "RUNNING" and stats["trials"] and all_finished:
        # The sweep ended while MLflow was down and could not close its run.
        tracking.finish_run(c, parent_run_id, "completed")
    return stats
