"""The function trainable of one sweep trial. Kept apart from deeplab_sweep.search.sweep so that
a trial's actor imports only what a trial needs (no Optuna; MLflow's system-metric collectors load on a
thread of their own): it starts faster."""

from __future__ import annotations

import time

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from deeplab_sweep.search.internals import tune_relay_queue
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.overrides import apply_overrides, trial_overrides
from deeplab_sweep.search.system_metrics import SystemSampler
from deeplab_sweep.trainable.ray_train import build_in_process_trainer, build_trainer, runs_in_process
from deeplab_sweep.trainable.run_config import RunConfig


def sweep_trial(config: dict, base: dict, sweep_uri: str, metric: str, mode: str) -> None:
    cfg = RunConfig.model_validate(apply_overrides(base, trial_overrides(config)))
    trial_id = tune.get_context().get_trial_id()
    folder = SweepFolder(sweep_uri)
    if runs_in_process(cfg.train.num_workers):
        # In this actor, which Tune reuses from trial to trial; stored in the same run folder a
        # worker group would use, so a resumed or restarted trial finds its checkpoints.
        sampler = _system_sampler(cfg)
        on_report = tune.report if sampler is None else (lambda m: tune.report({**m, **sampler.take()}))
        try:
            build_in_process_trainer(cfg, folder.trial_uri(trial_id), metric, mode, on_report=on_report).fit()
        finally:
            if sampler is not None:
                sampler.stop()
        return
    # Named by trial id in the sweep's train folder: a resumed sweep restarts the same Train
    # run, which restores its latest checkpoint from storage instead of starting over.
    trainer = build_trainer(cfg, trial_id, folder.train_uri, metric, mode, callbacks=[TuneReportCallback()])
    trainer.fit()
    _drain_reports()


def _system_sampler(cfg: RunConfig) -> SystemSampler | None:
    """This node's system metrics for the trial's run (a worker group's nodes are not sampled)."""
    interval = cfg.mlflow.system_metrics_interval_s
    if interval is None:
        return None
    return SystemSampler(f"node-{ray.get_runtime_context().get_node_id()[:8]}", interval).start()


def _drain_reports(timeout_s: float = 60.0) -> None:
    """Work around a race in Ray 2.60's Tune/Train bridge: if this function returns while the
    last relayed result still sits in the inter-actor queue, Tune's end-of-function result and
    that result both go to a one-slot queue and the trial deadlocks (seen here as a sweep that
    hangs forever after a trial's last epoch). Returning only once the relay queue is empty,
    plus a moment for Tune's main thread to hand the result on, avoids it."""
    queue = tune_relay_queue()
    if queue is None:
        return
    deadline = time.monotonic() + timeout_s
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
