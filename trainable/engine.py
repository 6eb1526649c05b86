"""The per-worker training procedure, free of Ray: a `Worker` supplies rank, device, DDP
wrapping, the checkpoint to resume from and where reports go. `trainable.ray_train` supplies a
Ray Train worker; `LocalWorker` runs the same code in-process (eval, tests, benchmarks).

Resume is exact: every epoch re-seeds the RNGs from (seed, epoch, rank), the sampler is
epoch-seeded, and the checkpoint holds optimiser, poly-LR scheduler and AMP scaler state, so a
run restored after epoch k trains epochs k+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from deeplab_sweep.datasets.labels import IGNORE_INDEX
from deeplab_sweep.datasets.transforms import DeviceTrainAugment, list_collate, train_transform, val_transform
from deeplab_sweep.trainable.checkpoint import save_checkpoint
from deeplab_sweep.trainable.credentials import redacted
from deeplab_sweep.trainable.metrics import ConfusionMatrix
from deeplab_sweep.trainable.models import build_from_config, param_groups
from deeplab_sweep.trainable.profile import MODEL_METRICS, PeakMemory, forward_profile, profile_crop, sync_device
from deeplab_sweep.trainable.run_config import BUILTIN_MODEL, RunConfig
from deeplab_sweep.trainable.run_folder import VISUALS_DIR


class NonFiniteLoss(FloatingPointError):
    pass


class Worker:
    """What the training procedure needs from its runtime."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def resume_state(self) -> dict | None:
        return None

    def checkpoint_scratch(self) -> contextlib.AbstractContextManager[str]:
        """A temporary folder that an epoch's checkpoint is written in before `report` stores it."""
        return tempfile.TemporaryDirectory(prefix="deeplab-ckpt-")

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def replay(self, metrics: dict) -> None:
        """Report again what the restored checkpoint recorded: a run killed right after saving
        it may never have delivered that report, and whoever listens must not miss an epoch."""
        self.report(metrics, None)

    def write_failed(self, error: OSError, epoch: int, checkpoint_dir: str) -> Exception:
        """What a failure to write the epoch's checkpoint or PNGs into `checkpoint_scratch`
        becomes: a worker that writes them into storage says so in words."""
        return error


@dataclass
class LocalWorker(Worker):
    """Single process, no Ray. Checkpoints go to `checkpoint_root/epoch_XXXX/`."""

    checkpoint_root: Path | None = None
    resume: dict | None = None
    reports: list[dict] = field(default_factory=list)
    device: torch.device = torch.device("cpu")

    def resume_state(self) -> dict | None:
        return self.resume

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir and self.checkpoint_root is not None:
            dest = self.checkpoint_root / f"epoch_{metrics['epoch']:04d}"
            dest.mkdir(parents=True, exist_ok=True)
            for f in Path(checkpoint_dir).iterdir():
                f.replace(dest / f.name)
            metrics = {**metrics, "checkpoint_path": str(dest)}
        self.reports.append(metrics)


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+W, r+2W...: every item evaluated exactly once across ranks
    (DistributedSampler pads with repeats, which would count some images twice)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_everything(seed: int, epoch: int, rank: int) -> int:
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    torch.manual_seed(s)
    return s


