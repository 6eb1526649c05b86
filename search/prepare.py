"""Everything checked or made ready before Ray starts: paths made absolute (Ray workers run
elsewhere), the dataset root checked or generated, the MLflow location resolved."""
from __future__ import annotations

from pathlib import Path

from search import tracking
from search.configs import ConfigError, JobConfig, check_data_root
from trainable.config import resolve_path


def ensure_data(job: JobConfig) -> None:
    check_data_root(job)
    root = Path(job.data.root)
    if job.data.synthesize and not any(root.glob("*")):
        from datasets.synth import synth_cityscapes, synth_voc

        (synth_cityscapes if job.data.name == "cityscapes" else synth_voc)(root)


def prepare_job(job: JobConfig) -> JobConfig:
    init = job.train.init_checkpoint
    if init is not None:
        from trainable.checkpoint import checkpoint_file

        if not checkpoint_file(init).is_file():
            raise ConfigError(f"train.init_checkpoint = {init!r}: file not found")
        init = resolve_path(str(checkpoint_file(init)))
    job = job.model_copy(update={
        "train": job.train.model_copy(update={"init_checkpoint": init}),
        "data": job.data.model_copy(update={"root": resolve_path(job.data.root)}),
        "storage": job.storage.model_copy(update={"path": resolve_path(job.storage.path)}),
        "mlflow": tracking.resolved(job.mlflow),
    })
    ensure_data(job)
    if job.model.pretrained_backbone and job.train.init_checkpoint is None:
        # Fetched (or found) once here, so that N workers neither race to download it nor
        # fail one by one inside Ray on a machine without network.
        from trainable.models import (
            BACKBONE_WEIGHTS,
            PretrainedWeightsMissing,
            imagenet_state,
        )

        try:
            imagenet_state(BACKBONE_WEIGHTS[job.model.backbone], job.model.backbone_weights)
        except PretrainedWeightsMissing as e:
            raise ConfigError(f"model.pretrained_backbone: {e}") from None
    from datasets import DatasetError, build_dataset

    try:  # layout problems surface here, with the file named, not inside a Ray worker
        for split in ("train", "val"):
            if len(build_dataset(job.data.name, job.data.root, split)) == 0:
                raise ConfigError(f"data.root = {job.data.root!r}: the {split} split is empty")
    except DatasetError as e:
        raise ConfigError(f"data.root: {e}") from None
    return job
