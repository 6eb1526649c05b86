"""When a sweep stops starting trials: its compute budget is spent (`sweep.budget.gpu_hours`
or `cpu_hours`, counted over finished and running trials), its wall time is up
(`sweep.budget.wall_time_s`, counted while a driver runs it), or N trials in a row finished
without improving on the best (`sweep.stop_when.no_improvement_trials`; with several
objectives: without joining the Pareto front). Trials already running always finish.

Kept by the searcher (Tune consults it in `suggest`, pickles it with the experiment and
restores it on resume)."""

from __future__ import annotations

import time

from deeplab_sweep.search.objectives import Constraint, TrialCost, dominates, scorable


class Completion:
    def __init__(
        self,
        objectives: list[tuple[str, str]],
        constraints: list[Constraint],
        units_per_trial: float,
        cost_metric: str,
        budget_hours: float | None = None,
        wall_time_s: float | None = None,
        patience: int | None = None,
    ):
        self.objectives, self.constraints = objectives, constraints
        self.cost_metric = cost_metric
        self.budget_hours, self.wall_time_s, self.patience = budget_hours, wall_time_s, patience
        self.cost = TrialCost(units_per_trial)
        self.points: list[dict] = []  # finished trials' objective values, warm-started ones too
        self.without_improvement = 0
        self.elapsed_s = 0.0  # wall time of earlier drivers of this sweep
        self.reason: str | None = None
        self._since = time.monotonic()

    # -- what trials report -------------------------------------------------------------------

    def on_result(self, trial_id: str, result: dict) -> float:
        """Count the trial's time so far; returns its cost in hours."""
        return self.cost.on_result(trial_id, result)

    def on_finished(self, point: dict, on_front_possible: bool) -> None:
        """A trial ended with these values (`on_front_possible`: it ran in full; a stopped
        trial can still be the best single value, never on a front of several)."""
        improved = self._improves(point, on_front_possible)
        self.without_improvement = 0 if improved else self.without_improvement + 1
        self.points.append(point)

    def seed(self, points: list[dict]) -> None:
        """Earlier sweeps' results (warm start): the best to improve on."""
        self.points.extend(points)

    def _improves(self, point: dict, on_front_possible: bool) -> bool:
        if not scorable(point, self.objectives, self.constraints):
            return False
        known = [p for p in self.points if scorable(p, self.objectives, self.constraints)]
        if len(self.objectives) == 1:
            ((metric, mode),) = self.objectives
            sign = 1 if mode == "max" else -1
            return all(sign * point[metric] > sign * p[metric] for p in known)
        if not on_front_possible:
            return False
        same = [p for p in known if all(p[m] == point[m] for m, _ in self.objectives)]
        return not same and not any(dominates(p, point, self.objectives) for p in known)

    # -- the criteria ---------------------------------------------------------------------------

    def hours(self) -> float:
        return self.cost.total()

    def wall_s(self) -> float:
        return self.elapsed_s + time.monotonic() - self._since

    def check(self) -> str | None:
        """Why no new trial should start, or None."""
        if self.reason is None:
            unit = self.cost_metric.split("/", 1)[1]
            if self.budget_hours is not None and self.hours() >= self.budget_hours:
                self.reason = f"budget.{unit} spent: {self.hours():.4g} of {self.budget_hours:g}"
            elif self.wall_time_s is not None and self.wall_s() >= self.wall_time_s:
                self.reason = f"budget.wall_time_s passed: {self.wall_s():.0f} s of {self.wall_time_s:g}"
            elif self.patience is not None and self.without_improvement >= self.patience:
                self.reason = f"stop_when.no_improvement_trials: {self.without_improvement} trials without improvement"
        return self.reason

    # -- pickled with the searcher: the clock of this driver is not -----------------------------

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != "_since"}
        state["elapsed_s"] = self.wall_s()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._since = time.monotonic()
