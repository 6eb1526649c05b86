"""A sweep replayed on a learning-curve table: the searcher, space, completion rules and Ray
Tune scheduler `deeplab sweep` builds for the job, called as Tune's controller calls them, with
each trial's epochs reported from the table instead of trained, on a simulated clock (the
table's epoch times). A replay of a whole sweep takes a second or two, so search strategies can
be compared on many seeds at equal compute (`benchmarks/search_replay.py`); tests/test_replay.py
checks that a replay makes the decisions a real sweep made.

A table is one CSV row per (configuration, training seed, epoch), keyed by config paths, as
`benchmarks/learning_curves.py` writes it. A trial's config is looked up by the nearest value of
each key the table holds (on a log scale for positive numbers), so a continuous space
(`train.lr: loguniform`) replays on a grid of it. A table of a real sweep's own trials may give
each report's arrival on that sweep's driver (`arrival_s`): the replay then takes the reports
in that order, as that sweep did with several trials at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ray.tune.experiment import Trial

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.curves import EPOCH, Table
from deeplab_sweep.search.early_stopping import scheduler
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.overrides import trial_epochs, trial_overrides
from deeplab_sweep.search.searcher import build_searcher


@dataclass
class Replayed:
    """What a replayed sweep did: every report in the order the sweep handled it (with the
    simulated time it arrived at), each trial's configuration as the table holds it, and why it
    stopped starting trials."""

    reports: list[dict] = field(default_factory=list)  # {"trial_id", "time_s", "epoch", metric...}
    configs: dict[str, tuple] = field(default_factory=dict)  # trial id -> table configuration
    stopped: dict[str, int] = field(default_factory=dict)  # trial id -> the epoch it was stopped at
    stop_reason: str | None = None
    study: object = None  # the Optuna study the searcher told
    asha_check: dict | None = None  # what ASHA's self-check measured and decided (sweep.asha.min_rank_corr)

    def epochs(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for r in self.reports:
            last[r["trial_id"]] = max(last.get(r["trial_id"], 0), r[EPOCH])
        return last


@dataclass
class _Live:
    trial: Trial
    curve: list[dict]
    epochs: int
    next_s: float  # when its next epoch's report arrives, on the replay's clock
    done: int = 0  # epochs reported


def replay(job: JobConfig, table: Table, seed: int | None = None) -> Replayed:
    """The sweep `job` describes, run on `table`: the searcher (`build_searcher`) and Tune's
    scheduler (`sweep.scheduler`) the sweep builds, called as Tune's controller calls them (a
    result goes to the scheduler, then to the searcher unless the scheduler stopped the trial;
    a stopped or finished trial is completed on both), `sweep.max_concurrent` trials at a time
    (1 if unset) on a simulated clock: each epoch takes the table's train + val time. No Ray is
    started. Optuna's study is kept in memory unless `sweep.optuna_storage` names one.
    `seed` seeds numpy's global generator, which ASHA's bracket draw uses."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    if seed is not None:
        np.random.seed(seed)
    s = job.sweep
    searcher, _ = build_searcher(job, s.name or "replay")
    if searcher is None:
        raise ConfigError("sweep.search: a replay draws trials from Optuna (tpe, random or gp), not a grid")
    sched = scheduler(job, searcher=searcher)
    sched.set_search_properties(s.metric, s.mode)
    out, live, started = Replayed(study=searcher.study), [], 0
    clock = [0.0]  # the simulated time: the budget's clock too (SearcherClock's calls, replayed)
    searcher.completion.use_clock(lambda: clock[0])
    while True:
        while len(live) < (s.max_concurrent or 1) and started < s.num_samples and out.stop_reason is None:
            trial_id = f"{started:05d}"
            config = searcher.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                out.stop_reason = searcher.stop_reason()
                break
            started += 1
            trial = Trial("replay", trial_id=trial_id, config=config, stub=True)
            out.configs[trial_id], curve = table.lookup(trial_overrides(config))
            epochs = trial_epochs(config, job.train.epochs)
            searcher.completion.cost.started(trial_id)
            live.append(_Live(trial, curve, epochs, _arrival(curve[0], clock[0])))
            sched.on_trial_add(None, trial)
        if not live:
            out.stop_reason = out.stop_reason or f"num_samples: all {started} trials ran"
            out.asha_check = sched.report() if hasattr(sched, "report") else None
            return out
        t = min(live, key=lambda x: x.next_s)
        clock[0] = t.next_s
        result = {**t.curve[t.done], "trial_id": t.trial.trial_id, "time_total_s": clock[0]}
        t.done += 1
        out.reports.append({**result, "time_s": clock[0]})
        decision = sched.on_trial_result(None, t.trial, result)
        if decision == TrialScheduler.CONTINUE and t.done < t.epochs:
            if t.done == len(t.curve):  # a real sweep's stopped trial goes on here: not in the table
                shown = dict(zip(table.keys, out.configs[t.trial.trial_id], strict=True))
                raise ConfigError(
                    f"the table's curve of {shown} ends at epoch {t.done}, and the trial trains {t.epochs}"
                )
            searcher.on_trial_result(t.trial.trial_id, result)
            t.next_s = _arrival(t.curve[t.done], clock[0])
            continue
        if decision == TrialScheduler.STOP and t.done < t.epochs:
            out.stopped[t.trial.trial_id] = t.done
        elif decision == TrialScheduler.CONTINUE:  # its last epoch: the searcher hears it, then its end
            searcher.on_trial_result(t.trial.trial_id, result)
        sched.on_trial_complete(None, t.trial, result)
        searcher.completion.cost.ended(t.trial.trial_id)
        searcher.on_trial_complete(t.trial.trial_id, result)
        live.remove(t)


def _arrival(report: dict, now: float) -> float:
    """When a report arrives: where the table gives it (a real sweep's), then; else an epoch's
    train + val time after `now` (the trial's start, or its previous report)."""
    if "arrival_s" in report:
        return max(now, report["arrival_s"])
    return now + report.get("train/epoch_time_s", 0.0) + report.get("val/time_s", 0.0)
