"""Early stopping: Ray Tune's ASHA (asynchronous successive halving, with Hyperband's brackets
when `sweep.asha.brackets` > 1), and a self-check no tuner we know of makes.

ASHA stops a trial at a rung (an epoch) when it ranks below the top 1/reduction_factor of the
trials seen there. That only helps where the rung's ranking predicts the last epoch's. With
`sweep.asha.min_rank_corr` set, the sweep measures it on an unselected sample: its first
`check_trials` trials run in full whatever ASHA decides (trials that ASHA promoted would be a
sample that agrees with the rungs by construction). Each rung's Spearman correlation between
their results at the rung (the result ASHA judged there) and at the last epoch decides, once
all of them have run in full, with a stated error rate: a rung is turned off (stops no trial
for the rest of the sweep) when the upper bound of its correlation's one-sided confidence
interval at `check_confidence` is below `min_rank_corr`, so a rung that does rank that well is
turned off with a chance of at most 1 - `check_confidence` (Fisher's z of Spearman's rho, with
Bonett and Wright's variance (1 + rho^2 / 2) / (n - 3)). What it measured and decided is printed,
kept in `<sweep folder>/asha_check.json` (which a resumed sweep reads back: Tune restores the
searcher and the callbacks, never the scheduler) and logged on the parent run
(`asha/rank_corr/epoch_N`)."""

from __future__ import annotations

import json
import math
import sys

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

CHECK_FILE = "asha_check.json"


def scheduler(job, folder=None, searcher=None) -> TrialScheduler:
    """The sweep's early-stopping scheduler (`folder`: the SweepFolder the self-check writes in;
    `searcher`: the sweep's, which says which trials run in full after `sweep.hand_over`)."""
    a = job.sweep.asha
    if not a.enabled:
        return FIFOScheduler()
    kwargs = dict(
        time_attr="epoch",
        max_t=job.epoch_bounds()[1],
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        brackets=a.brackets,
        searcher=searcher if job.sweep.hand_over.at is not None else None,
    )
    if a.min_rank_corr is None:
        return HandingOverASHA(**kwargs)
    return SelfCheckingASHA(
        **kwargs,
        min_rank_corr=a.min_rank_corr,
        check_trials=a.check_trials,
        confidence=a.check_confidence,
        folder=folder,
    )


def rungs(max_t: int, grace_period: int, reduction_factor: int, brackets: int) -> list[int]:
    """The epochs where ASHA may stop a trial: in bracket k, grace_period x reduction_factor^k,
    then x reduction_factor each, below max_t (Ray's ASHA rungs)."""
    out = set()
    for k in range(brackets):
        r = grace_period * reduction_factor**k
        while r < max_t:
            out.add(r)
            r *= reduction_factor
    return sorted(out)


