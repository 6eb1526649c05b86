"""What a sweep optimises: one or more objectives, constraints on reported metrics, the Pareto
front, and what a trial costs. Shared by the searcher (what Optuna is told, when to stop), the
sweep's summary and `deeplab best`, so all three judge trials the same way."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from deeplab_sweep.errors import ConfigError

_CONSTRAINT = re.compile(
    r"^\s*(?P<metric>[^<>=\s]+)?\s*(?P<op><=|>=)\s*(?P<bound>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # "<=" or ">="
    bound: float

    def violation(self, value) -> float:
        """Optuna's convention: <= 0 when met; a missing or non-finite value never meets it."""
        if not finite(value):
            return math.inf
        return float(value) - self.bound if self.op == "<=" else self.bound - float(value)

    def met(self, value) -> bool:
        return self.violation(value) <= 0

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def parse_constraint(text: str, where: str, metric: str | None = None) -> Constraint:
    """`val/mIoU>=0.7`, or `<= 20000` when the metric is given apart (a YAML key)."""
    m = _CONSTRAINT.match(text if metric is None else f"{metric} {text}")
    if m is None or not m["metric"]:
        raise ConfigError(f"{where} = {text!r}: expected METRIC<=NUMBER or METRIC>=NUMBER, e.g. val/mIoU>=0.7")
    return Constraint(m["metric"], m["op"], float(m["bound"]))


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def feasible(point: dict, constraints: list[Constraint]) -> bool:
    return all(c.met(point.get(c.metric)) for c in constraints)


def scorable(point: dict, objectives: list[tuple[str, str]], constraints: list[Constraint]) -> bool:
    """Every objective reported and every constraint met: a point a front or a best can hold."""
    return all(finite(point.get(m)) for m, _ in objectives) and feasible(point, constraints)


def dominates(a: dict, b: dict, objectives: list[tuple[str, str]]) -> bool:
    """`a` is at least as good as `b` in every objective and better in one."""
    signs = [(1 if mode == "max" else -1, metric) for metric, mode in objectives]
    at_least = all(s * a[m] >= s * b[m] for s, m in signs)
    return at_least and any(s * a[m] > s * b[m] for s, m in signs)


def pareto_front(points: list[dict], objectives: list[tuple[str, str]], constraints: list[Constraint]) -> list[dict]:
    """The feasible points with every objective reported that no other such point dominates
    (equal points are all on it)."""
    ok = [p for p in points if scorable(p, objectives, constraints)]
    return [p for p in ok if not any(dominates(q, p, objectives) for q in ok if q is not p)]


# -- what a trial costs: the resources it holds, for as long as Tune has run it ----------------------


def cost_metric(train) -> str:
    return "cost/gpu_hours" if train.use_gpu else "cost/cpu_hours"


def units_held(train) -> float:
    """GPUs (or CPUs, on CPU) a trial holds while it runs: its workers' (a worker group's driver
    holds memory only)."""
    return float(train.num_workers * (1 if train.use_gpu else train.cpus_per_worker))


class TrialCost:
    """Hours of resources each trial has held: the wall time of every attempt (from Tune
    starting it to its end, its error or its restart) x the units a trial holds, on the
    driver's clock. An attempt that dies before it reports counts as much as one that reports;
    a running attempt counts up to now. Pickled (a resumed sweep), a running attempt counts up
    to that moment: the driver that resumes does not know when it ended."""

    # The clock: the driver's time.time, a replay's simulated one. Not pickled.
    clock = staticmethod(time.time)

    def __init__(self, units: float):
        self.units = units
        self.closed_s: dict[str, float] = {}  # trial -> seconds of its attempts that ended
        self._open: dict[str, float] = {}  # trial -> when its running attempt started (clock())

    def started(self, trial_id: str) -> None:
        self.ended(trial_id)  # a start without an end (a reused actor's reset) closes the last one
        self._open[trial_id] = self.clock()

    def ended(self, trial_id: str) -> None:
        start = self._open.pop(trial_id, None)
        if start is not None:
            self.closed_s[trial_id] = self.closed_s.get(trial_id, 0.0) + max(0.0, self.clock() - start)

    def seconds(self, trial_id: str) -> float:
        start = self._open.get(trial_id)
        return self.closed_s.get(trial_id, 0.0) + (max(0.0, self.clock() - start) if start is not None else 0.0)

    def hours(self, trial_id: str) -> float:
        return self.seconds(trial_id) * self.units / 3600

    def total(self) -> float:
        return sum(self.hours(t) for t in self.closed_s.keys() | self._open.keys())

    def __getstate__(self) -> dict:
        trials = self.closed_s.keys() | self._open.keys()
        return {"units": self.units, "closed_s": {t: self.seconds(t) for t in trials}, "_open": {}}
