"""The training procedure itself, in-process (no Ray): learning, exact resume, NaN."""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.checkpoint import load_checkpoint
from deeplab_sweep.trainable.engine import LocalWorker, NonFiniteLoss, fit, reported_metrics
from tests.conftest import CONF


def _cfg(root: Path, *overrides: str):
    return load_job(CONF / "train" / "demo.yaml", [f"data.root={root}", *overrides]).run


@pytest.fixture
def overfit_root(synth_voc_root, tmp_path) -> Path:
    """Validation = the training images: a model that can learn must fit them."""
    root = tmp_path / "voc"
    shutil.copytree(synth_voc_root, root)
    lists = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    shutil.copy(lists / "train.txt", lists / "val.txt")
    return root


def test_tiny_model_overfits_generated_voc(overfit_root):
    cfg = _cfg(
        overfit_root,
        "train.epochs=30",
        "train.eval_every=30",
        "data.max_train_images=16",
        "data.max_val_images=16",
        "data.scale_min=1.0",
        "data.scale_max=1.0",
        "data.crop_size=96",
    )
    reports = fit(cfg, LocalWorker())
    assert reports[-1]["epoch"] == 30
    assert reports[-1]["val/mIoU"] > 0.9, reports[-1]


class _StopAfter(LocalWorker):
    """Dies right after reporting epoch `n`, like a killed worker."""

    def __init__(self, n: int, **kw):
        super().__init__(**kw)
        self.n = n

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["epoch"] == self.n:
            raise KeyboardInterrupt


def test_resume_equals_uninterrupted(synth_voc_root, tmp_path):
    cfg = _cfg(synth_voc_root, "train.epochs=3", "data.max_train_images=16", "data.max_val_images=4")
    full = LocalWorker(checkpoint_root=tmp_path / "full")
    full_reports = fit(cfg, full)

    interrupted = _StopAfter(2, checkpoint_root=tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, interrupted)
    state = load_checkpoint(tmp_path / "part" / "epoch_0002")
    assert state["epoch"] == 2 and state["config"] == cfg.to_dict()
    resumed = LocalWorker(checkpoint_root=tmp_path / "resumed", resume=state)
    resumed_reports = fit(cfg, resumed)

    assert [r["epoch"] for r in resumed_reports] == [3]  # no lost and no repeated epoch
    assert resumed_reports[0]["train/loss"] == full_reports[-1]["train/loss"]
    assert resumed_reports[0]["val/mIoU"] == full_reports[-1]["val/mIoU"]
    a = load_checkpoint(tmp_path / "full" / "epoch_0003")
    b = load_checkpoint(tmp_path / "resumed" / "epoch_0003")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3 * 2  # 16 images / batch 8


def test_checkpoint_holds_everything_and_loads_weights_only(synth_voc_root, tmp_path):
    cfg = _cfg(synth_voc_root, "train.epochs=1", "data.max_train_images=8", "data.max_val_images=2")
    fit(cfg, LocalWorker(checkpoint_root=tmp_path))
    path = tmp_path / "epoch_0001" / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "config", "metrics"}
    assert raw["metrics"]["val/mIoU"] is not None


def test_non_finite_loss_stops_with_iteration(synth_voc_root):
    cfg = _cfg(synth_voc_root, "train.epochs=2", "train.lr=1e12", "data.max_train_images=16", "data.max_val_images=2")
    with pytest.raises(NonFiniteLoss, match=r"loss became (nan|inf) at epoch \d, iteration \d+"):
        fit(cfg, LocalWorker())


def test_batch_larger_than_data_is_explained(synth_voc_root):
    cfg = _cfg(synth_voc_root, "data.batch_size=64")
    with pytest.raises(ValueError, match="data.batch_size = 64 is larger than the 24 training images"):
        fit(cfg, LocalWorker())


