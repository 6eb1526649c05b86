"""The searcher's model of the sweep's results, learned from ASHA's rungs as well as from trials
run in full, the way BOHB does (Falkner et al. 2018): each new trial is drawn by the sweep's
sampler (TPE or a Gaussian process) from a view of the study in which every trial that reached
epoch b scores its best result up to b, where b is the latest of the rungs and the last epoch
that enough trials have reached. Early in a sweep that is a rung that many cheap trials
reached; once enough trials have run in full, their final results alone.

Optuna's own samplers read a study whose stopped trials are PRUNED: TPE ranks them below every
finished trial by how far they got, and its GP leaves them out; neither compares trials at a
rung. The view is an in-memory study of COMPLETE trials built for each draw, through Optuna's
public API; the sweep's study keeps what the trials really did.

A drawn configuration that a trial has already trained in full is drawn again (a repeat costs a
full trial and teaches nothing), then taken at random: in a space of choices only, among those
not yet trained in full."""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import TrialState, create_trial

from deeplab_sweep.search.space import OptunaSpace

_VIEW, _DRAW = 1, 2  # what a seed is for (`_seed`)
REDRAWS = 10  # draws of the model before a configuration is taken at random (not one trained in full)


@dataclass
class ModelDraw:
    make_sampler: Callable[[int], optuna.samplers.BaseSampler]  # seed -> sampler (picklable)
    fidelities: list[int]  # the epochs the model may score trials at: ASHA's rungs, then the last
    min_points: int  # trials needed at a fidelity before the model scores them there
    direction: str  # "maximize" or "minimize"
    seed: int
    grid: list[dict] | None = None  # every configuration of a space of choices only (Optuna params)
    random_share: float = 0.0  # of the draws made at random instead (BOHB: 1/3)
    draws: int = field(default=0)

    def params(self, study: optuna.Study, space: OptunaSpace) -> dict:
        """Optuna params for the next trial of `study` (the sweep's)."""
        trials = study.get_trials(deepcopy=False)
        view = self.view(trials)
        trained = {_key(t.params) for t in trials if t.state == TrialState.COMPLETE}
        for _ in range(REDRAWS):
            self.draws += 1
            seed = _seed(self.seed, self.draws, _DRAW)
            if self.random_share and random.Random(seed).random() < self.random_share:
                drawn = _random_draw(seed)
            else:
                drawn = view.ask()
            space(drawn)  # left running in the view: a GP's next draw steers away from it
            if _key(drawn.params) not in trained:
                return dict(drawn.params)
        if self.grid is not None:
            untried = [p for p in self.grid if _key(p) not in trained]
            return dict(random.Random(seed).choice(untried or self.grid))
        drawn = _random_draw(seed)
        space(drawn)
        return dict(drawn.params)

    def view(self, trials: list[optuna.trial.FrozenTrial]) -> optuna.Study:
        """An in-memory study of every trial that has a result, each COMPLETE: a trial that
        reached the model's fidelity (the latest at which at least `min_points` trials have a
        result) scores its best result up to it; one stopped before it scores below all of
        those, lower the earlier it stopped, in the order of its results where it stopped (as
        Optuna ranks PRUNED trials; a GP needs values, so they are put on the same scale). The
        other running trials are in it as RUNNING. Empty while no fidelity has enough trials:
        the sampler's start-up draws."""
        view = optuna.create_study(
            direction=self.direction, sampler=self.make_sampler(_seed(self.seed, self.draws, _VIEW))
        )
        scores = self._scores(trials)
        for t in trials:
            if t.number in scores:
                view.add_trial(create_trial(params=t.params, distributions=t.distributions, value=scores[t.number]))
            elif t.state == TrialState.RUNNING and t.params:  # a GP steers away from what runs
                view.add_trial(create_trial(params=t.params, distributions=t.distributions, state=TrialState.RUNNING))
        return view

    def _scores(self, trials: list[optuna.trial.FrozenTrial]) -> dict[int, float]:
        """Trial number -> its score in the view (see `view`); empty below `min_points`."""
        sign = 1.0 if self.direction == "maximize" else -1.0
        at: dict[int, dict[int, float]] = {}  # fidelity -> trial number -> its (signed) best result up to it
        for f in self.fidelities:
            at[f] = {}
            for t in trials:
                v = _score(t, f, self.fidelities[-1], self.direction)
                if v is not None:
                    at[f][t.number] = sign * v
        reached = [f for f in self.fidelities if len(at[f]) >= self.min_points]
        if not reached:
            return {}
        b = reached[-1]
        lo, hi = min(at[b].values()), max(at[b].values())
        spread = (hi - lo) or 1.0
        out = dict(at[b])
        running = {t.number for t in trials if t.state == TrialState.RUNNING}
        below = [f for f in self.fidelities if f < b]
        for depth, f in enumerate(reversed(below), 1):  # the level below b first
            ranked = sorted(at[f].values())
            for number, v in at[f].items():
                if number not in out and number not in running:  # stopped at f: below all that went further
                    u = (bisect.bisect_left(ranked, v) + 0.5) / len(ranked)
                    out[number] = lo - spread * (depth - u)
        return {n: sign * v for n, v in out.items()}


@dataclass
class HandOver:
    """Once a share `at` of the sweep's budget is spent, each new trial is drawn by `model` and
    runs in full (`sweep.hand_over`)."""

    at: float
    model: ModelDraw


def _score(t: optuna.trial.FrozenTrial, epoch: int, last: int, direction: str) -> float | None:
    """A trial's best result up to `epoch`, where it reached it; a finished trial with no
    results by epoch (a warm start's) scores its value at the last epoch."""
    if t.state == TrialState.COMPLETE and not t.intermediate_values:
        return t.value if epoch == last else None
    if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return None
    reached = [v for e, v in t.intermediate_values.items() if e <= epoch]
    if not reached or max(t.intermediate_values) < epoch:
        return None
    return max(reached) if direction == "maximize" else min(reached)


def _seed(sweep_seed: int, draws: int, use: int) -> int:
    """A seed of its own for each view's sampler and each draw's random choices. The sweep's
    sampler has `sweep_seed` itself: a view's sampler seeded alike would make its start-up draws
    the sweep's random trials again, one by one."""
    return int(np.random.SeedSequence([sweep_seed, draws, use]).generate_state(1)[0])


def _random_draw(seed: int) -> optuna.Trial:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed)).ask()


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))
