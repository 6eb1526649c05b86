"""Where a sweep's trials go, worked out before any trial starts.

A trial is a driver (Tune's function trainable; Ray Train's controller runs beside it) and
`train.num_workers` Ray Train workers. The driver reserves memory, never CPU or GPU, on the
node that runs the sweep: a slice of a CPU on an exact-fit node (8 CPUs, 8 CPUs per worker)
would leave that node unable to take a worker. How many trials run at once follows from
packing the workers onto the cluster's nodes: the node types and maxima of its autoscaler when
those are known (a launcher YAML, or ~/ray_bootstrap_config.yaml on a `ray up` head), else the
nodes that are up now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deeplab_sweep.errors import ConfigError
from deeplab_sweep.trainable.ray_train import runs_in_process, worker_resources

# What a trial's driver reserves: the Tune actor and the Train controller beside it hold
# torch and Ray (~1.5 GiB resident, measured); memory is what they use, so it is what they ask.
TRIAL_DRIVER_MEMORY = 1024**3
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` leaves it on the head


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    now: int  # nodes of this type up now
    most: int  # nodes of this type the autoscaler may run


@dataclass
class Plan:
    worker: dict[str, float]
    workers: int
    node_types: list[NodeType]
    one_trial: dict[str, int] = field(default_factory=dict)  # node type -> workers of one trial on it
    at_once_now: int = 0
    at_once_most: int = 0
    source: str = ""


def _fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def pack(nodes: list[tuple[str, dict[str, float]]], worker: dict[str, float], workers: int) -> tuple[int, dict]:
    """Trials that fit at once on these nodes, each trial's workers packed onto as few nodes
    as possible (Ray Train's PACK placement); and where the first trial's workers go."""
    free = [dict(res) for _, res in nodes]
    trials, first = 0, {}
    while True:
        placed = []
        for _ in range(workers):
            # Prefer a node this trial already uses, then the fullest one that still fits.
            candidates = [i for i, f in enumerate(free) if _fits(f, worker)]
            if not candidates:
                break
            i = max(candidates, key=lambda j: (placed.count(j), -sum(free[j].values())))
            for k, v in worker.items():
                free[i][k] -= v
            placed.append(i)
        if len(placed) < workers:
            return trials, first
        if trials == 0:
            for i in placed:
                first[nodes[i][0]] = first.get(nodes[i][0], 0) + 1
        trials += 1


def autoscaler_config(cluster) -> Path | None:
    """The autoscaler config to plan on: cluster.autoscaler_config, else the one `ray up` left
    on this machine when it is the head of the cluster being joined."""
    if cluster.autoscaler_config:
        return Path(cluster.autoscaler_config).expanduser()
    joining = cluster.address or os.environ.get("RAY_ADDRESS")
    found = BOOTSTRAP_CONFIG.expanduser()
    return found if joining and found.is_file() else None


def pending_placement_groups(bundle: dict[str, float]) -> int:
    """Placement groups Ray cannot place yet whose every bundle is `bundle` (a trial's worker
    group waiting for nodes: Ray Train reserves one bundle per worker)."""
    import ray

    want = {k: float(v) for k, v in bundle.items()}
    groups = ray.util.placement_group_table().values()
    return sum(
        1
        for g in groups
        if g.get("state") == "PENDING"
        and g.get("bundles")
        and all({k: float(v) for k, v in b.items()} == want for b in g["bundles"].values())
    )


def node_types_from_config(path: Path) -> list[NodeType]:
    """Node types of a Ray cluster launcher / autoscaler YAML (now: min_workers, the head once)."""
    try:
        cfg = yaml.safe_load(path.expanduser().read_text())
        types = cfg["available_node_types"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a Ray cluster config with available_node_types ({e})") from None
    head, cap = cfg.get("head_node_type"), cfg.get("max_workers")
    out = []
    for name, t in types.items():
        res = {k: float(v) for k, v in (t.get("resources") or {}).items() if isinstance(v, (int, float))}
        if name == head:
            out.append(NodeType(name, res, 1, 1))
        else:
            most = int(t.get("max_workers", cap if cap is not None else 0))
            out.append(NodeType(name, res, int(t.get("min_workers", 0)), min(most, cap) if cap is not None else most))
    return out


def node_types_now() -> list[NodeType]:
    """The nodes up now, one type per distinct resource shape (Ray must be connected)."""
    import ray

    shapes: dict[tuple, int] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            res = {k: float(v) for k, v in node["Resources"].items() if k in ("CPU", "GPU") or not _ray_internal(k)}
            key = tuple(sorted(res.items()))
            shapes[key] = shapes.get(key, 0) + 1
    return [NodeType(shape_name(dict(k)), dict(k), n, n) for k, n in shapes.items()]


def _ray_internal(resource: str) -> bool:
    return resource in ("memory", "object_store_memory") or resource.startswith(("node:", "accelerator_type:"))


def shape_name(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def make_plan(train, node_types: list[NodeType], source: str) -> Plan:
    worker, workers = worker_resources(train), train.num_workers
    plan = Plan(worker, workers, node_types, source=source)
    expand = lambda attr: [(t.name, t.resources) for t in node_types for _ in range(getattr(t, attr))]  # noqa: E731
    plan.at_once_now, _ = pack(expand("now"), worker, workers)
    plan.at_once_most, plan.one_trial = pack(expand("most"), worker, workers)
    return plan


def why_not(plan: Plan, train) -> str:
    """One line naming the key to change when no trial fits even the largest cluster."""
    if plan.worker.get("GPU") and not any(t.resources.get("GPU") for t in plan.node_types):
        return f"train.use_gpu = true, but no node type of the cluster ({plan.source}) has a GPU"
    for name in train.resources_per_worker:
        if not any(t.resources.get(name) for t in plan.node_types):
            return f"train.resources_per_worker.{name}: no node type of the cluster ({plan.source}) has {name!r}"
    biggest = max(plan.node_types, key=lambda t: t.resources.get("CPU", 0.0), default=None)
    cpus = biggest.resources.get("CPU", 0.0) if biggest else 0.0
    if train.cpus_per_worker > cpus:
        return (
            f"train.cpus_per_worker = {train.cpus_per_worker:g} does not fit any node of the cluster "
            f"({plan.source}): the largest, {biggest.name if biggest else '-'}, has {cpus:g} CPUs"
        )
    return (
        f"train.num_workers = {train.num_workers} x {shape_name(plan.worker)} does not fit the cluster "
        f"at its largest ({plan.source}); lower train.num_workers or train.cpus_per_worker"
    )


def describe(plan: Plan) -> list[str]:
    if runs_in_process(plan.workers):
        lines = [f"per trial: 1 worker x {shape_name(plan.worker)}, training in the trial's own actor"]
    else:
        lines = [
            f"per trial: {plan.workers} worker(s) x {shape_name(plan.worker)} + a driver of "
            f"{TRIAL_DRIVER_MEMORY / 2**30:g} GiB memory, no CPU or GPU"
        ]
    lines.append(f"node types ({plan.source}):")
    for t in plan.node_types:
        lines.append(f"  {t.name:<18} {shape_name(t.resources):<28} {t.now} now, up to {t.most}")
    if plan.one_trial:
        where = ", ".join(f"{n} worker(s) on {name}" for name, n in plan.one_trial.items())
        lines.append(f"one trial's workers: {where}")
    lines.append(f"trials at once: {plan.at_once_now} at the current size, {plan.at_once_most} at the largest")
    return lines


def _space_variants(job) -> list:
    """The model configs and crops a sweep's space can give (the keys that change the FLOPs)."""
    import itertools

    from deeplab_sweep.search.compose import validate
    from deeplab_sweep.search.overrides import apply_overrides

    keys = [k for k in job.space if k.startswith("model.") or k == "data.crop_size"]
    keys = [k for k in keys if job.space[k].type not in ("loguniform", "uniform")]
    choices = [job.space[k].candidates() for k in keys]
    out = []
    for values in itertools.product(*choices):
        try:
            out.append(validate(apply_overrides(job.to_dict(), dict(zip(keys, values, strict=True)))))
        except ConfigError:
            continue  # a combination that conditional choices never produce
    return out or [job]


def cost_lines(job) -> list[str]:
    """Expected GPU-hours from the config: FLOPs per image (counted), images per epoch (the
    dataset's real size), epochs (what the sweep's scheduler trains where early epochs rank trials
    as the last does), at the training rate measured on an H100. An estimate, and said to be one."""
    from deeplab_sweep.search.early_stopping import expected_epochs
    from deeplab_sweep.trainable.cost import H100_TRAIN_FLOPS_PER_S, flops_per_image

    if not job.train.use_gpu:
        return ["expected cost: none estimated (a CPU sweep; the estimate is for GPUs)"]
    images = min(job.data.spec.train_images, job.data.max_train_images or job.data.spec.train_images)
    counted = {}  # the base config is usually one of the variants: each counted once

    def train_flops(j) -> float:
        key = (j.model.model_dump_json(), j.data.num_classes, j.data.crop_size)
        if key not in counted:
            counted[key] = flops_per_image(j.model, j.data.num_classes, j.data.crop_size, train=True)
        return counted[key]

    variants = _space_variants(job)
    mean_flops = sum(map(train_flops, variants)) / len(variants)
    full = job.train.epochs * images * train_flops(job)
    s = job.sweep
    epochs = expected_epochs(job)
    how = " (ASHA, where early epochs rank trials as the last does"
    how += f"; the self-check's first {s.asha.check_trials} in full)" if s.asha.min_rank_corr is not None else ")"
    trials = f"{s.num_samples} trials x {epochs / s.num_samples:.1f} epochs each{how if s.asha.enabled else ''}"
    if s.budget.epochs is not None and s.budget.epochs < epochs:  # no trial starts once it is spent
        epochs, trials = s.budget.epochs, f"its budget of {s.budget.epochs} epochs (sweep.budget.epochs)"
    sweep_hours = epochs * images * mean_flops / H100_TRAIN_FLOPS_PER_S / 3600
    if s.budget.gpu_hours is not None and s.budget.gpu_hours < sweep_hours:
        sweep_hours, trials = s.budget.gpu_hours, "its budget (sweep.budget.gpu_hours)"
    return [
        "expected cost (an ESTIMATE from the config, not a measurement: H100 GPU-hours at the "
        f"{H100_TRAIN_FLOPS_PER_S / 1e12:.0f} TFLOP/s",
        "  measured for DeepLabv3+ training in bf16 at 16 images per GPU; evaluation not counted):",
        f"  one full trial of the base config: {job.train.epochs} epochs x {images} images x "
        f"{full / job.train.epochs / images / 1e9:.0f} GFLOP = {full / H100_TRAIN_FLOPS_PER_S / 3600:.1f} GPU-hours",
        f"  the sweep: {trials} x {mean_flops / 1e9:.0f} GFLOP per image on average over "
        f"{len(variants)} variant(s) of the space = {sweep_hours:.1f} GPU-hours",
    ]


# -- the plan of a sweep: refused before Ray when it cannot fit, the trials at once, `--plan` --------


def plan_before_ray(job) -> Plan | None:
    """The plan on the autoscaler's node types, when its config is known: a sweep that cannot
    fit even the largest cluster is refused here, naming the key to change."""
    path = autoscaler_config(job.cluster)
    if path is None:
        return None
    plan = make_plan(job.train, node_types_from_config(path), str(path))
    if plan.at_once_most < 1:
        raise ConfigError(why_not(plan, job.train))
    return plan


def trials_at_once(job, plan: Plan | None) -> int:
    """sweep.max_concurrent, else what the cluster can hold at its largest (the autoscaler's
    maximum where known, else the nodes up now: Ray must be connected). Never refused because
    nodes are not up yet: trials then wait for them."""
    import sys

    if job.sweep.max_concurrent:
        return job.sweep.max_concurrent
    if plan is None:
        plan = make_plan(job.train, node_types_now(), "the nodes up now")
    if plan.at_once_most < 1:
        print(f"warning: {why_not(plan, job.train)}; one trial at a time, waiting for nodes", file=sys.stderr)
    return max(1, plan.at_once_most)


def plan_text(job, address: str | None = None) -> str:
    """`deeplab sweep --plan`: per-trial resources, placement, trials at once now and at the
    largest, expected GPU-hours; no trial starts. Raises ConfigError when it cannot fit."""
    from deeplab_sweep.search.checks import check_sweep

    check_sweep(job)
    plan = plan_before_ray(job)
    if plan is None:
        plan = _plan_on_nodes_up(job, address)
        if plan.at_once_most < 1:
            raise ConfigError(why_not(plan, job.train))
    return "\n".join([*describe(plan), *cost_lines(job)])


def _plan_on_nodes_up(job, address: str | None) -> Plan:
    """Without an autoscaler config: the cluster being joined as it is now, or this machine."""
    from deeplab_sweep.search.cluster import RaySession, cluster_address

    joined = cluster_address(job.cluster, address)
    if joined:
        with RaySession(job.cluster, joined):
            return make_plan(job.train, node_types_now(), "the nodes up now")
    import torch

    res = {
        "CPU": float(job.cluster.num_cpus or os.cpu_count() or 1),
        "GPU": float(job.cluster.num_gpus if job.cluster.num_gpus is not None else torch.cuda.device_count()),
    }
    node = NodeType("this machine", {k: v for k, v in res.items() if v}, 1, 1)
    return make_plan(job.train, [node], "a local Ray on this machine")
