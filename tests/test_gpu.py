"""The GPU-only code paths: AMP (bf16, fp16 + GradScaler), channels_last, SyncBatchNorm over
NCCL, the metric on CUDA. Skipped where there is no GPU (CI); run on a lent GPU machine with
`python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import math

import pytest
import torch

from deeplab_sweep.search.compose import load_job
from tests.conftest import CONF, free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(root, *overrides):
    return load_job(
        CONF / "train" / "demo.yaml",
        [f"data.root={root}", "data.max_train_images=16", "data.max_val_images=4", "train.epochs=2", *overrides],
    ).run


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_fit_on_cuda_with_amp_and_channels_last_resumes(amp, synth_voc_root, tmp_path):
    from deeplab_sweep.trainable.checkpoint import load_checkpoint
    from deeplab_sweep.trainable.engine import LocalWorker, fit

    cfg = _cfg(synth_voc_root, f"train.amp={amp}", "train.channels_last=true", "train.visuals=2")
    cuda = torch.device("cuda")
    reports = fit(cfg, LocalWorker(checkpoint_root=tmp_path, device=cuda))
    assert [r["epoch"] for r in reports] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and 0 <= r["val/mIoU"] <= 1 for r in reports)
    state = load_checkpoint(tmp_path / "epoch_0001")
    assert all(v.device.type == "cpu" for v in state["model"].values())  # loadable without a GPU
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0, "GradScaler state is checkpointed"
    assert (tmp_path / "epoch_0001" / "visuals" / "val_images_epoch_0001.png").is_file()
    resumed = fit(cfg, LocalWorker(checkpoint_root=tmp_path / "r", device=cuda, resume=state))
    assert [r["epoch"] for r in resumed] == [2]


def test_syncbn_converts_and_trains_under_nccl(synth_voc_root, tmp_path):
    """One NCCL rank (a single GPU cannot hold two): the engine's conversion and a DDP step."""
    import torch.distributed as dist
    from torch import nn

    from deeplab_sweep.trainable.engine import LocalWorker, fit

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:

        class DDPWorker(LocalWorker):
            world_size = 2  # claims two ranks so that fit converts BN; the group itself has one

            def prepare_model(self, model):
                self.model = model
                return nn.parallel.DistributedDataParallel(model, device_ids=[0])

        worker = DDPWorker(checkpoint_root=tmp_path, device=torch.device("cuda"))
        reports = fit(_cfg(synth_voc_root, "model.norm=syncbn", "train.epochs=1", "train.amp=bf16"), worker)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in worker.model.modules())
        assert not any(type(m) is nn.BatchNorm2d for m in worker.model.modules())
        assert math.isfinite(reports[0]["train/loss"])
    finally:
        dist.destroy_process_group()


def test_metric_on_cuda_equals_cpu():
    from deeplab_sweep.trainable.metrics import ConfusionMatrix

    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 21, (4, 129, 129), generator=g)
    gt[:, :5] = 255
    pred = torch.randint(0, 21, (4, 129, 129), generator=g)
    cpu, gpu = ConfusionMatrix(21), ConfusionMatrix(21, "cuda")
    cpu.update(gt, pred)
    gpu.update(gt.cuda(), pred.cuda())
    assert torch.equal(cpu.mat, gpu.mat.cpu())
