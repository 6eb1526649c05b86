"""A sweep's folder in Ray's storage, built in this one place: `<storage.path>/<sweep name>/`
holds Tune's experiment (its `tuner.pkl`, trial folders, searcher state) and `train/<trial id>/`,
each trial's run folder (checkpoints, epochs, PNGs), which a worker group's Ray Train run and
a one-worker trial both use. Every reader (the sweep, its trials, the MLflow writer, `deeplab
sync`, the summary) goes through `SweepFolder`.

A sweep's name is a folder name, an MLflow tag value and an Optuna study name at once: letters,
digits, `.`, `_` and `-` only."""

from __future__ import annotations

import functools
import os
import re
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.trainable.storage import Storage

TRAIN_DIR = "train"
TUNER_FILE = "tuner.pkl"  # Tune writes it when a sweep starts: what `--resume` restores
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> None:
    """A `/` would nest the sweep's folder (its trials then map to no tag); a `'` would break
    MLflow's filter strings; a space, Optuna's dashboard URLs."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"sweep.name = {name!r}: use letters, digits, '.', '_' and '-' only "
            "(starting with a letter or digit, at most 100), e.g. lr-study.v2"
        )


@dataclass(frozen=True)
class SweepFolder:
    uri: str  # the sweep's folder: a local path or a cloud URI (s3://bucket/prefix/<name>)

    @classmethod
    def at(cls, storage_path: str, name: str) -> SweepFolder:
        return cls(f"{storage_path.rstrip('/')}/{name}")

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def train_uri(self) -> str:
        """Where the trials' run folders go (a worker group's Ray Train `storage_path`)."""
        return f"{self.uri.rstrip('/')}/{TRAIN_DIR}"

    def trial_uri(self, trial_id: str) -> str:
        return f"{self.train_uri}/{trial_id}"

    def trial_dir(self, trial_id: str) -> str:
        """The trial's run folder as a path in `storage`."""
        return self.storage.join(TRAIN_DIR, trial_id)

    def exists(self) -> bool:
        return self.storage.is_dir(self.storage.root)

    def has_tuner(self) -> bool:
        return self.storage.is_file(self.storage.join(TUNER_FILE))

    def check_trusted(self) -> None:
        """`--resume` unpickles what the folder holds (Tune's tuner.pkl and searcher state, a
        failed trial's error.pkl), so it must be as trusted as code: a local folder, or anything
        in it, that another user can write is refused (a cloud bucket's access is its owner's
        to set)."""
        if not self.storage.local:
            return
        root = Path(self.uri)
        for folder in root.parents:  # one that others may write could have our folder swapped
            mode = folder.stat().st_mode
            if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                _untrusted(folder, f"any user can replace what it holds (mode {oct(mode & 0o7777)})")
        for dirpath, _, filenames in os.walk(root):
            for path in [Path(dirpath), *(Path(dirpath, n) for n in filenames)]:
                why = _others_can_write(path.lstat())
                if why:
                    _untrusted(path, why)

    def __getstate__(self) -> dict:
        return {"uri": self.uri}  # a filesystem client is made again where it is needed

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "uri", state["uri"])


def _others_can_write(st: os.stat_result) -> str | None:
    """Why users other than this one (and root) can write a file with this status, or None."""
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        return f"it belongs to another user ({_user(st.st_uid)})"
    if st.st_mode & stat.S_IWOTH:
        return f"any user can write it (mode {oct(st.st_mode & 0o7777)})"
    if st.st_mode & stat.S_IWGRP:
        name, other = _group_and_another_member(st.st_gid)
        if other is not None:
            return f"its group {name!r} can write it, and {other!r} is in that group"
    return None


@functools.cache
def _group_and_another_member(gid: int) -> tuple[str, str | None]:
    """A group's name and one of its members other than this user and root (None: none), read
    once per group (a folder of a sweep holds thousands of files of one group)."""
    import grp
    import pwd

    me = os.geteuid()
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return str(gid), "an unknown user"
    mine = pwd.getpwuid(me).pw_name if me != 0 else "root"
    others = {m for m in group.gr_mem if m not in (mine, "root")} | {
        u.pw_name for u in pwd.getpwall() if u.pw_gid == gid and u.pw_uid not in (me, 0)
    }
    return group.gr_name, min(others) if others else None


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _untrusted(path: Path, why: str) -> None:
    raise ConfigError(
        f"storage.path: {path}: {why}; --resume unpickles what a sweep's folder holds, so it must be as trusted "
        "as code: make it writable by you alone (chmod go-w), or resume from a copy you own"
    )
