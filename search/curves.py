"""Learning-curve tables: one CSV row per (configuration, training seed, epoch), keyed by config
paths, as `benchmarks/learning_curves.py` writes them; what a replayed sweep (`replay.py`) and a
stand-in trial (`standin.py`) report instead of training. A trial's config is looked up by the
nearest value of each key the table holds (on a log scale for positive numbers), so a continuous
space (`train.lr: loguniform`) replays on a grid of it. Light to import: numpy, no Ray or torch."""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import dataclass
from pathlib import Path

from deeplab_sweep.errors import ConfigError

EPOCH, SEED = "epoch", "train.seed"


@dataclass(frozen=True)
class Table:
    """Learning curves: for each configuration (its values of `keys`), its reports by epoch."""

    keys: tuple[str, ...]
    curves: dict[tuple, list[dict]]

    @classmethod
    def from_csv(cls, path: str | Path, keys: tuple[str, ...] | list[str], seed: int = 0) -> Table:
        """The rows of one training seed of a CSV file (gzipped where it ends in .gz): `keys`,
        the configuration's columns (a sweep's space: every other column but `epoch` and
        `train.seed` is a report), typed as the grid holds them; the reports parsed as numbers."""
        keys = tuple(keys)
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [k for k in (*keys, EPOCH) if k not in columns]
            if missing:
                raise ConfigError(f"{path}: no column {missing[0]!r} (its columns: {', '.join(columns)})")
            rows = [r for r in reader if int(r.get(SEED) or 0) == seed]
        if not rows:
            raise ConfigError(f"{path}: no rows of train.seed {seed}")
        reported = [k for k in rows[0] if k not in keys and k not in (EPOCH, SEED)]
        curves: dict[tuple, list[dict]] = {}
        for r in rows:
            config = tuple(_typed(r[k]) for k in keys)
            report = {k: float(r[k]) for k in reported if r[k] != ""}
            curves.setdefault(config, []).append({**report, EPOCH: int(r[EPOCH])})
        return cls(keys, {c: sorted(reps, key=lambda x: x[EPOCH]) for c, reps in curves.items()})

    @classmethod
    def from_trials(cls, keys: tuple[str, ...], trials: list[tuple[dict, list[dict]]]) -> Table:
        """A table of a sweep's own trials: (their overrides, their reports by epoch)."""
        return cls(keys, {tuple(o[k] for k in keys): reports for o, reports in trials})

    def values(self, key: str) -> list:
        i = self.keys.index(key)
        return sorted({c[i] for c in self.curves}, key=lambda v: (str(type(v)), v))

    def lookup(self, overrides: dict) -> tuple[tuple, list[dict]]:
        """The configuration nearest to `overrides` (every key of the table must be in it) and
        its curve."""
        config = tuple(_nearest(overrides[k], self.values(k)) for k in self.keys)
        return config, self.curves[config]

    def final(self, epochs: int, metric: str) -> dict[tuple, float]:
        """Each configuration's `metric` at `epochs`."""
        return {c: rows[epochs - 1][metric] for c, rows in self.curves.items() if len(rows) >= epochs}


def _typed(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def _nearest(value, grid: list):
    if value in grid:
        return value
    numbers = [g for g in grid if isinstance(g, (int, float)) and not isinstance(g, bool)]
    if not isinstance(value, (int, float)) or not numbers:
        raise KeyError(f"{value!r} is not in the table ({grid})")
    log = value > 0 and all(g > 0 for g in numbers)
    return min(numbers, key=lambda g: abs(math.log(g / value)) if log else abs(g - value))
