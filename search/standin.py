"""A sweep trial that trains nothing, to measure the sweep's driver at scale
(`benchmarks/driver_scale.py`, and the suite's smaller run of it): it reports a learning-curve
table's rows for its configuration, one every `epoch_s`, through the path a one-worker trial's
reports take (each epoch's checkpoint stored in the trial's run folder, its epoch file, the
checkpoints pruned, then `tune.report` with the checkpoint's path), so the driver's searcher,
scheduler, callbacks, storage and MLflow writes see what a real sweep gives them. No torch is
imported: a trial's actor starts light and holds little memory."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from deeplab_sweep.search.curves import Table
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.search.overrides import trial_epochs, trial_overrides
from deeplab_sweep.trainable.run_folder import (
    FILENAME,
    prune_checkpoints,
    store_checkpoint,
    stored_checkpoints,
    write_epoch_files,
    write_meta,
)
from deeplab_sweep.trainable.storage import Storage

# The wall-clock time a stand-in made its report: how far behind the driver and MLflow are.
REPORTED_AT = "standin/reported_at"


@dataclass(frozen=True)
class StandIn:
    """The table the stand-in trials report from (its configuration columns: the sweep's space),
    the seconds each epoch takes, and the size of each epoch's checkpoint file."""

    table: str
    keys: tuple[str, ...]
    epoch_s: float = 1.0
    checkpoint_bytes: int = 4096


@functools.cache
def _table(path: str, keys: tuple[str, ...]) -> Table:
    return Table.from_csv(path, keys)  # once per actor: Tune reuses it from trial to trial


def standin_trial(config: dict, base: dict, sweep_uri: str, metric: str, mode: str, standin: StandIn) -> None:
    _, curve = _table(standin.table, standin.keys).lookup(trial_overrides(config))
    epochs = trial_epochs(config, base["train"]["epochs"])
    storage = Storage(SweepFolder(sweep_uri).trial_uri(tune.get_context().get_trial_id()))
    done = max((c["epoch"] for c in stored_checkpoints(storage, storage.root)), default=0)  # a restored trial
    for row in curve[done:epochs]:
        time.sleep(standin.epoch_s)
        report = {**row, REPORTED_AT: time.time()}
        with tempfile.TemporaryDirectory(prefix="standin-") as scratch:
            weights = Path(scratch) / FILENAME
            weights.write_bytes(os.urandom(standin.checkpoint_bytes))
            write_meta(weights, report["epoch"], report)
            path = store_checkpoint(storage, storage.root, scratch, report["epoch"])
            write_epoch_files(storage, storage.root, report, scratch)
        prune_checkpoints(storage, storage.root, base["train"]["keep_checkpoints"], metric, mode)
        tune.report({**report, "checkpoint_path": storage.uri(path)})
