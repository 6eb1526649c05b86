"""Typed, validated configuration of one training run (the schema; composing it from YAML
files is `deeplab_sweep.search.compose`).

Everything that reaches the model, the data pipeline or the train loop passes through these
models exactly once, at the edge (CLI or sweep trial). Unknown keys are errors, so a typo never
silently trains with a default. The same objects serialise back to plain dicts/YAML: that is
what checkpoints and MLflow store, and `RunConfig.model_validate(dumped)` rebuilds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The embedded defaults: everything of a run on one machine lands under ./runs.
RUNS_DIR = "runs"
DEFAULT_TRACKING_URI = f"sqlite:///{RUNS_DIR}/mlflow.db"
DEFAULT_ARTIFACTS = f"{RUNS_DIR}/mlartifacts"
DEFAULT_STORAGE = f"{RUNS_DIR}/ray"
DEFAULT_EXPERIMENT = "deeplab"
DEFAULT_METRIC = "val/mIoU"


class Strict(BaseModel):
    """Unknown keys are errors; values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    # A dataset of the table in deeplab_sweep.datasets.catalog.
    name: str = "voc"
    root: str
    # When true and `root` holds no dataset yet, a small synthetic one in the real layout is
    # generated there first (demos and CI); real data is never overwritten.
    synthesize: bool = False
    crop_size: int = Field(513, strict=True, ge=32)
    scale_min: float = Field(0.5, gt=0)
    scale_max: float = Field(2.0, gt=0)
    # None: validate on whole images; an int: resize shorter side + centre crop to it.
    val_crop: int | None = Field(None, strict=True, ge=32)
    # Per Ray Train worker: the global batch is batch_size x train.num_workers.
    batch_size: int = Field(16, strict=True, ge=1)
    val_batch_size: int = Field(4, strict=True, ge=1)
    loader_workers: int = Field(2, strict=True, ge=0)
    # Decode JPEGs and run the train augmentation on the training device (on a GPU: nvJPEG,
    # the loader's CPU workers only read bytes and draw the crops); the same crops, flips and
    # scales as the CPU path for the same seeds.
    device_augment: bool = False
    # Limit the number of images per split (smoke tests, quick sweeps); None = all.
    max_train_images: int | None = Field(None, strict=True, ge=1)
    max_val_images: int | None = Field(None, strict=True, ge=1)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from deeplab_sweep.datasets.catalog import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _scale_order(self) -> DataConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must be <= scale_max ({self.scale_max})")
        return self

    @property
    def spec(self):
        """The dataset's entry in the catalog: loader, classes, palette."""
        from deeplab_sweep.datasets.catalog import get_dataset

        return get_dataset(self.name)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes


BUILTIN_MODEL = "deeplabv3plus"


class ModelConfig(Strict):
    # A model registered in trainable.models (`registered_models()`), or your own as
    # 'pkg.module:callable': called as callable(num_classes, this ModelConfig), it returns an
    # nn.Module mapping N x 3 x H x W images to N x num_classes x H x W logits.
    factory: str = BUILTIN_MODEL
    # For the built-in DeepLabv3+: a backbone registered in trainable.models (`registered_backbones()`).
    backbone: str = "resnet50"
    output_stride: Literal[8, 16] = 16
    separable: bool = False
    # bn; syncbn (BatchNorm synchronised across DDP workers on GPUs); gn (GroupNorm: for small
    # per-GPU batches). A pretrained backbone keeps its BatchNorm whatever this says.
    norm: Literal["bn", "syncbn", "gn"] = "bn"
    pretrained_backbone: bool = False
    # ImageNet weights: a file, or a folder holding each backbone's file under torchvision's
    # name; otherwise the torch hub cache (or a download into it) on the driver. Before Ray
    # starts they are staged into <storage.path>/weights, which every worker reads.
    backbone_weights: str | None = None
    # Free-form keyword options for your own factory (ignored by the built-in model).
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str) -> str:
        from deeplab_sweep.trainable.models import registered_models

        module, sep, attr = v.partition(":")
        if v not in registered_models() and not (sep and module and attr):
            raise ValueError(
                f"unknown model {v!r}; allowed: {', '.join(registered_models())}, or your own as 'pkg.module:callable'"
            )
        return v

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str, info: ValidationInfo) -> str:
        from deeplab_sweep.trainable.models import registered_backbones

        names = registered_backbones()
        # `factory` is declared first, so it is validated by now; your own model ignores backbone.
        if info.data.get("factory") == BUILTIN_MODEL and v not in names:
            raise ValueError(f"unknown backbone {v!r}; allowed: {', '.join(names)}")
        return v


class TrainConfig(Strict):
    epochs: int = Field(30, strict=True, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    # Pretrained backbones learn at this fraction of `lr` (the paper's fine-tuning recipe).
    backbone_lr_mult: float = Field(0.1, gt=0)
    poly_power: float = Field(0.9, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    amp: Literal["none", "bf16", "fp16"] = "none"
    # Validation in fp32 (the logged mIoU from an fp32 argmax, as the reference's) unless true.
    eval_amp: bool = False
    channels_last: bool = False
    # torch.compile the training step's model (evaluation stays eager: whole images vary in
    # size). "reduce-overhead" adds CUDA graphs; the first step of a run pays the compile,
    # reported as train/first_step_s. `compile_backend` is torch's (tests use "eager").
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    compile_backend: str = "inductor"
    seed: int = Field(0, strict=True, ge=0)
    eval_every: int = Field(1, strict=True, ge=1)
    # Each evaluation renders this many fixed validation images (image | truth | prediction)
    # and a confusion-matrix figure into the checkpoint's visuals/, logged to MLflow. 0: off.
    visuals: int = Field(4, strict=True, ge=0, le=16)
    # Ray Train scaling: data-parallel workers, and what each one gets.
    num_workers: int = Field(1, strict=True, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Further Ray resources each worker needs, e.g. {A100: 1}: places workers on the node types
    # that advertise them.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # Bounded checkpoint storage: the best `keep_checkpoints` by the run's metric (a sweep's
    # `sweep.metric`) are kept, and the latest.
    keep_checkpoints: int = Field(2, strict=True, ge=1)
    # Ray retries a failed run this many times from its last checkpoint.
    max_failures: int = Field(0, strict=True, ge=-1)
    torch_threads: int | None = Field(None, strict=True, ge=1)
    # Fine-tune from weights: our checkpoint or a reference-implementation one (same classes
    # and backbone as this run). Ignored when the run resumes from its own checkpoint.
    init_checkpoint: str | None = None


class MlflowConfig(Strict):
    tracking_uri: str = DEFAULT_TRACKING_URI
    # None: runs/mlartifacts for a local store, the server's own default for an http(s) server.
    artifact_location: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    # MLflow's system metrics (CPU, memory, disk, network, GPU) of the node each sweep trial
    # trains on, sampled this often and logged with each epoch; None: off.
    system_metrics_interval_s: float | None = Field(5.0, gt=0)


class StorageConfig(Strict):
    # Where Ray Train/Tune keep results and checkpoints: a local dir, NFS mount or s3:// URI.
    path: str = DEFAULT_STORAGE
    name: str | None = None


class RunConfig(Strict):
    """One training run: what `deeplab train` runs and what each sweep trial runs."""

    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()
    storage: StorageConfig = StorageConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def resolve_path(p: str, base: Path | None = None) -> str:
    """Absolute form of a local path (URIs pass through): Ray workers run in other cwds."""
    if "://" in p:
        return p
    path = Path(p).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return str(path.resolve())
