"""Optuna behind Ray Tune's `Searcher` interface, through Optuna's public ask/tell and storage
APIs only.

Ray's own OptunaSearch keeps its study private, reports intermediate values by Tune's
iteration counter, and tells a trial that ASHA stopped as COMPLETE. Worse, Ray never passes a
trial's stopping result to `on_trial_result`, so a stopped trial's last value would not be
reported at all. Here:

- intermediate values are reported by epoch (a replayed epoch after a resume is not counted
  twice);
- a trial that ends before its last epoch without an error gets its last value reported at
  its epoch, then is told PRUNED: TPE ranks it by what it reached, and knows it was stopped;
- the study lives in Optuna's RDB storage (one study per sweep, named after it), so it
  survives the driver, `optuna-dashboard` opens it, and a resumed sweep goes on in it;
- with several objectives it is told each trial's values (no intermediate values: Optuna
  prunes by one); constraints are set on the trial (`set_constraint`), where its samplers
  read them;
- its `Completion` decides when no new trial starts (budget, wall time, no improvement).
"""

from __future__ import annotations

import pickle

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from deeplab_sweep.search import tracking
from deeplab_sweep.search.completion import Completion
from deeplab_sweep.search.objectives import Constraint, finite
from deeplab_sweep.search.overrides import trial_epochs


class OptunaSearcher(Searcher):
    def __init__(
        self,
        space,
        objectives: list[tuple[str, str]],
        constraints: list[Constraint],
        sampler: optuna.samplers.BaseSampler,
        storage_url: str,
        study_name: str,
        max_epochs: int,
        completion: Completion,
    ):
        # Tune's own view (ASHA, its progress) is the first objective.
        super().__init__(metric=objectives[0][0], mode=objectives[0][1])
        self.space, self.sampler, self.storage_url, self.study_name = space, sampler, storage_url, study_name
        self.objectives, self.constraints, self.completion = objectives, constraints, completion
        self.max_epochs = max_epochs
        self.numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.configs: dict[str, dict] = {}  # what was suggested (a searched train.epochs is in it)
        self.reported: dict[str, int] = {}  # the last epoch reported per trial
        self.told: set[str] = set()
        self._study: optuna.Study | None = None
        self._storage: optuna.storages.BaseStorage | None = None

    # -- the study, in Optuna's storage -----------------------------------------------------------

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        if self._storage is None:
            self._storage = optuna.storages.get_storage(self.storage_url)
        return self._storage

    def study_exists(self) -> bool:
        return self.study_name in optuna.get_all_study_names(self.storage)

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = optuna.create_study(
                storage=self.storage,
                study_name=self.study_name,
                sampler=self.sampler,
                directions=["maximize" if mode == "max" else "minimize" for _, mode in self.objectives],
                load_if_exists=True,
            )
        return self._study

    # -- Tune's calls ---------------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | str:
        if self.completion.check() is not None:
            return Searcher.FINISHED
        trial = self.study.ask()
        self.space(trial)
        self.numbers[trial_id] = trial.number
        self.configs[trial_id] = dict(trial.params)
        return dict(trial.params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.completion.on_result(trial_id, result)
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.numbers or trial_id in self.told:
            return
        self.told.add(trial_id)
        number = self.numbers[trial_id]
        if error or not result:
            self.study.tell(number, state=TrialState.FAIL)
            return
        # The stopping result never reached on_trial_result (Ray skips it for stopped trials).
        self.completion.on_result(trial_id, result)
        self._report(trial_id, result)
        epochs = trial_epochs(self.configs.get(trial_id, {}), self.max_epochs)
        pruned = tracking.end_status(None, result.get("epoch") or 0, epochs) == tracking.PRUNED
        values = [result.get(m) for m, _ in self.objectives]
        if self.constraints:  # Optuna's samplers read them from the trial (<= 0: met)
            trial = optuna.Trial(self.study, self._storage_id(trial_id))
            for c in self.constraints:
                trial.set_constraint(str(c), c.violation(result.get(c.metric)))
        if pruned:
            self.study.tell(number, state=TrialState.PRUNED)
        elif all(finite(v) for v in values):
            self.study.tell(number, values if len(values) > 1 else values[0])
        else:
            self.study.tell(number, state=TrialState.FAIL)
            return
        self.completion.on_finished({m: result.get(m) for m in self.completion_metrics}, on_front_possible=not pruned)

    @property
    def completion_metrics(self) -> list[str]:
        return [m for m, _ in self.objectives] + [c.metric for c in self.constraints]

    def _storage_id(self, trial_id: str) -> int:
        # Through the storage API: a trial resumed by a later driver has no optuna.Trial object.
        study_id = self.storage.get_study_id_from_name(self.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, self.numbers[trial_id])

    def _report(self, trial_id: str, result: dict) -> None:
        """The first objective by epoch, when it is the only one (Optuna prunes by one value)."""
        value, epoch = result.get(self.metric), int(result.get("epoch") or 0)
        if len(self.objectives) > 1 or trial_id not in self.numbers or not finite(value):
            return
        if epoch <= self.reported.get(trial_id, 0):
            return
        self.storage.set_trial_intermediate_value(self._storage_id(trial_id), epoch, float(value))
        self.reported[trial_id] = epoch

    # -- Tune saves the searcher with the experiment, and restores it on resume -------------------

    _STATE = (
        "space",
        "sampler",
        "storage_url",
        "study_name",
        "max_epochs",
        "objectives",
        "constraints",
        "completion",
        "numbers",
        "configs",
        "reported",
        "told",
        "_metric",
        "_mode",
    )

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in self._STATE}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._study = self._storage = None

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
        self.close_orphans()

    def close_orphans(self) -> int:
        """Trials asked of Optuna whose Ray trial the saved state does not know (the driver
        died between the two): nobody will ever tell them; they end as FAIL."""
        known = set(self.numbers.values())
        orphans = [
            t.number
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in known
        ]
        for number in orphans:
            self.study.tell(number, state=TrialState.FAIL)
        return len(orphans)
