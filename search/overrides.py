"""Dotted-key overrides of a config dict: `section.key=value` from the command line, and the
values a sweep trial samples (keyed by config path)."""

from __future__ import annotations

import copy
from typing import Any

from deeplab_sweep.errors import ConfigError


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


# Conditional search parameters are suggested under "key|parent_value" so that each Optuna
# distribution keeps one fixed set of choices; trials fold the name back to "key".
COND_SEP = "|"


def trial_overrides(config: dict) -> dict[str, Any]:
    """Sampled values keyed by dotted config path (conditional names folded back)."""
    return {k.split(COND_SEP, 1)[0]: v for k, v in config.items() if "." in k}


def trial_epochs(config: dict, default_epochs: int) -> int:
    """The epochs a trial was to train: its sampled `train.epochs`, else the sweep's."""
    return trial_overrides(config or {}).get("train.epochs", default_epochs)


def apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(out, key, value)
    return out
