"""Thin Ray Train wiring around `trainable.engine.fit`: one `TorchTrainer`, N DDP workers.

Rank 0 writes the checkpoint, every rank reports (Ray's report is a barrier). Ray Train V2
restores a run from storage when it is started again with the same name and storage path, and
retries failed workers from the latest checkpoint (`train.max_failures`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from deeplab_sweep.trainable.checkpoint import load_checkpoint
from deeplab_sweep.trainable.engine import Worker, fit
from deeplab_sweep.trainable.run_config import RunConfig
from deeplab_sweep.trainable.run_folder import (
    prune_checkpoints,
    store_checkpoint,
    stored_checkpoints,
    write_epoch_files,
)
from deeplab_sweep.trainable.storage import Storage


class StorageError(RuntimeError):
    """The storage path filled up or refused a write: said in words, with what was kept."""


class RayWorker(Worker):
    def __init__(self, storage_path: str = "", run_storage_path: str | None = None):
        """`storage_path`: the run's `storage.path` (named in errors); `run_storage_path`: the Ray
        Train run's own `storage_path` (a sweep's train folder), its folder the run's name in it."""
        self.storage_path = storage_path
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        run_storage_path = run_storage_path or storage_path
        self.run_uri = f"{run_storage_path.rstrip('/')}/{ctx.get_experiment_name()}" if run_storage_path else ""

    def prepare_model(self, model):
        # DDP (gloo on CPU, NCCL on GPU) when there is more than one worker.
        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world_size > 1 else model

    def resume_state(self) -> dict | None:
        self._restored = ray.train.get_checkpoint()
        if self._restored is None:
            return None
        with self._restored.as_directory() as d:
            return load_checkpoint(d, map_location=self.device)

    def replay(self, metrics: dict) -> None:
        # The checkpoint is already in storage: point at it rather than uploading a copy.
        ray.train.report({**metrics, "checkpoint_path": self._restored.path, "replayed": True})

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint)  # Ray copies the checkpoint into storage here
            if checkpoint_dir:  # rank 0, once its checkpoint is in storage
                storage = Storage(self.run_uri)
                write_epoch_files(storage, storage.root, metrics, checkpoint_dir)
        except OSError as e:
            raise storage_error(e, self.storage_path, metrics.get("epoch"), checkpoint_dir) from None


SCRATCH_PREFIX = ".deeplab-ckpt-"  # an in-process run's checkpoint being written, in its folder


class InProcessWorker(Worker):
    """The one worker of a run that Ray Train runs in local mode (`ScalingConfig(num_workers=0)`):
    the train function runs in the calling process, e.g. a sweep trial's own Tune actor, which
    Tune reuses from trial to trial, so a trial starts with no new process, torch import,
    controller or process group. Local mode keeps nothing, so this worker does what Ray Train
    does for a worker group, in the same layout: each checkpoint into the run's folder in
    storage, the best `train.keep_checkpoints` by `metric` and the latest kept, and a run
    started again resumes from the latest whole one. Each report goes to `on_report`."""

    def __init__(self, cfg: RunConfig, run_uri: str, metric: str, mode: str, on_report: Callable[[dict], None]):
        self.cfg, self.metric, self.mode, self.on_report = cfg, metric, mode, on_report
        self.storage = Storage(run_uri)
        # Ray hands a GPU trial's actor its GPU as the only visible one.
        self.device = torch.device("cuda", 0) if cfg.train.use_gpu else torch.device("cpu")
        self._restored: str | None = None

    def checkpoint_scratch(self):
        if not self.storage.local:
            return super().checkpoint_scratch()
        # Written in the run's own folder, storing it is a rename: a checkpoint is written once,
        # not written to /tmp and copied (a ResNet-101 one is ~470 MB).
        self.storage.fs.create_dir(self.storage.root)
        return tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=self.storage.root)

    def resume_state(self) -> dict | None:
        for left in self.storage.list(self.storage.root):  # by a process killed mid-write
            if left.base_name.startswith(SCRATCH_PREFIX):
                self.storage.fs.delete_dir(left.path)
        stored = stored_checkpoints(self.storage, self.storage.root)
        if not stored:
            return None
        self._restored = max(stored, key=lambda r: r["epoch"])["checkpoint_path"]
        with self.storage.local_copy(self._restored) as d:
            return load_checkpoint(d, map_location=self.device)

    def replay(self, metrics: dict) -> None:
        self.on_report({**metrics, "checkpoint_path": self.storage.uri(self._restored), "replayed": True})

    def write_failed(self, error: OSError, epoch: int, checkpoint_dir: str) -> Exception:
        # On local storage the checkpoint is written in the run's own folder: a full disk is the
        # storage's. Elsewhere it is written to a temporary folder first, whose error is its own.
        return storage_error(error, self.cfg.storage.path, epoch, checkpoint_dir) if self.storage.local else error

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            root = self.storage.root
            try:
                path = store_checkpoint(self.storage, root, checkpoint_dir, metrics["epoch"])
                # Its files may have been moved there: the epoch's PNGs are read from where they are.
                write_epoch_files(self.storage, root, metrics, path if self.storage.local else checkpoint_dir)
                prune_checkpoints(self.storage, root, self.cfg.train.keep_checkpoints, self.metric, self.mode)
            except OSError as e:
                raise storage_error(e, self.cfg.storage.path, metrics.get("epoch"), checkpoint_dir) from None
            metrics = {**metrics, "checkpoint_path": self.storage.uri(path)}
        self.on_report(metrics)


