"""The schema of a job: one run's sections (`deeplab_sweep.trainable.run_config`) plus the
sweep, its search space and the cluster. Composed from YAML by `search.compose`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from deeplab_sweep.trainable.run_config import (
    DEFAULT_METRIC,
    DataConfig,
    MlflowConfig,
    ModelConfig,
    RunConfig,
    StorageConfig,
    Strict,
    TrainConfig,
)


class SearchParam(Strict):
    """One dimension of the search space, keyed by its dotted config path."""

    type: Literal["loguniform", "uniform", "choice", "randint", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    # Conditional choice: the values depend on another (already sampled) key's value,
    # e.g. data.batch_size per model.backbone.
    depends_on: str | None = None
    cases: dict[str, list[Any]] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchParam:
        if self.type in ("loguniform", "uniform", "randint"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"{self.type} needs low < high (got low={self.low}, high={self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        elif self.depends_on is not None:
            if not self.cases:
                raise ValueError("depends_on needs `cases: {value: [choices]}`")
        elif not self.values:
            raise ValueError(f"{self.type} needs a non-empty `values` list")
        return self

    def candidates(self) -> list[Any]:
        """Values that represent what this parameter can take: every listed choice (all cases
        of a conditional one), the bounds of a range, both ends of a randint."""
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return self.values or [v for vs in (self.cases or {}).values() for v in vs] or [self.low, self.high]


class AshaConfig(Strict):
    enabled: bool = True
    grace_period: int = Field(1, strict=True, ge=1)
    reduction_factor: int = Field(2, strict=True, ge=2)
    # ASHA's brackets (asynchronous Hyperband): bracket k first stops trials at grace_period x
    # reduction_factor^k; with enough of them the last never stops a trial early.
    brackets: int = Field(1, strict=True, ge=1)
    # The self-check: the first `check_trials` trials run in full whatever ASHA decides (an
    # unselected sample), and measure how well each rung's ranking predicts the last epoch's
    # (Spearman); once they have, a rung whose correlation is below `min_rank_corr` at
    # `check_confidence` (the upper bound of a one-sided interval) stops no more trials. A rung
    # that does rank that well is turned off with a chance of at most 1 - check_confidence.
    # None: no check, no trial run in full on purpose.
    min_rank_corr: float | None = Field(None, ge=-1, le=1)
    check_trials: int = Field(8, strict=True, ge=4)
    check_confidence: float = Field(0.9, gt=0.5, lt=1)


class TpeConfig(Strict):
    """Optuna's TPESampler settings (`search: tpe`)."""

    # Random trials before TPE models the results; None: min(4, num_samples).
    startup_trials: int | None = Field(None, strict=True, ge=1)
    # One joint density over all parameters (grouped by the conditional space's branches)
    # instead of one per parameter.
    multivariate: bool = False
    # Running trials count as bad results, so trials side by side spread out.
    constant_liar: bool = False
    # With sweep.learn_from_rungs: the share of trials drawn at random instead (BOHB's 1/3).
    random_share: float = Field(0.0, ge=0, le=1)


class HandOverConfig(Strict):
    """The sweep's search with ASHA first (cheap trials over the whole space), then a model's
    trials in full (a Gaussian process exploiting what they found), at equal compute."""

    # The share of sweep.budget spent after which every new trial is drawn by `search`'s model
    # from the trials so far (scored at ASHA's rungs with sweep.learn_from_rungs) and runs in
    # full: ASHA stops none of them. None: no hand-over.
    at: float | None = Field(None, gt=0, lt=1)
    search: Literal["gp", "tpe"] = "gp"


class BudgetConfig(Strict):
    """No new trial starts once one is spent; running trials finish."""

    # Resources held x wall time, over finished and running trials (GPUs when train.use_gpu).
    gpu_hours: float | None = Field(None, gt=0)
    cpu_hours: float | None = Field(None, gt=0)
    # Epochs trained, over finished and running trials (an epoch replayed after a restart
    # counts once): equal compute for searches that stop trials early and ones that do not.
    epochs: int | None = Field(None, strict=True, ge=1)
    # Wall time of the sweep's drivers (a resumed sweep counts on from where it stopped).
    wall_time_s: float | None = Field(None, gt=0)


class StopWhenConfig(Strict):
    # This many trials in a row end without improving the best (with several objectives:
    # without joining the Pareto front).
    no_improvement_trials: int | None = Field(None, strict=True, ge=1)


