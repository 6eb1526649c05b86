"""The cheap checks of a sweep, cheapest first, each a one-line `ConfigError` naming the key:
the name, the space's shape, the metrics its trials report, the completion rules, then every
value the space can draw validated as a config. Nothing here builds a model, reads the data or
touches a service: `prepare.prepare_sweep` runs these before its expensive steps."""

from __future__ import annotations

import copy

from pydantic import ValidationError

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.layout import check_name
from deeplab_sweep.search.overrides import set_dotted
from deeplab_sweep.search.space import optuna_params

# A trial's resources are reserved before its values are drawn (its actor, or its worker
# group's placement group), and its thread count stays with the reused actor (and its cached
# latency): none of these can vary from trial to trial.
RESOURCE_KEYS = (
    "train.num_workers",
    "train.cpus_per_worker",
    "train.use_gpu",
    "train.resources_per_worker",
    "train.torch_threads",
)


def check_sweep(job: JobConfig) -> None:
    """Everything a sweep needs beyond a valid job, in the order of their cost."""
    if job.sweep.name is not None:
        check_name(job.sweep.name)
    check_space_shape(job)
    s = job.sweep
    for metric, _ in s.objective_list:
        check_reported(job, metric, "sweep.metric" if s.objectives is None else f"sweep.objectives.{metric}")
    for c in s.constraint_list():
        check_reported(job, c.metric, f"sweep.constraints.{c.metric}")
    fewest = job.epoch_bounds()[0]
    if s.asha.enabled and fewest < s.asha.grace_period:
        raise ConfigError(
            f"sweep.asha.grace_period = {s.asha.grace_period} is more than train.epochs = {fewest}: "
            "lower the grace period, raise train.epochs, or set sweep.asha.enabled=false"
        )
    if s.asha.enabled:
        check_rungs_evaluated(job)
    check_completion(job)
    check_space_values(job)
    for i, values in enumerate(s.start_with):
        optuna_params(job.space, values, f"sweep.start_with[{i}]")


def check_rungs_evaluated(job: JobConfig) -> None:
    """ASHA judges a trial at each rung by its result there: a rung must be an epoch the trials
    evaluate (a multiple of train.eval_every), or ASHA would judge at a later epoch than the
    rung's, and the self-check would have nothing to measure there."""
    from deeplab_sweep.search.early_stopping import rungs

    a, every = job.sweep.asha, job.train.eval_every
    at = rungs(job.epoch_bounds()[1], a.grace_period, a.reduction_factor, a.brackets)
    skipped = [r for r in at if r % every]
    if skipped:
        raise ConfigError(
            f"sweep.asha.grace_period = {a.grace_period}: ASHA judges trials at epochs {', '.join(map(str, at))}; "
            f"train.eval_every = {every} evaluates no result at epoch {skipped[0]}: make the grace period a "
            f"multiple of {every}, or evaluate more often"
        )


def check_space_shape(job: JobConfig) -> None:
    """A space to search, keyed by config keys a trial may vary, in a form the search can use."""
    from deeplab_sweep.search.space import grid_param_space

    if not job.space:
        raise ConfigError("space: the sweep has no search space (add `space:` entries, e.g. train.lr)")
    for key, param in job.space.items():
        section, _, field = key.partition(".")
        model = JobConfig.model_fields.get(section)
        field = field.split(".", 1)[0]  # model.options.<name>: a key of your own model's options
        if (
            not field
            or model is None
            or section in ("sweep", "space", "cluster")
            or field not in model.annotation.model_fields
        ):
            raise ConfigError(f"space.{key}: not a config key (use section.key, e.g. train.lr)")
        if key.split(".")[:2] in [k.split(".") for k in RESOURCE_KEYS]:
            raise ConfigError(
                f"space.{key}: a trial's resources and threads are fixed before its values are drawn; "
                f"set {key} for the whole sweep ({key}=...), or run one sweep per value"
            )
        if param.depends_on is not None and param.depends_on not in job.space:
            raise ConfigError(f"space.{key}.depends_on: {param.depends_on!r} is not searched")
    if job.sweep.search == "grid":
        grid_param_space(job.space)


def check_reported(job: JobConfig, metric: str, key: str) -> None:
    from deeplab_sweep.trainable.engine import reported_metrics

    allowed = reported_metrics(job.data.spec.class_names)
    if metric not in allowed:
        shown = [m for m in allowed if not m.startswith("val/iou/")]
        raise ConfigError(
            f"{key} = {metric!r}: no trial reports it; allowed: {', '.join(shown)}, "
            f"or val/iou/<class> for a class of {job.data.name}"
        )


def check_completion(job: JobConfig) -> None:
    """A budget in the unit the trials hold; budgets and stop rules only where trials are drawn."""
    s = job.sweep
    b = s.budget
    used = "gpu_hours" if job.train.use_gpu else "cpu_hours"
    unused = "cpu_hours" if job.train.use_gpu else "gpu_hours"
    if getattr(b, unused) is not None:
        raise ConfigError(
            f"sweep.budget.{unused} = {getattr(b, unused)}: trials hold "
            f"{'GPUs' if job.train.use_gpu else 'no GPU (train.use_gpu=false)'}; budget them in sweep.budget.{used}"
        )
    if s.hand_over.at is not None:
        if b == type(b)():
            raise ConfigError(
                f"sweep.hand_over.at = {s.hand_over.at:g}: a share of the sweep's budget, and it has none; set "
                f"sweep.budget.epochs, {used} or wall_time_s"
            )
        if s.objectives:
            raise ConfigError(
                "sweep.hand_over: its model draws for one objective; drop sweep.objectives or hand_over.at"
            )
    if s.search == "grid":
        for key, value in (
            ("budget", b != type(b)()),
            ("stop_when", s.stop_when != type(s.stop_when)()),
            ("warm_start", bool(s.warm_start)),
            ("start_with", bool(s.start_with)),
            ("hand_over", s.hand_over.at is not None),
        ):
            if value:
                raise ConfigError(f"sweep.{key}: needs search: tpe or random (a grid runs every point)")


def check_space(job: JobConfig) -> None:
    """The space's shape, and every value it can draw."""
    check_space_shape(job)
    check_space_values(job)


def check_space_values(job: JobConfig) -> None:
    """Every value the space can draw validates as a config (one key at a time)."""
    from deeplab_sweep.search.compose import format_validation_error

    base = job.to_dict()
    for key, param in job.space.items():
        for value in param.candidates():
            trial = copy.deepcopy(base)
            set_dotted(trial, key, value)
            try:
                JobConfig.model_validate(trial)
            except ValidationError as err:
                raise ConfigError(f"space.{key}: value {value!r} is invalid: {format_validation_error(err)}") from None