def expected_epochs(job, trials: int = 5000) -> float:
    """The epochs a sweep's trials train in all under the scheduler it builds, where every rung
    ranks trials as their last epoch does: that scheduler run on seeded draws of `num_samples`
    trials one after another (up to 100 draws, about `trials` trials in all: each result costs
    ASHA a percentile over its rung), each reporting at the rungs and at its last epoch.
    Asynchronous ASHA promotes its first trials on few results, so a small sweep trains more
    than ASHA's nominal budget; the self-check's first trials run in full; a rung it turns off
    adds more."""
    import random

    import numpy as np
    from ray.tune.experiment import Trial

    a, max_t, n = job.sweep.asha, job.epoch_bounds()[1], job.sweep.num_samples
    if not a.enabled:
        return float(n * max_t)
    stops = [*rungs(max_t, a.grace_period, a.reduction_factor, a.brackets), max_t]
    seeds = max(1, min(100, trials // n))
    state, total = np.random.get_state(), 0
    for seed in range(seeds):
        np.random.seed(seed)  # Ray draws each trial's bracket from numpy's global generator
        draw, sched = random.Random(seed), scheduler(job)
        sched.set_search_properties("m", "max")
        for i in range(n):
            trial, quality = Trial("estimate", trial_id=f"{i:05d}", stub=True), draw.random()
            sched.on_trial_add(None, trial)
            for epoch in stops:
                result = {"epoch": epoch, "m": quality * epoch}
                if sched.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                    break
            total += epoch
            sched.on_trial_complete(None, trial, result)
    np.random.set_state(state)
    return total / seeds


class HandingOverASHA(ASHAScheduler):
    """ASHA that stops no trial its searcher drew to run in full (`sweep.hand_over`). It holds
    the searcher itself, as `SearcherClock` does: Tune pickles both into one tuner.pkl and
    restores the searcher's state in place, so a resumed sweep's scheduler (the one pickled at
    the start) asks the restored searcher."""

    def __init__(self, *, searcher=None, **asha):
        super().__init__(**asha)
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        early = (result.get(self._time_attr) or 0) < self._max_t  # at its last epoch, ASHA's STOP is its end
        if decision == TrialScheduler.STOP and early and self.searcher is not None:
            return TrialScheduler.CONTINUE if self.searcher.runs_in_full(trial.trial_id) else decision
        return decision


class SelfCheckingASHA(HandingOverASHA):
    """ASHA whose rungs stop trials only while an unselected sample has not shown, at the stated
    confidence, that their ranking fails to predict the last epoch's."""

    def __init__(self, *, min_rank_corr: float, check_trials: int, confidence: float = 0.9, folder=None, **asha):
        super().__init__(**asha)
        self.min_rank_corr, self.check_trials, self.confidence = min_rank_corr, check_trials, confidence
        self.folder = folder
        self.max_t = asha["max_t"]
        self.rungs = rungs(self.max_t, asha["grace_period"], asha["reduction_factor"], asha.get("brackets", 1))
        self.sample: list[str] = []  # the trials that run in full whatever ASHA decides
        self.curves: dict[str, dict[int, float]] = {}  # sampled trial -> its result at each rung judged, and last
        self.corr: dict[int, float | None] = {}  # rung -> Spearman with the last epoch over the sample
        self.upper: dict[int, float | None] = {}  # rung -> the upper confidence bound of that correlation
        self.off: dict[int, str] = {}  # rung -> why it stops no trial any more
        self._restored = False

    def on_trial_add(self, tune_controller, trial) -> None:
        self._restore()
        super().on_trial_add(tune_controller, trial)
        if len(self.sample) < self.check_trials and trial.trial_id not in self.sample:
            self.sample.append(trial.trial_id)
            self._save()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch, value = result.get(self._time_attr), result.get(self._metric)
        if epoch is None or value is None:
            return decision
        if trial.trial_id in self.sample:
            curve = self.curves.setdefault(trial.trial_id, {})
            for r in [*self.rungs, self.max_t]:  # the result ASHA judges a rung by: the first at or past it
                if r <= epoch and r not in curve:
                    curve[r] = float(value)
        if decision == TrialScheduler.STOP and epoch < self.max_t:
            if trial.trial_id in self.sample or self._judged_at(epoch) in self.off:
                return TrialScheduler.CONTINUE  # measuring, or a rung shown to rank poorly
        return decision

    def _judged_at(self, epoch: float) -> int | None:
        """The rung a stop at `epoch` comes from: the latest rung at or before it."""
        return max((r for r in self.rungs if r <= epoch), default=None)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        if trial.trial_id in self.sample:
            self._save()
            if self._measured() == len(self.sample) == self.check_trials and not self.corr:
                self._decide()

    def _measured(self) -> int:
        return sum(self.max_t in self.curves.get(t, {}) for t in self.sample)

    def _decide(self) -> None:
        full = [self.curves[t] for t in self.sample if self.max_t in self.curves.get(t, {})]
        last = [c[self.max_t] for c in full]
        for rung in self.rungs:
            pairs = [(c[rung], v) for c, v in zip(full, last, strict=True) if rung in c]
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            self.corr[rung], self.upper[rung] = rho, upper_bound(rho, len(pairs), self.confidence)
            if self.upper[rung] is not None and self.upper[rung] < self.min_rank_corr:
                self.off[rung] = (
                    f"asha: the rung at epoch {rung} stops no more trials: over the {len(pairs)} trials that ran in "
                    f"full unselected, its ranking predicted the last epoch's with Spearman {rho:+.2f}, at most "
                    f"{self.upper[rung]:+.2f} at {self.confidence:.0%} confidence (sweep.asha.min_rank_corr = "
                    f"{self.min_rank_corr:g})"
                )
                print(self.off[rung], file=sys.stderr)
        self._save()

    def report(self) -> dict:
        return {
            "min_rank_corr": self.min_rank_corr,
            "confidence": self.confidence,
            "trials_in_full": self._measured(),
            "sample": self.sample,
            "curves": {t: {str(e): v for e, v in c.items()} for t, c in self.curves.items()},
            "rank_corr": {str(r): c for r, c in self.corr.items()},
            "upper_bound": {str(r): c for r, c in self.upper.items()},
            "rungs_off": {str(r): why for r, why in self.off.items()},
        }

    def _save(self) -> None:
        if self.folder is not None:
            self.folder.storage.write_bytes(self.folder.storage.join(CHECK_FILE), json.dumps(self.report()).encode())

    def _restore(self) -> None:
        """What a previous driver of this sweep measured and decided (a resumed sweep's scheduler
        is the one pickled when the sweep started)."""
        if self._restored:
            return
        self._restored = True
        saved = read_check(self.folder) if self.folder is not None else None
        if saved:
            self.sample = list(saved["sample"])
            self.curves = {t: {int(e): v for e, v in c.items()} for t, c in saved["curves"].items()}
            self.corr = {int(r): c for r, c in saved["rank_corr"].items()}
            self.upper = {int(r): c for r, c in saved["upper_bound"].items()}
            self.off = {int(r): why for r, why in saved["rungs_off"].items()}


def upper_bound(rho: float | None, n: int, confidence: float) -> float | None:
    """The upper bound of a one-sided confidence interval of a Spearman correlation `rho` over
    `n` pairs (Fisher's z with Bonett and Wright's variance); None below 4 pairs."""
    if rho is None or n < 4:
        return None
    from statistics import NormalDist

    z = math.atanh(max(-0.999999, min(0.999999, rho)))
    se = math.sqrt((1 + rho * rho / 2) / (n - 3))
    return math.tanh(z + NormalDist().inv_cdf(confidence) * se)


def read_check(folder) -> dict | None:
    """What the self-check of a sweep measured and decided (None: it made none)."""
    path = folder.storage.join(CHECK_FILE)
    return json.loads(folder.storage.read_text(path)) if folder.storage.is_file(path) else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None below 3 pairs or when a
    side is constant."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None
