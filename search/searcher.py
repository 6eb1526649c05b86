"""Optuna behind Ray Tune's `Searcher` interface, through Optuna's public ask/tell and storage
APIs only; and `build_searcher`, which makes it from a job.

Ray's own OptunaSearch keeps its study private, reports intermediate values by Tune's
iteration counter, and tells a trial that ASHA stopped as COMPLETE. Worse, Ray never passes a
trial's stopping result to `on_trial_result`, so a stopped trial's last value would not be
reported at all. Here:

- intermediate values are reported by epoch (a replayed epoch after a resume is not counted
  twice);
- a trial is judged by its best epoch (by the first objective), the epoch of its best
  checkpoint: what MLflow's `best/<metric>`, the summary, the front and `deeplab best` hold;
  Optuna is told that epoch's objectives and constraints;
- a trial that ends before its last epoch without an error is told PRUNED (its intermediate
  values say how far it got): TPE knows it was stopped;
- the study lives in Optuna's RDB storage (one study per sweep, named after it), so it
  survives the driver, `optuna-dashboard` opens it, and a resumed sweep goes on in it; why the
  sweep stopped is kept in it too (`stop_reason`), whichever driver decided it;
- with several objectives it is told each trial's values (no intermediate values: Optuna
  prunes by one); constraints are set on the trial (`set_constraint`), where its samplers
  read them;
- its `Completion` decides when no new trial starts (budgets, wall time, no improvement), told
  every attempt's start and end by `SearcherClock`.
"""

from __future__ import annotations

import functools
import pickle
import sys
import warnings

import optuna
import sqlalchemy
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search import Searcher

from deeplab_sweep.search import tracking
from deeplab_sweep.search.completion import Completion
from deeplab_sweep.search.early_stopping import rungs
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.multifidelity import HandOver, ModelDraw
from deeplab_sweep.search.objectives import Constraint, cost_metric, finite, units_held
from deeplab_sweep.search.overrides import trial_epochs
from deeplab_sweep.search.space import OptunaSpace, choice_grid, grid_param_space, optuna_params
from deeplab_sweep.trainable.credentials import database_url, remember
from deeplab_sweep.trainable.run_folder import better

STOP_REASON = "stop_reason"  # a study's user attribute: which criterion ended the sweep
IN_FULL = "in_full"  # a trial's user attribute: drawn after the hand-over, ASHA stopped it nowhere


