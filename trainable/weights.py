"""ImageNet backbone weights, through torchvision's weights API: found on the driver (an explicit
file, a folder holding them, the torch hub cache) or downloaded there once, then staged into the
sweep's storage, from which every worker on every node reads them. No worker downloads.

`model.backbone_weights` is a file, or a folder (local or a storage URI such as
s3://bucket/ray/weights) holding each backbone's file under torchvision's own file name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch

from deeplab_sweep.errors import ConfigError


class PretrainedWeightsMissing(ConfigError):
    pass


def file_name(weights) -> str:
    """torchvision's name for a weights file (e.g. resnet50-0676ba61.pth)."""
    return Path(weights.url).name


def _is_uri(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def local_file(weights, source: str | None) -> Path:
    """The weights as a file on this machine: `source` (a file, or a folder holding it), else
    the torch hub cache, else downloaded into that cache. One line names the file to place
    where none of these works (no network)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name(weights)
    path = cached if source is None else Path(source) / file_name(weights) if Path(source).is_dir() else Path(source)
    if path.is_file():
        return path
    detail = ""
    if source is None:
        try:  # into the cache, its hash checked against the one in its name
            torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
            return cached
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash a RuntimeError
            detail = f" (download failed: {str(getattr(e, 'reason', e)).splitlines()[0][:120]})"
    raise PretrainedWeightsMissing(
        f"model.pretrained_backbone: pretrained backbone weights not found: place {file_name(weights)} "
        f"(from {weights.url}) at {path}{detail}, "
        "or set model.backbone_weights=FILE, or model.pretrained_backbone=false"
    )


def imagenet_state(weights, source: str | None = None) -> dict:
    """The state dict. A storage URI (staged by `stage`) is read into this node's torch hub
    cache first, once per node."""
    if source is not None and _is_uri(source):
        fs, folder = pafs.FileSystem.from_uri(source)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name(weights)
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            # A name of its own: trials on one node with a cold cache copy side by side, and
            # the first rename wins with a whole file (a shared .part was truncated under it).
            fd, part = tempfile.mkstemp(prefix=f".{cached.name}.", suffix=".part", dir=cached.parent)
            os.close(fd)
            try:
                pafs.copy_files(f"{folder}/{file_name(weights)}", part, source_filesystem=fs)
                os.replace(part, cached)
            finally:
                Path(part).unlink(missing_ok=True)
        return torch.load(cached, map_location="cpu", weights_only=True)
    return torch.load(local_file(weights, source), map_location="cpu", weights_only=True)


def stage(all_weights: list, source: str | None, folder: str) -> str:
    """Each weights file found on this machine, copied once into `folder` (the sweep's
    storage: a shared mount or a cloud URI, which every node reads). Returns `folder`."""
    fs, root = pafs.FileSystem.from_uri(folder) if _is_uri(folder) else (pafs.LocalFileSystem(), folder)
    fs.create_dir(root)
    for weights in all_weights:
        src = local_file(weights, source)
        dest = f"{root}/{file_name(weights)}"
        info = fs.get_file_info(dest)
        if info.type != pafs.FileType.File or info.size != src.stat().st_size:
            pafs.copy_files(str(src), dest, destination_filesystem=fs)
    return folder
