"""Checkpoint files: model + optimiser + scheduler + scaler state, epoch, resolved config and
metrics, in one `checkpoint.pt`. Loaded with `weights_only=True`: a checkpoint is untrusted
input and must not be able to run code."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from deeplab_sweep.errors import UserInputError
from deeplab_sweep.trainable.run_folder import FILENAME, write_meta

FORMAT_VERSION = 1


class CheckpointError(UserInputError, ValueError):
    """A checkpoint file that is missing, unreadable or does not fit: names the file."""


def save_checkpoint(
    directory: str | Path,
    *,
    model_state: dict,
    config: dict,
    epoch: int,
    metrics: dict,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    scaler_state: dict | None = None,
    rng_state: dict | None = None,
) -> Path:
    path = Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model_state,
        "config": config,
        "epoch": epoch,
        "metrics": metrics,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "scaler": scaler_state,
        "rng": rng_state,
    }
    tmp = path.with_suffix(".tmp")
    failed = None
    try:
        torch.save(payload, tmp)
    except RuntimeError as e:
        # Raised outside this block: the original's traceback keeps torch's writer, and with it
        # the half-written file's space on a full disk, alive.
        failed = _write_error(e, tmp)
    if failed is not None:
        raise failed
    tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated checkpoint.pt
    write_meta(path, epoch, metrics)
    return path


def _write_error(e: RuntimeError, path: Path) -> Exception:
    """torch's writer reports a failed write as a RuntimeError ("unexpected pos", "failed writing
    file"): an OSError here, ENOSPC when the disk is full, so that it reads as what it is."""
    text = str(e)
    if "unexpected pos" not in text and "failed writing" not in text:
        return e
    full = shutil.disk_usage(path.parent).free < 64 * 2**20
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def checkpoint_file(path: str | Path) -> Path:
    p = Path(path)
    return p / FILENAME if p.is_dir() else p


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    p = checkpoint_file(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{p}: not a loadable checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(
            f"{p}: not a deeplab checkpoint (no model/config entries; "
            "a reference-implementation checkpoint needs `deeplab import-checkpoint`)"
        )
    return ckpt