class SweepConfig(Strict):
    # tpe (Optuna's TPESampler), gp (its GPSampler: a Gaussian process), random, or grid.
    search: Literal["tpe", "gp", "random", "grid"] = "tpe"
    # Trials to run; with `grid`, how many times the whole grid is repeated.
    num_samples: int = Field(8, strict=True, ge=1)
    metric: str = DEFAULT_METRIC
    mode: Literal["max", "min"] = "max"
    # Several objectives, {metric: max|min, ...}: Optuna searches for their Pareto front. The
    # first is `metric` (what ASHA stops by and what picks a trial's best checkpoint).
    objectives: dict[str, Literal["max", "min"]] | None = None
    # {metric: "<= 20000", ...}: a trial that breaks one is never best nor on the front.
    constraints: dict[str, str] = {}
    budget: BudgetConfig = BudgetConfig()
    stop_when: StopWhenConfig = StopWhenConfig()
    # Earlier sweeps (by name, in this MLflow experiment) whose trials seed the searcher.
    warm_start: list[str] = []
    # Configurations tried first, in order, before the sampler draws ({config key: value}, keys
    # of the space; a key left out is drawn), e.g. the published recipe.
    start_with: list[dict[str, Any]] = []
    seed: int = Field(0, strict=True, ge=0)
    asha: AshaConfig = AshaConfig()
    # The searcher's model (tpe, gp) learns from the results at ASHA's rungs as well as from
    # trials run in full: each trial is drawn from the trials scored at the latest rung (or the
    # last epoch) that enough of them reached, as BOHB does; so does the hand-over's model. False:
    # Optuna's own way (trials ASHA stopped are PRUNED, ranked below every finished one). One
    # objective only.
    learn_from_rungs: bool = False
    hand_over: HandOverConfig = HandOverConfig()
    tpe: TpeConfig = TpeConfig()
    # None: as many trials at once as the cluster's resources fit.
    max_concurrent: int | None = Field(None, strict=True, ge=1)
    # The console: a line per trial event (`events`), or one status line at most every
    # `status_every_s` (`status`: trials running / done / stopped early / failed, best so far,
    # epochs against the budget) with every event in the sweep's events.log; `auto`: events
    # when 4 trials or fewer run at once.
    progress: Literal["auto", "events", "status"] = "auto"
    status_every_s: float = Field(10.0, gt=0)
    name: str | None = None
    # Optuna's RDB storage, one study per sweep (optuna-dashboard opens it). None: optuna.db
    # beside a local MLflow store, else runs/optuna.db.
    optuna_storage: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _first_objective_is_the_metric(cls, data):
        objectives = data.get("objectives") if isinstance(data, dict) else None
        if not objectives or not isinstance(objectives, dict):
            return data
        metric, mode = next(iter(objectives.items()))
        if data.get("metric", metric) != metric or data.get("mode", mode) != mode:
            raise ValueError(
                f"metric/mode ({data.get('metric', metric)}, {data.get('mode', mode)}) differ from the first "
                f"of objectives ({metric}: {mode}): drop them, or list that objective first"
            )
        # One objective is a single-objective sweep: no front, ASHA and Optuna on that metric.
        return {**data, "metric": metric, "mode": mode, "objectives": objectives if len(objectives) > 1 else None}

    @property
    def objective_list(self) -> list[tuple[str, str]]:
        return list(self.objectives.items()) if self.objectives else [(self.metric, self.mode)]

    @property
    def also_best(self) -> tuple[str, ...]:
        """Metrics a trial's run records at its best checkpoint besides `metric`: the other
        objectives and the constrained ones (what the Pareto front is made of)."""
        others = [m for m, _ in self.objective_list[1:]] + list(self.constraints)
        return tuple(dict.fromkeys(m for m in others if m != self.metric))

    def constraint_list(self) -> list:
        from deeplab_sweep.search.objectives import parse_constraint

        return [parse_constraint(text, f"sweep.constraints.{m}", m) for m, text in self.constraints.items()]


class ClusterConfig(Strict):
    # None: start a local Ray; "auto" or "host:port": join that cluster (RAY_ADDRESS too).
    address: str | None = None
    num_cpus: int | None = Field(None, strict=True, ge=1)
    num_gpus: int | None = Field(None, strict=True, ge=0)
    object_store_memory: int | None = Field(None, strict=True, ge=78_643_200)
    # The cluster's autoscaler config (a Ray cluster launcher YAML): its node types and maxima
    # decide how many trials run at once. None: ~/ray_bootstrap_config.yaml when joining a
    # cluster from its head (where `ray up` leaves it), else the nodes that are up.
    autoscaler_config: str | None = None


class JobConfig(Strict):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()
    storage: StorageConfig = StorageConfig()
    sweep: SweepConfig = SweepConfig()
    space: dict[str, SearchParam] = {}
    cluster: ClusterConfig = ClusterConfig()

    @property
    def run(self) -> RunConfig:
        return RunConfig(data=self.data, model=self.model, train=self.train, mlflow=self.mlflow, storage=self.storage)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=False)

    def epoch_bounds(self) -> tuple[int, int]:
        """The fewest and most epochs a trial can get (train.epochs may be searched)."""
        searched = self.space.get("train.epochs")
        values = searched.candidates() if searched is not None else [self.train.epochs]
        return int(min(values)), int(max(values))
