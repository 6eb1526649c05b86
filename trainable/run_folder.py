"""A training run's folder in storage: what Ray Train writes there (`checkpoint_*/` folders),
and what this project adds so that nothing depends on a live driver: `checkpoint.json` beside
each `checkpoint.pt` (its epoch, metrics and size), one `epochs/epoch_NNNN.json` of metrics per
evaluated epoch, and the eval PNGs in `visuals/`. Whoever writes MLflow, picks a best
checkpoint or resumes a run reads it from here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs

from deeplab_sweep.trainable.storage import Storage

FILENAME = "checkpoint.pt"
# Beside checkpoint.pt: its epoch, its metrics and its size in bytes, small enough to read for
# every checkpoint in storage (a copy cut short by a killed upload does not have that size).
META = "checkpoint.json"
VISUALS_DIR = "visuals"  # inside each checkpoint folder: the eval's PNGs travel with it to storage
EPOCHS_DIR = "epochs"
CHECKPOINT_PREFIX = "checkpoint_"


def write_meta(weights: Path, epoch: int, metrics: dict) -> None:
    """checkpoint.json beside a whole `weights` file."""
    meta = {"epoch": epoch, "metrics": metrics, "bytes": weights.stat().st_size}
    (weights.parent / META).write_text(json.dumps(meta))


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:04d}.json"


def better(value, best, mode: str) -> bool:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def best_report(reports: Iterable[dict], metric: str, mode: str) -> dict | None:
    """The report with the best `metric` that has a checkpoint: its metrics, checkpoint_path, epoch."""
    best = None
    for r in reports:
        if r.get("checkpoint_path") and better(r.get(metric), best[metric] if best else None, mode):
            best = {**r, "epoch": int(r.get("epoch") or 0)}
    return best


def stored_epochs(storage: Storage, run_dir: str) -> list[dict]:
    """The metrics each evaluated epoch of the run wrote to storage, in epoch order."""
    folder = f"{run_dir}/{EPOCHS_DIR}"
    return [json.loads(storage.read_text(f.path)) for f in storage.list(folder) if f.base_name.endswith(".json")]


def stored_checkpoints(storage: Storage, run_dir: str) -> list[dict]:
    """The run's checkpoints in storage that are whole (checkpoint.pt of the size recorded
    beside it), as their metrics + epoch + checkpoint_path."""
    out = []
    for d in storage.list(run_dir):
        meta_path, weights = f"{d.path}/{META}", f"{d.path}/{FILENAME}"
        if not d.base_name.startswith(CHECKPOINT_PREFIX) or not storage.is_file(meta_path):
            continue
        meta = json.loads(storage.read_text(meta_path))
        if storage.size(weights) == meta["bytes"]:
            out.append({**meta["metrics"], "epoch": meta["epoch"], "checkpoint_path": d.path})
    return out


def write_epoch_files(storage: Storage, run_dir: str, metrics: dict, checkpoint_dir: str | Path) -> None:
    """The epoch's metrics and eval PNGs into the run's folder, once its checkpoint is stored:
    checkpoints are pruned as better ones arrive, and a driver killed before it saw the report
    would lose them; whoever writes MLflow later reads them here."""
    if "epoch" in metrics:  # a training epoch (an evaluation run reports no epochs)
        storage.fs.create_dir(f"{run_dir}/{EPOCHS_DIR}")
        storage.write_bytes(f"{run_dir}/{EPOCHS_DIR}/{epoch_file(metrics['epoch'])}", json.dumps(metrics).encode())
    visuals = Path(checkpoint_dir) / VISUALS_DIR
    if visuals.is_dir():
        storage.fs.create_dir(f"{run_dir}/{VISUALS_DIR}")
        pafs.copy_files(str(visuals), f"{run_dir}/{VISUALS_DIR}", destination_filesystem=storage.fs)


def store_checkpoint(storage: Storage, run_dir: str, checkpoint_dir: str | Path, epoch: int) -> str:
    """Put a local checkpoint folder's files into `<run>/checkpoint_epoch_NNNN/` (moved where
    the storage is the same filesystem, `Storage.put`); its checkpoint.json goes last, so a
    copy cut short is never taken for a whole checkpoint. Returns its path."""
    dest = f"{run_dir}/{CHECKPOINT_PREFIX}epoch_{epoch:04d}"
    storage.fs.create_dir(dest)
    src = Path(checkpoint_dir)
    for f in sorted(src.rglob("*"), key=lambda p: p.name == META):
        if f.is_file():
            target = f"{dest}/{f.relative_to(src).as_posix()}"
            storage.fs.create_dir(target.rsplit("/", 1)[0])
            storage.put(f, target)
    return dest


def prune_checkpoints(storage: Storage, run_dir: str, keep: int, metric: str, mode: str) -> None:
    """Keep the `keep` best stored checkpoints by `metric` and the latest (to resume from), as
    Ray Train's CheckpointConfig does for the runs it stores."""
    stored = stored_checkpoints(storage, run_dir)
    if not stored:
        return
    latest = max(stored, key=lambda r: r["epoch"])
    ranked = sorted(
        (r for r in stored if better(r.get(metric), None, mode)),
        key=lambda r: r[metric],
        reverse=mode == "max",
    )
    kept = {latest["checkpoint_path"], *(r["checkpoint_path"] for r in ranked[:keep])}
    for r in stored:
        if r["checkpoint_path"] not in kept:
            storage.fs.delete_dir(r["checkpoint_path"])