def build_loaders(cfg: RunConfig, rank: int, world_size: int, pin: bool):
    d = cfg.data
    augment = (DeviceTrainAugment if d.device_augment else train_transform)(d.crop_size, d.scale_min, d.scale_max)
    train_ds = d.spec.build(d.root, "train", augment, limit=d.max_train_images)
    sampler = DistributedSampler(
        train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    per_worker = len(train_ds) // world_size
    if per_worker < d.batch_size:
        raise ValueError(
            f"data.batch_size = {d.batch_size} is larger than the {per_worker} training images "
            f"per worker ({len(train_ds)} images over {world_size} workers)"
        )
    train = DataLoader(
        train_ds,
        batch_size=d.batch_size,
        sampler=sampler,
        num_workers=d.loader_workers,
        pin_memory=pin,
        drop_last=True,
        persistent_workers=False,
        collate_fn=list_collate if d.device_augment else None,
    )
    return train, sampler, val_loader(cfg, rank, world_size, pin=pin)


def val_loader(
    cfg: RunConfig, rank: int = 0, world_size: int = 1, pin: bool = False, data_root: str | None = None
) -> DataLoader:
    """This rank's share of the validation set, as training evaluates it (and eval reproduces)."""
    d = cfg.data
    ds = d.spec.build(data_root or d.root, "val", val_transform(d.val_crop), limit=d.max_val_images)
    return DataLoader(
        ds,
        batch_size=d.val_batch_size,
        sampler=ShardSampler(len(ds), rank, world_size),
        num_workers=d.loader_workers,
        pin_memory=pin,
        collate_fn=list_collate,
    )


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    # The lower backbone LR protects pretrained features (ImageNet or a fine-tuning start);
    # a backbone trained from scratch learns at the full rate.
    mult = t.backbone_lr_mult if cfg.model.pretrained_backbone or t.init_checkpoint else 1.0
    groups = param_groups(model, t.lr, mult)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, power: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / total_iters) ** power)


def _autocast(cfg: RunConfig, device: torch.device, evaluating: bool = False):
    """Training's mixed precision; evaluation runs in fp32 (as the reference evaluates) unless
    `train.eval_amp` asks for the training precision there too."""
    if cfg.train.amp == "none" or (evaluating and not cfg.train.eval_amp):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg: RunConfig, device, epoch: int) -> dict:
    model.train()
    mem = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    total, n_img, n_it = torch.zeros((), device=device), 0, 0
    start = time.perf_counter()
    first_step_s = 0.0
    previous = None  # the last step's (loss, iteration, global step): checked one step late
    on_device = getattr(loader.dataset.transform, "apply", None)  # DeviceTrainAugment
    for it, batch in enumerate(loader):
        images, masks = on_device(batch, device) if on_device else (t.to(device, non_blocking=True) for t in batch)
        images = images.contiguous(memory_format=mem)
        with _autocast(cfg, device):
            loss = F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        # Reading a loss waits for the GPU. Checking this step's loss right after its forward
        # starved the GPU while the CPU queued the backward (-4% bf16 img/s on an H100/H200);
        # checking the previous step's, with this one queued, costs nothing measurable.
        if previous is not None:
            _check_finite(*previous, epoch)
        previous = (loss.detach(), it, scheduler.last_epoch)
        scheduler.step()
        total += loss.detach()
        n_img += images.shape[0]
        n_it += 1
        if it == 0:  # with train.compile, the run's first step compiles
            sync_device(device)
            first_step_s = time.perf_counter() - start
    if previous is not None:
        _check_finite(*previous, epoch)
    elapsed = time.perf_counter() - start
    return {
        "train/loss": float(total) / max(n_it, 1),
        "train/lr": optimizer.param_groups[-1]["lr"],
        "train/images_per_s": n_img / elapsed if elapsed > 0 else 0.0,
        "train/epoch_time_s": elapsed,
        "train/first_step_s": first_step_s,
    }


