"""Everything checked or made ready before Ray starts, in one step per command, cheapest
first: a sweep's own checks (`checks.check_sweep`), its plan on the autoscaler's node types,
then paths made absolute (Ray workers run elsewhere), the MLflow and Optuna locations
resolved, the dataset checked or generated, every model the space can draw built once, the
storage probed and the ImageNet weights staged; last, its folder and Optuna study."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from deeplab_sweep.errors import ConfigError, StorageUnusable
from deeplab_sweep.search import tracking
from deeplab_sweep.search.internals import job_working_dir
from deeplab_sweep.search.job_config import JobConfig
from deeplab_sweep.search.layout import SweepFolder
from deeplab_sweep.trainable.credentials import credentials_to_env, redacted
from deeplab_sweep.trainable.run_config import RUNS_DIR, resolve_path
from deeplab_sweep.trainable.storage import Storage, is_uri


@dataclass(frozen=True)
class PreparedSweep:
    """A sweep ready to start: its job (absolute paths, data ready, weights staged), cluster, folder,
    searcher (None for a grid) and Tune's param space, and its plan where the autoscaler's
    node types are known."""

    job: JobConfig
    address: str | None  # the cluster to join, checked (cluster.cluster_address); None: a local Ray
    folder: SweepFolder
    searcher: object | None
    param_space: dict
    plan: object | None
    resume: bool
    fingerprint: str  # of the dataset: which data the trials see (warm start compares it)


def prepare_sweep(job: JobConfig, resume: bool = False, address: str | None = None) -> PreparedSweep:
    from deeplab_sweep.search.checks import check_sweep
    from deeplab_sweep.search.cluster import cluster_address
    from deeplab_sweep.search.placement import plan_before_ray
    from deeplab_sweep.search.searcher import build_searcher

    check_sweep(job)
    plan = plan_before_ray(job)
    address = cluster_address(job.cluster, address)  # an unreachable cluster is reported before any MLflow run
    job = prepare_job(job)
    name = job.sweep.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = SweepFolder.at(job.storage.path, name)
    if resume and not folder.has_tuner():
        raise ConfigError(f"sweep.name = {name!r}: nothing to resume at {folder.uri}")
    if resume:
        folder.check_trusted()
    if not resume and folder.exists():
        raise ConfigError(
            f"sweep.name = {name!r}: {folder.uri} exists; add --resume to continue it, or pick another name"
        )
    searcher, param_space = build_searcher(job, name)
    if searcher is not None and _study_exists(searcher) and not resume:
        raise ConfigError(
            f"sweep.name = {name!r}: {searcher.storage_url} already holds an Optuna study of "
            "that name; pick another name, or add --resume to continue that sweep"
        )
    return PreparedSweep(job, address, folder, searcher, param_space, plan, resume, dataset_fingerprint(job))


def dataset_fingerprint(job: JobConfig) -> str:
    """Cheap identity of the data: split sizes and the listed file names, hashed."""
    import hashlib

    h = hashlib.sha1()
    for split in ("train", "val"):
        ds = job.data.spec.build(job.data.root, split)
        h.update(f"{split}:{len(ds)}".encode())
        for img, mask in ds.samples:
            h.update(f"{img.name}|{mask.name}".encode())
    return h.hexdigest()[:16]


def _study_exists(searcher) -> bool:
    """Whether the sweep's study is there, the storage opened now: a missing database driver or
    a database that does not answer is one line, its password left out."""
    try:
        return searcher.study_exists()
    except Exception as e:  # noqa: BLE001 - a driver's ImportError, SQLAlchemy's OperationalError, ...
        detail = redacted(" ".join(str(e).split()))[:200]
        raise StorageUnusable(
            f"sweep.optuna_storage = {searcher.storage_url!r}: cannot be opened ({type(e).__name__}: {detail})"
        ) from None


def ensure_data(job: JobConfig) -> None:
    """The dataset root exists, or is generated now when `data.synthesize` asks for it."""
    root = Path(job.data.root)
    if not root.exists() and not job.data.synthesize:
        raise ConfigError(
            f"data.root = {job.data.root!r}: dataset root does not exist "
            f"(get it with `deeplab data download {job.data.name} --root DIR`, "
            "or set data.synthesize=true for generated data)"
        )
    if job.data.synthesize and not any(root.glob("*")):
        job.data.spec.synth(root)


def prepare_job(job: JobConfig) -> JobConfig:
    init = job.train.init_checkpoint
    if init is not None:
        from deeplab_sweep.trainable.checkpoint import checkpoint_file

        if not checkpoint_file(init).is_file():
            raise ConfigError(f"train.init_checkpoint = {init!r}: file not found")
        init = resolve_path(str(checkpoint_file(init)))
    mlflow = tracking.resolved(job.mlflow)
    job = job.model_copy(
        update={
            "train": job.train.model_copy(update={"init_checkpoint": init}),
            "data": job.data.model_copy(update={"root": resolve_path(job.data.root)}),
            "storage": job.storage.model_copy(update={"path": resolve_path(credentials_to_env(job.storage.path))}),
            "mlflow": mlflow,
            "sweep": job.sweep.model_copy(
                update={"optuna_storage": optuna_storage(job.sweep.optuna_storage, mlflow, job.storage.path)}
            ),
        }
    )
    check_job_paths(job)
    ensure_data(job)
    check_storage(job, check_models(job))
    job = stage_weights(job)
    from deeplab_sweep.errors import DatasetError

    try:  # layout problems surface here, with the file named, not inside a Ray worker
        for split in ("train", "val"):
            if len(job.data.spec.build(job.data.root, split)) == 0:
                raise ConfigError(f"data.root = {job.data.root!r}: the {split} split is empty")
    except DatasetError as e:
        raise ConfigError(f"data.root: {e}") from None
    return job


def stage_weights(job: JobConfig) -> JobConfig:
    """Every backbone a trial can draw with ImageNet weights, found or fetched once here and
    staged into the storage (`<storage.path>/weights`), which every node reads: N workers
    neither race to download them nor fail one by one inside Ray on a machine without network."""
    from deeplab_sweep.trainable.models import backbone_weights_of
    from deeplab_sweep.trainable.run_config import BUILTIN_MODEL
    from deeplab_sweep.trainable.weights import stage

    def values(key: str, base) -> list:
        return job.space[key].candidates() if key in job.space else [base]

    pretrained = any(values("model.pretrained_backbone", job.model.pretrained_backbone))
    if not pretrained or job.train.init_checkpoint is not None or job.model.factory != BUILTIN_MODEL:
        return job
    weights = [backbone_weights_of(b) for b in dict.fromkeys(values("model.backbone", job.model.backbone))]
    folder = stage(weights, job.model.backbone_weights, f"{job.storage.path.rstrip('/')}/weights")
    return job.model_copy(update={"model": job.model.model_copy(update={"backbone_weights": folder})})


def optuna_storage(configured: str | None, mlflow, storage_path: str) -> str:
    """Optuna's study storage: as configured, else optuna.db beside a local sqlite MLflow store,
    else in the storage folder when it is local (a shared mount on a cluster), else under runs/;
    as an absolute sqlite URI."""
    if configured is None:
        if mlflow.tracking_uri.startswith("sqlite:///"):
            folder = Path(mlflow.tracking_uri.removeprefix("sqlite:///")).parent
        else:
            folder = Path(RUNS_DIR if is_uri(storage_path) else storage_path)
        configured = f"sqlite:///{folder / 'optuna.db'}"
    return tracking.resolve_tracking_uri(configured, "optuna")


def check_job_paths(job: JobConfig) -> None:
    """Under `ray job submit --working-dir`, the driver runs in the uploaded folder, which Ray
    deletes when the job ends: a relative path (the embedded `runs/` defaults) would put the
    sweep's results there. Said before anything is written."""
    folder = job_working_dir()
    if folder is None:
        return
    places = {
        "storage.path": job.storage.path,
        "mlflow.tracking_uri": job.mlflow.tracking_uri.removeprefix("sqlite:///"),
        "mlflow.artifact_location": (job.mlflow.artifact_location or "").removeprefix("file://"),
        "sweep.optuna_storage": (job.sweep.optuna_storage or "").removeprefix("sqlite:///"),
    }
    for key, path in places.items():
        if path.startswith("/") and Path(path).resolve().is_relative_to(folder):
            raise ConfigError(
                f"{key}: {path} is inside this Ray job's uploaded working dir, which Ray deletes when the job "
                f"ends; give a path every node shares ({key}=/mnt/shared/...) or a server/cloud URI"
            )