@pytest.mark.parametrize(
    "options",
    [
        ["train.amp=bf16", "train.channels_last=true"],  # the GPU recipe's code path, run on CPU
        ["train.grad_clip=1.0", "model.separable=true", "data.val_crop=64"],
        ["data.device_augment=true", "data.loader_workers=1"],  # the GPU data path's code, on CPU
        ["train.compile=default", "train.compile_backend=eager"],  # dynamo's capture, without codegen
    ],
)
def test_training_options_run_and_report(synth_voc_root, options):
    cfg = _cfg(synth_voc_root, "train.epochs=1", "data.max_train_images=8", "data.max_val_images=2", *options)
    (report,) = fit(cfg, LocalWorker())
    assert report["epoch"] == 1 and 0.0 <= report["val/mIoU"] <= 1.0
    assert math.isfinite(report["train/loss"])
    # what a sweep may optimise (sweep.metric is checked against this list) is what is reported
    assert set(report) - {"epoch"} == set(reported_metrics(cfg.data.spec.class_names))


@pytest.mark.parametrize("eval_amp", [False, True])
def test_validation_runs_in_fp32_unless_eval_amp(synth_voc_root, tmp_path, eval_amp):
    """Trained in bf16, the logged mIoU comes from fp32 forwards by default (the reference's
    precision): it equals one computed by hand from the checkpoint in fp32; with
    train.eval_amp, from bf16 forwards. (After two epochs some pixels' argmax differ between
    the two: 436 of 4 images here.)"""
    import numpy as np

    from deeplab_sweep.trainable.engine import val_loader
    from deeplab_sweep.trainable.metrics import metrics_from_confusion
    from deeplab_sweep.trainable.models import build_from_config

    cfg = _cfg(
        synth_voc_root,
        "train.amp=bf16",
        f"train.eval_amp={str(eval_amp).lower()}",
        "train.epochs=2",
        "data.max_train_images=16",
        "data.max_val_images=4",
        "train.visuals=0",
    )
    logged = fit(cfg, LocalWorker(checkpoint_root=tmp_path))[-1]["val/mIoU"]
    model = build_from_config(cfg.model, cfg.data.num_classes)
    model.load_state_dict(load_checkpoint(tmp_path / "epoch_0002")["model"])
    expected = np.zeros((21, 21), dtype=np.int64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=eval_amp):
        for batch in val_loader(cfg):
            for image, mask in batch:
                pred, target = model.eval()(image[None])[0].argmax(0).numpy(), mask.numpy()
                keep = target != 255
                np.add.at(expected, (target[keep], pred[keep]), 1)
    assert logged == metrics_from_confusion(torch.from_numpy(expected))["mIoU"]


