"""Early stopping: Ray Tune's ASHA (asynchronous successive halving, with Hyperband's brackets
when `sweep.asha.brackets` > 1), and a self-check no tuner we know of makes.

ASHA stops a trial at a rung (an epoch) when it ranks below the top 1/reduction_factor of the
trials seen there. That only helps where the rung's ranking predicts the last epoch's. With
`sweep.asha.min_rank_corr` set, the sweep measures it: the first `check_trials` trials run in
full (none is stopped), and every trial that runs in full adds its values at each rung and at
its last epoch; once `check_trials` have, each rung's Spearman correlation with the last epoch
is computed after every full trial, and a rung below `min_rank_corr` stops no trial for the rest
of the sweep (as if the grace period were raised past it). What it measured and decided is
printed, kept in `<sweep folder>/asha_check.json` and logged on the parent run
(`asha/rank_corr/epoch_N`)."""

from __future__ import annotations

import json
import sys

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

CHECK_FILE = "asha_check.json"


def scheduler(job, folder=None) -> TrialScheduler:
    """The sweep's early-stopping scheduler (`folder`: the SweepFolder the self-check writes in)."""
    a = job.sweep.asha
    if not a.enabled:
        return FIFOScheduler()
    kwargs = dict(
        time_attr="epoch",
        max_t=job.epoch_bounds()[1],
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        brackets=a.brackets,
    )
    if a.min_rank_corr is None:
        return ASHAScheduler(**kwargs)
    return SelfCheckingASHA(**kwargs, min_rank_corr=a.min_rank_corr, check_trials=a.check_trials, folder=folder)


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


class SelfCheckingASHA(ASHAScheduler):
    """ASHA whose rungs stop trials only while their ranking is shown to predict the last epoch's."""

    def __init__(self, *, min_rank_corr: float, check_trials: int, folder=None, **asha):
        super().__init__(**asha)
        self.min_rank_corr, self.check_trials, self.folder = min_rank_corr, check_trials, folder
        self.max_t = asha["max_t"]
        self.rungs = rungs(self.max_t, asha["grace_period"], asha["reduction_factor"], asha.get("brackets", 1))
        self.curves: dict[str, dict[int, float]] = {}  # trial -> its value at each epoch it reported
        self.full: list[dict[int, float]] = []  # the curves of trials that ran in full
        self.corr: dict[int, float | None] = {}  # rung -> Spearman with the last epoch, over `full`
        self.off: dict[int, str] = {}  # rung -> why it stops no trial any more

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch, value = result.get(self._time_attr), result.get(self._metric)
        if epoch is None or value is None:
            return decision
        self.curves.setdefault(trial.trial_id, {})[int(epoch)] = float(value)
        if decision == TrialScheduler.STOP and epoch < self.max_t:
            if len(self.full) < self.check_trials or int(epoch) in self.off:
                return TrialScheduler.CONTINUE  # still measuring, or a rung that ranks poorly
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        curve = self.curves.pop(trial.trial_id, {})
        if curve.get(self.max_t) is not None:
            self.full.append(curve)
            self._check()

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self.curves.pop(trial.trial_id, None)

    def _check(self) -> None:
        last = [c[self.max_t] for c in self.full]
        for rung in self.rungs:
            pairs = [(c[rung], v) for c, v in zip(self.full, last, strict=True) if rung in c]
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            self.corr[rung] = rho
            low = rho is not None and rho < self.min_rank_corr
            if low and len(self.full) >= self.check_trials and rung not in self.off:
                self.off[rung] = (
                    f"asha: the rung at epoch {rung} stops no more trials: its ranking predicted the last "
                    f"epoch's with Spearman {rho:+.2f} over {len(pairs)} trials that ran in full "
                    f"(sweep.asha.min_rank_corr = {self.min_rank_corr:g})"
                )
                print(self.off[rung], file=sys.stderr)
        if self.folder is not None:
            self.folder.storage.write_bytes(self.folder.storage.join(CHECK_FILE), json.dumps(self.report()).encode())

    def report(self) -> dict:
        return {
            "min_rank_corr": self.min_rank_corr,
            "trials_in_full": len(self.full),
            "rank_corr": {str(r): c for r, c in self.corr.items()},
            "rungs_off": {str(r): why for r, why in self.off.items()},
        }


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