def check_models(job: JobConfig) -> int:
    """The model builds and gives N x C x H x W logits on one tiny batch, here rather than in N
    trials on the cluster: the base config, and the base with each value the sweep can give a
    `model.*` key (one key at a time, not the product: a few builds of a second or less).
    Returns the largest model's parameter count."""
    from deeplab_sweep.search.compose import validate
    from deeplab_sweep.search.overrides import apply_overrides
    from deeplab_sweep.trainable.models import ModelFactoryError, check_model

    variants = {job.model.model_dump_json(): ("", job.model)}  # one build per distinct model
    for key, param in job.space.items():
        if not key.startswith("model.") or param.type in ("loguniform", "uniform"):
            continue
        for v in param.candidates():
            model = validate(apply_overrides(job.to_dict(), {key: v})).model
            variants.setdefault(model.model_dump_json(), (f"{key}={v}", model))
    largest = 0
    for where, model in variants.values():
        try:
            largest = max(largest, check_model(model, job.data.num_classes))
        except ModelFactoryError as e:
            raise ConfigError(f"{e} (with space {where})" if where else str(e)) from None
    return largest


def check_storage(job: JobConfig, parameters: int) -> None:
    """The storage path (and a cloud artifact location of MLflow's) must take a file, and a
    local one hold at least one checkpoint: said now, in one line, rather than by a trial
    failing after its first epoch."""
    import os
    import shutil
    import sys

    where = {"storage.path": job.storage.path}
    if is_uri(job.mlflow.artifact_location or ""):
        where["mlflow.artifact_location"] = job.mlflow.artifact_location
    for key, location in where.items():
        try:
            Storage(location).probe()
        except OSError as e:
            # pyarrow's local errors repeat the path around the errno; the errno says it all.
            reason = os.strerror(e.errno) if e.errno else " ".join(str(e).split())[:200]
            raise StorageUnusable(f"{key} = {redacted(location)!r}: not writable ({redacted(reason)})") from None
    if is_uri(job.storage.path):
        return
    path = Path(job.storage.path)
    # Weights and SGD momentum, 4 bytes each: what one checkpoint.pt of this model takes.
    needed = 2 * 4 * parameters
    free = shutil.disk_usage(path).free
    mb = lambda n: f"{n / 2**20:,.0f} MB"  # noqa: E731
    if free < needed:
        raise StorageUnusable(
            f"storage.path = {job.storage.path!r}: {mb(free)} free, but one checkpoint of this model "
            f"takes ~{mb(needed)}"
        )
    per_run = needed * (job.train.keep_checkpoints + 1)
    if free < per_run:
        print(
            f"warning: storage.path = {job.storage.path!r} has {mb(free)} free; a run keeps up to "
            f"{job.train.keep_checkpoints + 1} checkpoints of ~{mb(needed)}",
            file=sys.stderr,
        )