def storage_error(e: OSError, storage_path: str, epoch, checkpoint_dir: str | None) -> Exception:
    import errno
    import shutil

    text = " ".join(str(e).split())
    size = sum(f.stat().st_size for f in Path(checkpoint_dir).rglob("*") if f.is_file()) if checkpoint_dir else 0
    try:
        free = f"{shutil.disk_usage(storage_path).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    kept = f"the checkpoints of epochs before {epoch} are kept; run the same command again to resume"
    if e.errno == errno.ENOSPC or "No space left" in text:
        return StorageError(
            f"storage.path = {storage_path!r}: no space left on device while saving the epoch "
            f"{epoch} checkpoint ({size / 2**20:.0f} MB; {free}). Free space or lower "
            f"train.keep_checkpoints: {kept}"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission denied" in text or "Read-only" in text:
        return StorageError(
            f"storage.path = {storage_path!r}: not writable while saving the epoch {epoch} "
            f"checkpoint ({text[:200]}); {kept}"
        )
    return e


def train_loop_per_worker(config: dict) -> None:
    cfg = RunConfig.model_validate(config["run"])
    fit(cfg, RayWorker(cfg.storage.path, config["storage_path"]))


def eval_loop_per_worker(config: dict) -> None:
    """Evaluate a checkpoint data-parallel: each rank takes its shard, matrices are summed."""
    from deeplab_sweep.trainable.engine import evaluate, val_loader
    from deeplab_sweep.trainable.inference import load_model

    worker = RayWorker()
    model, cfg, _ = load_model(config["checkpoint"], worker.device, config.get("model_factory"))
    loader = val_loader(cfg, worker.rank, worker.world_size, data_root=config.get("data_root"))
    cm = evaluate(model, loader, cfg.data.num_classes, worker.device, cfg)
    # Train V2 returns only checkpointed metrics to the driver: ship the matrix as a file.
    with tempfile.TemporaryDirectory() as tmp:
        if worker.rank == 0:
            (Path(tmp) / "confusion.json").write_text(json.dumps(cm.mat.cpu().tolist()))
        worker.report({"images": len(loader.sampler)}, tmp if worker.rank == 0 else None)


def evaluate_distributed(
    checkpoint: str, num_workers: int, data_root: str | None = None, model_factory: str | None = None
) -> list[list[int]]:
    """The summed confusion matrix of `checkpoint` evaluated by `num_workers` Ray Train workers
    (`model_factory`: as `inference.load_model`)."""
    with tempfile.TemporaryDirectory(prefix="deeplab-eval-") as storage:
        trainer = TorchTrainer(
            eval_loop_per_worker,
            train_loop_config={"checkpoint": str(checkpoint), "data_root": data_root, "model_factory": model_factory},
            scaling_config=ScalingConfig(num_workers=num_workers),
            run_config=RayRunConfig(storage_path=storage),
            torch_config=ray.train.torch.TorchConfig(backend="gloo"),
        )
        with trainer.fit().checkpoint.as_directory() as d:
            return json.loads((Path(d) / "confusion.json").read_text())


def worker_resources(train) -> dict[str, float]:
    """What each Ray Train worker of a run reserves on its node."""
    return {
        "CPU": float(train.cpus_per_worker),
        **({"GPU": 1.0} if train.use_gpu else {}),
        **train.resources_per_worker,
    }


def runs_in_process(num_workers: int) -> bool:
    """A single-worker run needs no worker group: Ray Train's local mode runs it in the caller."""
    return num_workers == 1


def build_in_process_trainer(
    cfg: RunConfig, run_uri: str, metric: str, mode: str, on_report: Callable[[dict], None]
) -> TorchTrainer:
    """A one-worker run in Ray Train's local mode (see `InProcessWorker`), stored in `run_uri`."""

    def loop() -> None:
        fit(cfg, InProcessWorker(cfg, run_uri, metric, mode, on_report))

    return TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=0))


# Ray Train polls worker health every 2 s by default, and a report waits for the next poll: with
# short epochs that is most of a trial's overhead. At 0.2 s it costs nothing visible. Ray Train
# hands the variable from the process that calls fit() to its controller and workers.
HEALTH_CHECK_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def build_trainer(
    cfg: RunConfig, name: str, storage_path: str, metric: str, mode: str, callbacks: list | None = None
) -> TorchTrainer:
    os.environ.setdefault(*HEALTH_CHECK_ENV)
    t = cfg.train
    scaling = ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker=worker_resources(t),
    )
    run = RayRunConfig(
        name=name,
        storage_path=storage_path,
        # The best checkpoints by the metric the run is judged on are kept (Ray always keeps
        # the latest too, for resume).
        checkpoint_config=CheckpointConfig(
            num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=metric, checkpoint_score_order=mode
        ),
        failure_config=FailureConfig(max_failures=t.max_failures),
        callbacks=callbacks or [],
    )
    torch_config = ray.train.torch.TorchConfig(backend="nccl" if t.use_gpu else "gloo")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict(), "storage_path": storage_path},
        scaling_config=scaling,
        run_config=run,
        torch_config=torch_config,
    )