def test_each_evaluation_reports_what_the_model_costs(synth_voc_root, tmp_path):
    """Parameters and GFLOPs against the reference implementation's own model; latency against a
    stopwatch here; peak memory of this run alone, not of what the process did before it."""
    from torch.utils.flop_counter import FlopCounterMode

    from deeplab_sweep.trainable.inference import load_model
    from tests.reference_deeplab import DeepLabV3Plus

    crop = 64
    cfg = _cfg(
        synth_voc_root,
        "train.epochs=1",
        "data.max_train_images=8",
        "data.max_val_images=2",
        f"data.val_crop={crop}",
        "model.backbone=mobilenet_v2_reference",  # padded as the reference pads: the same FLOPs
    )
    resident_mb = int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    before = torch.ones(2**28)  # 1 GiB resident, then given back: not this run's peak
    del before
    worker = LocalWorker(checkpoint_root=tmp_path / "ckpt")
    start = time.perf_counter()
    (report,) = fit(cfg, worker)
    # Evaluation comes after the epoch's training, inside the run.
    assert 0 < report["val/time_s"] < time.perf_counter() - start - report["train/epoch_time_s"]

    reference = DeepLabV3Plus("mobilenet_v2", cfg.data.num_classes, 16, False).eval()
    assert report["model/params"] == sum(p.numel() for p in reference.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reference(torch.empty(1, 3, crop, crop))
    assert report["model/gflops"] == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-3)

    # Latency is the median of the timed batch-1 passes: a model whose forward takes at least
    # 30 ms (a sleep) measures at least 30 ms. (A stopwatch of the real model at another moment
    # is not a bound on a loaded machine: the other xdist worker trains beside this one.)
    model, _, _ = load_model(Path(worker.reports[-1]["checkpoint_path"]))
    assert report["model/latency_ms"] > 0

    class Slow(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            time.sleep(0.03)
            return self.inner(x)

    from deeplab_sweep.trainable.profile import forward_profile

    measured = forward_profile(Slow(model), crop, torch.device("cpu"), False, contextlib.nullcontext())
    assert 30 <= measured["model/latency_ms"] < 30_000 and measured["model/params"] == report["model/params"]

    # The run's peak starts from what the process holds when the run resets it; a few pages
    # the process gives back after `resident_mb` was read may leave it just under that.
    peak = report["model/peak_mem_mb"]
    assert resident_mb - 16 <= peak < resident_mb + 700, (resident_mb, peak)


def test_eval_grid_shows_the_checkpoints_predictions(synth_voc_root, tmp_path):
    """Each row of the epoch's grid is a validation image, its mask and what the stored model
    predicts for it, computed here image by image from the checkpoint (the run keeps the
    evaluation's own predictions rather than predicting twice)."""
    import torch.nn.functional as F
    from torchvision.io import read_image

    from deeplab_sweep.trainable.engine import val_loader
    from deeplab_sweep.trainable.inference import load_model

    cfg = _cfg(synth_voc_root, "train.epochs=1", "data.max_train_images=8", "data.max_val_images=4", "train.visuals=3")
    fit(cfg, LocalWorker(checkpoint_root=tmp_path))
    grid = read_image(str(tmp_path / "epoch_0001" / "visuals" / "val_images_epoch_0001.png"))
    model, _, _ = load_model(tmp_path / "epoch_0001")
    colours = torch.tensor(cfg.data.spec.palette, dtype=torch.uint8)  # VOC's 256 colours
    colours[255] = 0  # void in black
    dataset = val_loader(cfg).dataset
    assert grid.shape[1] == 3 * 160 + 2 * 4
    for row in range(3):
        image, mask = dataset[row]
        with torch.no_grad():
            pred = model(image[None]).argmax(1)[0]
        width = round(mask.shape[1] * 160 / mask.shape[0])
        top = row * (160 + 4)
        for col, labels in ((1, mask), (2, pred)):
            tile = colours[labels.long()].permute(2, 0, 1)[None].float()
            expected = F.interpolate(tile, size=[160, width], mode="nearest")[0].to(torch.uint8)
            left = col * (width + 4)
            assert torch.equal(grid[:, top : top + 160, left : left + width], expected), (row, col)


def test_confusion_figure_is_what_a_full_draw_gives(tmp_path):
    """The figure is redrawn each epoch from a cached drawing of what does not change: the PNG
    must be, pixel for pixel, what matplotlib draws from scratch for the same matrix and title;
    and a second epoch's matrix must show, not the first's."""
    from torchvision.io import read_image

    from deeplab_sweep.trainable import visuals

    names = tuple(f"class {i}" for i in range(5))
    first, second = (
        torch.eye(5, dtype=torch.int64) * 7,
        torch.randint(0, 9, (5, 5), generator=torch.Generator().manual_seed(0)),
    )
    for epoch, mat in ((1, first), (2, second)):
        visuals.confusion_figure(mat, names, tmp_path / f"{epoch}.png", f"epoch {epoch}: val mIoU 0.5")
    scratch = visuals._ConfusionCanvas(names)
    for artist in scratch.changing:
        artist.set_animated(False)
    rows = second.double() / second.double().sum(1, keepdim=True).clamp(min=1)
    scratch.image.set_data(rows.numpy())
    scratch.heading.set_text("epoch 2: val mIoU 0.5")
    scratch.canvas.draw()
    assert torch.equal(read_image(str(tmp_path / "2.png")), scratch.rgb())
    assert not torch.equal(read_image(str(tmp_path / "1.png")), scratch.rgb())