class OptunaSearcher(Searcher):
    def __init__(
        self,
        *,
        space: OptunaSpace,
        objectives: list[tuple[str, str]],
        constraints: list[Constraint],
        sampler: optuna.samplers.BaseSampler,
        storage_url: str,
        study_name: str,
        max_epochs: int,
        completion: Completion,
        start_with: list[dict] = (),
        model: ModelDraw | None = None,
        hand_over: HandOver | None = None,
    ):
        """`start_with`: Optuna params of configurations asked first, in order (a new study only);
        `model`: draws each trial's params from the results at ASHA's rungs too (BOHB's way), in
        place of `sampler`, which then only records them; `hand_over`: the model that draws
        the trials after its share of the budget, which run in full (`runs_in_full`)."""
        # Tune's own view (ASHA, its progress) is the first objective.
        super().__init__(metric=objectives[0][0], mode=objectives[0][1])
        self.space, self.sampler, self.study_name = space, sampler, study_name
        self.storage_url = remember(storage_url)  # what is pickled and printed has no password
        self.objectives, self.constraints, self.completion = objectives, constraints, completion
        self.max_epochs = max_epochs
        self.numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.configs: dict[str, dict] = {}  # what was suggested (a searched train.epochs is in it)
        self.reported: dict[str, int] = {}  # the last epoch reported per trial
        self.best: dict[str, dict] = {}  # per trial, its best epoch's report so far
        self.told: set[str] = set()
        self.start_with = list(start_with)  # enqueued into the study on the first suggestion, once
        self.model, self.hand_over = model, hand_over
        self.in_full: set[str] = set()  # trials drawn after the hand-over: ASHA stops none of them
        self._study: optuna.Study | None = None
        self._storage: optuna.storages.BaseStorage | None = None
        self._ids: dict[str, int] = {}  # Ray trial id -> the storage's trial id

    # -- the study, in Optuna's storage -----------------------------------------------------------

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        if self._storage is None:
            self._storage = study_storage(database_url(self.storage_url))
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

    def stop_reason(self) -> str | None:
        """Why the sweep stopped starting trials, as the searcher that decided it recorded."""
        return self.study.user_attrs.get(STOP_REASON)

    # -- Tune's calls ---------------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | str:
        reason = self.completion.check()
        if reason is not None:
            if self.stop_reason() != reason:
                self.study.set_user_attr(STOP_REASON, reason)
            return Searcher.FINISHED
        for params in self.start_with:
            self.study.enqueue_trial(params)
        self.start_with = []
        handed = self.hand_over is not None and self.completion.spent() >= self.hand_over.at
        model = self.hand_over.model if handed else self.model
        if model is not None and not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.enqueue_trial(model.params(self.study, self.space))
        trial = self.study.ask()
        self.space(trial)
        if handed:
            if not self.in_full:
                print(
                    f"search: {self.completion.spent():.0%} of sweep.budget spent: from now on each trial is "
                    f"drawn by the hand-over's model and runs in full (sweep.hand_over.at = {self.hand_over.at:g})",
                    file=sys.stderr,
                )
            self.in_full.add(trial_id)
            trial.set_user_attr(IN_FULL, True)
        self.numbers[trial_id] = trial.number
        self.configs[trial_id] = dict(trial.params)
        return dict(trial.params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.completion.on_result(trial_id, result)
        self._keep_best(trial_id, result)
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
        self.on_trial_result(trial_id, result)
        epochs = trial_epochs(self.configs.get(trial_id, {}), self.max_epochs)
        ran_in_full = tracking.end_status(None, result.get("epoch") or 0, epochs) == tracking.COMPLETED
        best = self.best.get(trial_id, {})
        values = [best.get(m) for m, _ in self.objectives]
        if self.constraints:  # Optuna's samplers read them from the trial (<= 0: met)
            trial = optuna.Trial(self.study, self._storage_id(trial_id))
            for c in self.constraints:
                trial.set_constraint(str(c), c.violation(best.get(c.metric)))
        if not ran_in_full:
            self.study.tell(number, state=TrialState.PRUNED)
        elif all(finite(v) for v in values):
            self.study.tell(number, values if len(values) > 1 else values[0])
        else:
            self.study.tell(number, state=TrialState.FAIL)
            return
        self.completion.on_finished({m: best.get(m) for m in self.completion_metrics}, ran_in_full=ran_in_full)

    def runs_in_full(self, trial_id: str) -> bool:
        """Whether ASHA must let the trial run to its last epoch (drawn after the hand-over)."""
        return trial_id in self.in_full

    @property
    def completion_metrics(self) -> list[str]:
        return [m for m, _ in self.objectives] + [c.metric for c in self.constraints]

    def _keep_best(self, trial_id: str, result: dict) -> None:
        """The trial's best epoch by the first objective (the earliest of equals, as its best
        checkpoint is chosen)."""
        kept = self.best.get(trial_id)
        if better(result.get(self.metric), kept[self.metric] if kept else None, self.mode):
            self.best[trial_id] = {m: result.get(m) for m in self.completion_metrics}

    def _storage_id(self, trial_id: str) -> int:
        # Through the storage API: a trial resumed by a later driver has no optuna.Trial object.
        # Looked up once per trial: each result would otherwise cost two more queries.
        if trial_id not in self._ids:
            study_id = self.storage.get_study_id_from_name(self.study_name)
            self._ids[trial_id] = self.storage.get_trial_id_from_study_id_trial_number(study_id, self.numbers[trial_id])
        return self._ids[trial_id]

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

    _LIVE = ("_study", "_storage", "_ids")  # connections and what they answered, made again where needed

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._LIVE}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._study = self._storage = None
        self._ids = {}

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


class SearcherClock(Callback):
    """Each trial attempt's start and end, told to the searcher's budget: a Searcher hears
    neither a restart nor an attempt that died before it reported. Holds the searcher itself
    (Tune pickles both into one tuner.pkl, and restores the searcher's state in place), so on
    resume it still tells the searcher Tune restored."""

    def __init__(self, searcher: OptunaSearcher):
        self.searcher = searcher

    def on_trial_start(self, iteration, trials, trial, **info):
        self.searcher.completion.cost.started(trial.trial_id)

    def _ended(self, iteration, trials, trial, **info):
        self.searcher.completion.cost.ended(trial.trial_id)

    on_trial_recover = on_trial_error = on_trial_complete = _ended


