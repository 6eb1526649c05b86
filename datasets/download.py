"""Getting the real datasets onto disk: resumable download, md5 check, safe extraction.

These machines may have no route to the dataset hosts; every network step fails fast with a
message saying which file to place where, so a user can copy it in by hand.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from deeplab_sweep.errors import DatasetError

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
CITYSCAPES_ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
TIMEOUT_S = 15


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Download `url` to `dest`, resuming a partial `dest.part` with an HTTP Range request."""
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            mode = "ab" if have and resp.status == 206 else "wb"
            with open(part, mode) as f:
                while block := resp.read(1 << 20):
                    f.write(block)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DatasetError(
            f"cannot download {url} ({reason}); download it elsewhere and place it at {dest}, "
            "then run the same command again"
        ) from None
    if md5 is not None and (got := md5sum(part)) != md5:
        raise DatasetError(f"{part}: md5 {got} does not match {md5}; delete it and download again")
    part.rename(dest)
    return dest


def _inside(base: Path, name: str) -> bool:
    target = (base / name).resolve()
    return target == base or base in target.parents


def safe_extract(archive: Path, out: Path) -> None:
    """Extract tar or zip, refusing members that would land outside `out` (absolute paths,
    `..`, links pointing out): an archive is untrusted input."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if not _inside(out, name):
                    raise DatasetError(f"{archive}: member {name!r} would extract outside {out}; refused")
            z.extractall(out)
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise DatasetError(f"{archive}: not a readable tar or zip archive ({e})") from None
    with tf:
        for m in tf.getmembers():
            if not _inside(out, m.name) or (
                (m.issym() or m.islnk()) and not _inside(out, os.path.join(os.path.dirname(m.name), m.linkname))
            ):
                raise DatasetError(f"{archive}: member {m.name!r} would extract outside {out}; refused")
        # The 'data' filter also drops device files and unsafe permissions.
        tf.extractall(out, filter="data")


def download_voc(root: str | Path) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = fetch(VOC_URL, root / Path(VOC_URL).name, VOC_MD5)
    safe_extract(archive, root)
    return root


def prepare_cityscapes(root: str | Path) -> Path:
    """Cityscapes needs a login: the zips cannot be fetched by a script. Extract them if placed."""
    root = Path(root)
    missing = [z for z in CITYSCAPES_ZIPS if not (root / z).exists()]
    if missing:
        raise DatasetError(
            f"Cityscapes requires a login at cityscapes-dataset.com: download {' and '.join(missing)} "
            f"there and place them in {root}/, then run the same command again"
        )
    for z in CITYSCAPES_ZIPS:
        safe_extract(root / z, root)
    return root
