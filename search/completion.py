"""When a sweep stops starting trials: its compute budget is spent (`sweep.budget.gpu_hours` or
`cpu_hours`: resources held x the wall time of every attempt; `sweep.budget.epochs`: epochs
trained; both over finished and running trials), its wall time is up (`budget.wall_time_s`,
counted while a driver runs it), or N trials in a row finished without improving on the best
(`sweep.stop_when.no_improvement_trials`; with several objectives: without joining the Pareto
front). Trials already running always finish.

Kept by the searcher (Tune consults it in `suggest`, pickles it with the experiment and
restores it on resume)."""

from __future__ import annotations

import time

from deeplab_sweep.search.objectives import Constraint, TrialCost, dominates, scorable


class Completion:
    clock = staticmethod(time.monotonic)  # the wall clock of this driver: not pickled

    def __init__(
        self,
        *,
        objectives: list[tuple[str, str]],
        constraints: list[Constraint],
        units_per_trial: float,
        cost_metric: str,
        budget_hours: float | None = None,
        budget_epochs: int | None = None,
        wall_time_s: float | None = None,
        patience: int | None = None,
    ):
        self.objectives, self.constraints = objectives, constraints
        self.cost_metric = cost_metric
        self.budget_hours, self.budget_epochs = budget_hours, budget_epochs
        self.wall_time_s, self.patience = wall_time_s, patience
        self.cost = TrialCost(units_per_trial)  # told each attempt's start and end (SearcherClock)
        self.epochs: dict[str, int] = {}  # trial -> the last epoch it trained
        self.points: list[dict] = []  # finished trials' values (at their best epoch), warm-started ones too
        self.without_improvement = 0
        self.elapsed_s = 0.0  # wall time of earlier drivers of this sweep
        self.reason: str | None = None
        self._since = self.clock()

    # -- what trials report -------------------------------------------------------------------

    def on_result(self, trial_id: str, result: dict) -> None:
        """An epoch trained (a replayed one, after a restart, is not trained again)."""
        self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(result.get("epoch") or 0))

    def on_finished(self, point: dict, ran_in_full: bool) -> None:
        """A trial ended with these values. One that was stopped early is never on a front of
        several objectives, so there it neither improves nor joins the points; with one
        objective its best value counts like any other."""
        multi = len(self.objectives) > 1
        improved = (ran_in_full or not multi) and self._improves(point)
        self.without_improvement = 0 if improved else self.without_improvement + 1
        if ran_in_full or not multi:
            self.points.append(point)

    def seed(self, points: list[dict]) -> None:
        """Earlier sweeps' results (warm start): the best to improve on."""
        self.points.extend(points)

    def _improves(self, point: dict) -> bool:
        if not scorable(point, self.objectives, self.constraints):
            return False
        known = [p for p in self.points if scorable(p, self.objectives, self.constraints)]
        if len(self.objectives) == 1:
            ((metric, mode),) = self.objectives
            sign = 1 if mode == "max" else -1
            return all(sign * point[metric] > sign * p[metric] for p in known)
        same = [p for p in known if all(p[m] == point[m] for m, _ in self.objectives)]
        return not same and not any(dominates(p, point, self.objectives) for p in known)

    # -- the criteria ---------------------------------------------------------------------------

    def hours(self) -> float:
        return self.cost.total()

    def epochs_trained(self) -> int:
        return sum(self.epochs.values())

    def wall_s(self) -> float:
        return self.elapsed_s + self.clock() - self._since

    def spent(self) -> float:
        """The largest share spent of any budget (0 without one)."""
        shares = [
            (self.hours(), self.budget_hours),
            (self.epochs_trained(), self.budget_epochs),
            (self.wall_s(), self.wall_time_s),
        ]
        return max((used / limit for used, limit in shares if limit), default=0.0)

    def use_clock(self, clock) -> None:
        """Count time on `clock` (a replay's simulated one) instead of the driver's."""
        self.clock = self.cost.clock = clock
        self._since = clock()

    def check(self) -> str | None:
        """Why no new trial should start, or None."""
        if self.reason is None:
            unit = self.cost_metric.split("/", 1)[1]
            if self.budget_hours is not None and self.hours() >= self.budget_hours:
                self.reason = f"budget.{unit} spent: {self.hours():.4g} of {self.budget_hours:g}"
            elif self.budget_epochs is not None and self.epochs_trained() >= self.budget_epochs:
                self.reason = f"budget.epochs spent: {self.epochs_trained()} of {self.budget_epochs}"
            elif self.wall_time_s is not None and self.wall_s() >= self.wall_time_s:
                self.reason = f"budget.wall_time_s passed: {self.wall_s():.0f} s of {self.wall_time_s:g}"
            elif self.patience is not None and self.without_improvement >= self.patience:
                self.reason = f"stop_when.no_improvement_trials: {self.without_improvement} trials without improvement"
        return self.reason

    # -- pickled with the searcher: the clock of this driver is not -----------------------------

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_since", "clock")}
        state["elapsed_s"] = self.wall_s()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._since = self.clock()