def study_storage(url: str | None) -> optuna.storages.BaseStorage:
    """Optuna's storage at `url`. A sqlite file is put in WAL mode, and each connection to it
    told `synchronous=NORMAL`: its commits, several per trial on Tune's loop, then go without
    an fsync each (38 % of the loop's time with 32 stand-in trials at once, driver_scale.py).
    What a killed driver committed stays; a power cut may lose the last commits, never the file.
    (WAL wants the file on a local disk, where the default optuna.db is.)"""
    if url is None or not url.startswith("sqlite"):  # None: in memory (a replay)
        return optuna.storages.get_storage(url)
    storage = optuna.storages.RDBStorage(url)
    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_without_fsync)
    storage.engine.dispose()  # the connections opened before the listener
    return optuna.storages.get_storage(storage)


def _sqlite_without_fsync(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_sampler(seed: int, *, search: str, startup: int, multivariate: bool, constant_liar: bool):
    """Optuna's sampler for `sweep.search` (tpe, gp or random), seeded."""
    with warnings.catch_warnings():  # chosen knowingly: not a warning for the user
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if search == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=startup,
                multivariate=multivariate,
                group=multivariate,  # the conditional space's branches get their own densities
                constant_liar=constant_liar,
            )
        if search == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)


def sampler_factory(job: JobConfig, search: str | None = None) -> functools.partial:
    """seed -> the sweep's sampler, or `search`'s (a partial: Tune pickles the searcher)."""
    s, t = job.sweep, job.sweep.tpe
    return functools.partial(
        make_sampler,
        search=search or s.search,
        startup=t.startup_trials or min(4, s.num_samples),
        multivariate=t.multivariate,
        constant_liar=t.constant_liar,
    )


def model_draw(job: JobConfig, search: str | None = None) -> ModelDraw | None:
    """How a trial is drawn, for one objective: from a model that learns from ASHA's rungs
    (`sweep.learn_from_rungs`), or, in a space of choices only, from the trials run in full
    (so that none is trained in full twice); else (None) by Optuna's own ask. `search`: the
    model's sampler in place of `sweep.search`'s (the hand-over's), always a model."""
    s = job.sweep
    grid = choice_grid(job.space)
    learns = s.learn_from_rungs and (search or s.search) != "random"  # a random draw learns nothing
    if s.objectives or not (learns or grid or search):
        return None
    max_t = job.epoch_bounds()[1]
    fidelities = (
        rungs(max_t, s.asha.grace_period, s.asha.reduction_factor, s.asha.brackets)
        if s.asha.enabled and s.learn_from_rungs
        else []
    )
    startup = s.tpe.startup_trials or min(4, s.num_samples)
    return ModelDraw(
        make_sampler=sampler_factory(job, search),
        fidelities=[*fidelities, max_t],
        min_points=max(startup, len(job.space) + 1),
        direction="maximize" if s.mode == "max" else "minimize",
        seed=s.seed,
        grid=grid,
        random_share=s.tpe.random_share,
    )


def completion(job: JobConfig) -> Completion:
    s = job.sweep
    return Completion(
        objectives=s.objective_list,
        constraints=s.constraint_list(),
        units_per_trial=units_held(job.train),
        cost_metric=cost_metric(job.train),
        budget_hours=s.budget.gpu_hours if job.train.use_gpu else s.budget.cpu_hours,
        budget_epochs=s.budget.epochs,
        wall_time_s=s.budget.wall_time_s,
        patience=s.stop_when.no_improvement_trials,
    )


def build_searcher(job: JobConfig, study_name: str) -> tuple[OptunaSearcher | None, dict]:
    """(search_alg or None, param_space) for the sweep's `search` setting; Optuna's study is
    `study_name` in `sweep.optuna_storage`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = job.sweep
    if s.search == "grid":
        return None, grid_param_space(job.space)
    model = model_draw(job)
    searcher = OptunaSearcher(
        space=OptunaSpace(job.space),
        objectives=s.objective_list,
        constraints=s.constraint_list(),
        # With a model, the study's own sampler draws nothing: every trial's params are given.
        sampler=sampler_factory(job)(s.seed) if model is None else optuna.samplers.RandomSampler(seed=s.seed),
        storage_url=s.optuna_storage,
        study_name=study_name,
        max_epochs=job.train.epochs,
        completion=completion(job),
        start_with=[optuna_params(job.space, v, f"sweep.start_with[{i}]") for i, v in enumerate(s.start_with)],
        model=model,
        hand_over=hand_over(job),
    )
    return searcher, {}


def hand_over(job: JobConfig) -> HandOver | None:
    """`sweep.hand_over`'s model and when it takes over (one objective: its model draws for one)."""
    h = job.sweep.hand_over
    return None if h.at is None or job.sweep.objectives else HandOver(at=h.at, model=model_draw(job, h.search))
