"""A sweep's folder in Ray's storage, built in this one place: `<storage.path>/<sweep name>/`
holds Tune's experiment (its `tuner.pkl`, trial folders, searcher state) and `train/<trial id>/`,
each trial's run folder (checkpoints, epochs, PNGs), which a worker group's Ray Train run and
a one-worker trial both use. Every reader (the sweep, its trials, the MLflow writer, `deeplab
sync`, the summary) goes through `SweepFolder`.

A sweep's name is a folder name, an MLflow tag value and an Optuna study name at once: letters,
digits, `.`, `_` and `-` only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

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

    def __getstate__(self) -> dict:
        return {"uri": self.uri}  # a filesystem client is made again where it is needed

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "uri", state["uri"])