def compiled(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """The model the training steps run: torch.compile'd when `train.compile` asks (it shares
    the parameters; checkpoints and evaluation use the eager model)."""
    if cfg.train.compile == "off":
        return model
    mode = None if cfg.train.compile == "default" else cfg.train.compile
    return torch.compile(model, mode=mode, backend=cfg.train.compile_backend)


def _check_finite(loss: torch.Tensor, it: int, step: int, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(
            f"loss became {loss.item()} at epoch {epoch}, iteration {it} "
            f"(global step {step}); lower train.lr or enable train.grad_clip"
        )


@dataclass
class Samples:
    """The first `count` images of a rank's evaluation share with their predictions, kept
    while evaluating, so the epoch's picture costs no second forward pass."""

    count: int
    _kept: dict[int, tuple] = field(default_factory=dict)

    def add(self, positions: list[int], images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor) -> None:
        for i, pos in enumerate(positions):
            if pos < self.count:  # copied out: a view would keep the whole batch (on the GPU) alive
                self._kept[pos] = tuple(t[i].to("cpu", copy=True) for t in (images, masks, preds))

    @property
    def items(self) -> list[tuple]:
        return [self._kept[p] for p in sorted(self._kept)]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, num_classes: int, device, cfg: RunConfig | None = None, samples: Samples | None = None
) -> ConfusionMatrix:
    """Confusion matrix over this rank's share of `loader`, summed across ranks; `samples`, if
    given, keeps the first images of this rank's share with their predictions."""
    model.eval()
    cm = ConfusionMatrix(num_classes, device)
    ctx = _autocast(cfg, device, evaluating=True) if cfg is not None else contextlib.nullcontext()
    seen = 0
    for batch in loader:
        for positions, images, masks in _same_size_groups(batch):
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with ctx:
                logits = model(images)
            preds = logits.argmax(1)
            cm.update(masks, preds)
            if samples is not None:
                samples.add([seen + p for p in positions], images, masks, preds)
        seen += len(batch)
    cm.all_reduce()
    return cm


def _same_size_groups(batch: list[tuple[torch.Tensor, torch.Tensor]]):
    """Stack the images of a validation batch that share a size (all of them when centre-cropped),
    with their positions in the batch."""
    groups: dict[tuple, list] = {}
    for pos, (image, mask) in enumerate(batch):
        groups.setdefault(tuple(image.shape), []).append((pos, image, mask))
    for items in groups.values():
        yield [p for p, _, _ in items], torch.stack([i for _, i, _ in items]), torch.stack([m for _, _, m in items])


TRAIN_METRICS = ("train/loss", "train/lr", "train/images_per_s", "train/epoch_time_s", "train/first_step_s")
VAL_METRICS = ("val/mIoU", "val/overall_acc", "val/mean_acc", "val/time_s")


def reported_metrics(class_names: tuple[str, ...]) -> tuple[str, ...]:
    """Every metric a run reports at each evaluated epoch: what a sweep can optimise."""
    return TRAIN_METRICS + VAL_METRICS + MODEL_METRICS + tuple(f"val/iou/{name}" for name in class_names)


def val_metrics(cm: ConfusionMatrix, class_names: tuple[str, ...]) -> dict:
    m = cm.compute()
    out = {"val/mIoU": m["mIoU"], "val/overall_acc": m["overall_acc"], "val/mean_acc": m["mean_acc"]}
    for name, iou in zip(class_names, m["per_class_iou"], strict=True):
        out[f"val/iou/{name}"] = iou
    return out


def _write_visuals(out: Path, epoch: int, samples: Samples, cm: ConfusionMatrix, cfg: RunConfig) -> None:
    from deeplab_sweep.trainable.visuals import write_visuals

    spec = cfg.data.spec
    write_visuals(out, epoch, samples.items, cm.mat, spec.class_names, spec.palette, cm.compute()["mIoU"])


_PROFILES: dict[tuple, dict[str, float]] = {}


def _model_costs(model: nn.Module, cfg: RunConfig, device) -> dict[str, float]:
    """Parameters, GFLOPs and batch-1 latency as validation runs the model (its precision, its
    memory format). Measured once per architecture and setting in a process: a Tune actor's
    next trial of the same model on the same device would measure the same thing again."""
    t = cfg.train
    key = (cfg.model.model_dump_json(), cfg.data.num_classes, profile_crop(cfg), str(device))
    key += (t.channels_last, t.amp if t.eval_amp else "none")
    if key not in _PROFILES:
        autocast = _autocast(cfg, device, evaluating=True)
        _PROFILES[key] = forward_profile(model, profile_crop(cfg), device, t.channels_last, autocast)
    return _PROFILES[key]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def fit(cfg: RunConfig, worker: Worker) -> list[dict]:
    """Train `cfg` on this worker; returns the metrics it reported."""
    t = cfg.train
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    device = worker.device
    seed_everything(t.seed, 0, 0)  # identical initial weights on every rank
    # Weights that the init checkpoint replaces are not fetched first.
    model_cfg = cfg.model.model_copy(update={"pretrained_backbone": False}) if t.init_checkpoint else cfg.model
    model = build_from_config(model_cfg, cfg.data.num_classes)
    if cfg.model.norm == "syncbn" and worker.world_size > 1 and device.type == "cuda":
        # SyncBatchNorm needs CUDA/NCCL; on CPU workers (gloo) per-rank BN statistics are kept.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    train_loader, sampler, val_loader = build_loaders(cfg, worker.rank, worker.world_size, device.type == "cuda")
    if len(train_loader) == 0:
        raise ValueError("no training iterations: data.batch_size exceeds the training set")
    scheduler = poly_scheduler(optimizer, t.epochs * len(train_loader), t.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")

    start_epoch = 1
    state = worker.resume_state()
    if state is None and t.init_checkpoint:
        model.load_state_dict(init_weights(t.init_checkpoint, cfg, model))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        worker.replay({k: (math.nan if v is None else v) for k, v in state["metrics"].items()})
    model = worker.prepare_model(model)
    peak = PeakMemory(device)
    peak.reset()
    train_model = compiled(model, cfg)

    reports = []
    for epoch in range(start_epoch, t.epochs + 1):
        seed_everything(t.seed, epoch, worker.rank)
        sampler.set_epoch(epoch)
        metrics = {
            "epoch": epoch,
            **train_one_epoch(train_model, train_loader, optimizer, scheduler, scaler, cfg, device, epoch),
        }
        if epoch % t.eval_every and epoch != t.epochs:
            continue
        samples = Samples(t.visuals) if worker.rank == 0 and t.visuals else None
        start = time.perf_counter()
        cm = evaluate(model, val_loader, cfg.data.num_classes, device, cfg, samples)
        metrics.update(val_metrics(cm, cfg.data.spec.class_names), **{"val/time_s": time.perf_counter() - start})
        if worker.rank == 0:
            metrics.update(_model_costs(_unwrap(model), cfg, device), **{"model/peak_mem_mb": peak.read_mb()})
        with worker.checkpoint_scratch() as tmp:
            ckpt_dir = None
            if worker.rank == 0:
                try:
                    save_checkpoint(
                        tmp,
                        model_state=_unwrap(model).state_dict(),
                        config=redacted(cfg.to_dict()),
                        epoch=epoch,
                        metrics=_finite(metrics),
                        optimizer_state=optimizer.state_dict(),
                        scheduler_state=scheduler.state_dict(),
                        scaler_state=scaler.state_dict(),
                    )
                    if samples is not None:
                        _write_visuals(Path(tmp) / VISUALS_DIR, epoch, samples, cm, cfg)
                except OSError as e:
                    raise worker.write_failed(e, epoch, tmp) from None
                ckpt_dir = tmp
            worker.report(metrics, ckpt_dir)
        reports.append(metrics)
    return reports


def init_weights(path: str, cfg: RunConfig, model: nn.Module) -> dict:
    """Weights to fine-tune from, checked against this run's model: ours or a reference file."""
    from deeplab_sweep.trainable.checkpoint import CheckpointError, checkpoint_file, load_checkpoint
    from deeplab_sweep.trainable.import_ref import check_shapes, reference_to_ours

    raw = torch.load(checkpoint_file(path), map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and "config" in raw:
        ckpt = load_checkpoint(path)
        src = RunConfig.model_validate(ckpt["config"])
        # Backbones that share their parameters (mobilenet_v2 and its reference-padded twin)
        # fine-tune into each other; any other difference is named in the run's own terms.
        if not _same_parameters(model, ckpt["model"]):
            raise CheckpointError(
                f"train.init_checkpoint = {path!r} is {_arch(src)[0]} with {src.data.num_classes} classes; "
                f"this run is {_arch(cfg)[0]} with {cfg.data.num_classes} classes"
            )
        weights = ckpt["model"]
    else:
        weights, _ = reference_to_ours(raw.get("model_state", raw))
    check_shapes(model, weights, f"train.init_checkpoint = {path!r}")
    return weights


def _same_parameters(model: nn.Module, weights: dict) -> bool:
    expected = model.state_dict()
    return expected.keys() == weights.keys() and all(expected[k].shape == weights[k].shape for k in expected)


def _arch(cfg: RunConfig) -> tuple[str, int]:
    name = cfg.model.backbone if cfg.model.factory == BUILTIN_MODEL else cfg.model.factory
    return name, cfg.data.num_classes


def _finite(metrics: dict) -> dict:
    """Checkpoint copy of the metrics (NaN kept as None: JSON/YAML friendly)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
