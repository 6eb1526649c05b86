"""Reference-implementation checkpoints imported strictly, and fine-tuning
from a checkpoint with clear errors for the wrong classes or backbone."""

from __future__ import annotations

import pytest
import torch

from deeplab_sweep.cli import main
from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.checkpoint import CheckpointError, load_checkpoint
from deeplab_sweep.trainable.engine import LocalWorker, fit
from deeplab_sweep.trainable.inference import load_model
from tests import reference_deeplab
from tests.conftest import CONF


def reference_model(
    backbone: str, num_classes: int, output_stride: int = 16, separable: bool = False, seed: int = 0
) -> torch.nn.Module:
    """The reference implementation's own model (tests/reference_deeplab.py) with random weights
    and BatchNorm statistics, in eval mode, its logits scaled to unit spread (so that 1e-4 is a
    tolerance relative to them)."""
    torch.manual_seed(seed)
    model = reference_deeplab.DeepLabV3Plus(backbone, num_classes, output_stride, separable)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                # small values keep a random 50-layer network's activations finite
                t.copy_(t.abs() + 0.5 if name.endswith("running_var") else 0.05 * torch.randn_like(t))
        last = model.classifier.classifier[-1]
        scale = model.eval()(torch.randn(1, 3, 65, 65)).std()
        last.weight /= scale
        last.bias /= scale
    return model.eval()


def reference_state(backbone: str, num_classes: int, separable: bool = False, seed: int = 0) -> dict:
    """What the reference saves: its state dict under DataParallel's `module.` prefix."""
    state = reference_model(backbone, num_classes, separable=separable, seed=seed).state_dict()
    return {f"module.{k}": v for k, v in state.items()}


def _save_reference(path, state):
    torch.save(
        {"model_state": state, "optimizer_state": {}, "scheduler_state": {}, "cur_itrs": 30000, "best_score": 0.783},
        path,
    )


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize(
    "backbone, separable", [("mobilenet_v2", False), ("mobilenet_v2", True), ("resnet50", False), ("resnet50", True)]
)
def test_imported_model_reproduces_the_reference_logits(tmp_path, backbone, separable, output_stride):
    ref = reference_model(backbone, 21, output_stride, separable)
    src = tmp_path / f"best_deeplabv3plus_{backbone}_voc_os{output_stride}.pth"
    _save_reference(src, {f"module.{k}": v for k, v in ref.state_dict().items()})
    assert main(["import-checkpoint", str(src), "--out", str(tmp_path / "out")]) == 0
    model, cfg, ckpt = load_model(tmp_path / "out")
    assert (cfg.model.output_stride, cfg.model.separable) == (output_stride, separable)
    assert cfg.data.name == "voc" and ckpt["metrics"]["reference_iterations"] == 30000
    x = torch.randn(2, 3, 97, 129)  # odd sizes: where padding conventions differ
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_import_names_the_bad_key(tmp_path, capsys):
    ref = reference_state("mobilenet_v2", 21)
    ref["module.classifier.project.0.weight"] = torch.zeros(48, 99, 1, 1)
    _save_reference(tmp_path / "bad.pth", ref)
    assert main(["import-checkpoint", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "classifier.project.0.weight has shape (48, 99, 1, 1), the model expects (48, 24, 1, 1)" in err
    ref = reference_state("mobilenet_v2", 21)
    ref["module.extra.weight"] = torch.zeros(3)
    _save_reference(tmp_path / "extra.pth", ref)
    assert main(["import-checkpoint", str(tmp_path / "extra.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "tensors the model does not use, e.g. ['extra.weight']" in capsys.readouterr().err


def test_import_refuses_pickled_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model_state": Evil()}, tmp_path / "evil.pth")
    assert main(["import-checkpoint", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "not loadable as plain tensors" in capsys.readouterr().err


def _cfg(root, *overrides):
    return load_job(
        CONF / "train" / "demo.yaml",
        [
            f"data.root={root}",
            "train.epochs=1",
            "data.max_train_images=8",
            "data.max_val_images=2",
            *overrides,
        ],
    ).run


def test_fine_tune_from_reference_checkpoint(synth_voc_root, tmp_path):
    ref = reference_state("mobilenet_v2", 21)
    _save_reference(tmp_path / "ref.pth", ref)
    worker = LocalWorker(checkpoint_root=tmp_path / "ft")
    fit(_cfg(synth_voc_root, f"train.init_checkpoint={tmp_path / 'ref.pth'}", "train.lr=1e-9"), worker)
    tuned = load_checkpoint(tmp_path / "ft" / "epoch_0001")["model"]
    # lr ~ 0: the fine-tuned conv weights are still the imported ones
    w = "classifier.classifier.0.weight"
    assert torch.allclose(tuned[w], ref["module." + w], atol=1e-4)


@pytest.mark.parametrize(
    "backbone, classes, message",
    [
        ("mobilenet_v2", 19, "is mobilenet_v2_reference with 19 classes; this run is mobilenet_v2 with 21 classes"),
        ("resnet50", 21, "is resnet50 with 21 classes; this run is mobilenet_v2 with 21 classes"),
    ],
)
def test_fine_tune_wrong_classes_or_backbone(synth_voc_root, tmp_path, backbone, classes, message):
    ref = reference_state(backbone, classes)
    _save_reference(tmp_path / "r.pth", ref)
    dataset = "cityscapes" if classes == 19 else "voc"
    assert (
        main(["import-checkpoint", str(tmp_path / "r.pth"), "--out", str(tmp_path / "ours"), "--dataset", dataset]) == 0
    )
    with pytest.raises(CheckpointError, match=message):
        fit(_cfg(synth_voc_root, f"train.init_checkpoint={tmp_path / 'ours'}"), LocalWorker())


def test_missing_init_checkpoint_is_a_config_error(synth_voc_root, workdir, capsys):
    rc = main(
        [
            "train",
            str(CONF / "train" / "demo.yaml"),
            f"data.root={synth_voc_root}",
            "train.init_checkpoint=/nope/ckpt.pt",
        ]
    )
    assert rc == 2 and "train.init_checkpoint = '/nope/ckpt.pt': file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_fine_tunes_from_imported_checkpoint(ray_cluster, synth_voc_root, workdir, tmp_path):
    from mlflow.tracking import MlflowClient

    from deeplab_sweep.search.sweep import run_sweep

    _save_reference(tmp_path / "ref.pth", reference_state("mobilenet_v2", 21))
    assert main(["import-checkpoint", str(tmp_path / "ref.pth"), "--out", str(tmp_path / "imported")]) == 0
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(
        "defaults: [train/demo]\n"
        "data: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 1, cpus_per_worker: 1}\n"
        "sweep: {search: grid, num_samples: 1, asha: {enabled: false}}\n"
        "space:\n  train.lr: {type: choice, values: [0.001, 0.01]}\n"
    )
    job = load_job(
        cfg,
        [f"data.root={synth_voc_root}", "sweep.name=ft", f"train.init_checkpoint={tmp_path / 'imported'}"],
        conf_root=CONF,
    )
    summary = run_sweep(job)
    assert all(t.error is None and t.epochs == 1 for t in summary.trials)
    c = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id], "tags.`deeplab.kind` = 'trial'")
    assert {r.data.params["train.init_checkpoint"] for r in runs} == {str(tmp_path / "imported" / "checkpoint.pt")}
